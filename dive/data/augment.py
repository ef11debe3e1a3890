"""Training-time augmentation, as in the paper's runs (the reference's caption_drop_prob and
butd_drop_prob, 0.2 each, and its random-resized-crop + flip for raw images).

- Words: each word of a caption (not <start>/<end>, [CLS]/[SEP]) is picked with probability p;
  a picked word becomes the mask token half the time, a random word a tenth of the time, and is
  deleted otherwise. With a BERT tokenizer the unit is the word piece.
- Regions: each precomputed region is dropped with probability p (at least one stays).
- Raw images: a random crop of 36-100 % of the area at an aspect ratio of 3/4-4/3, resized to
  the square input, flipped left-right half the time.

Every draw comes from `item_rng(seed, epoch, index)`, a generator of that training item alone
(a pair, or an image with its captions): the same item gets the same augmentation whichever rank,
DataLoader worker or resumed process loads it.
"""
from dataclasses import dataclass

import numpy as np

from ..checks import finite_number

CROP_SCALE = (0.36, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, index))


def _probability(name: str, p) -> float:
    p = finite_number(name, p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def drop_words(ids, p: float, rng: np.random.Generator, mask_id: int, word_ids) -> list:
    """`ids` (first and last kept: the start and end tokens) with each inner id masked,
    replaced by one of `word_ids` or deleted, as the module docstring says."""
    p = _probability("caption_drop", p)
    ids = list(ids)
    if p == 0.0 or len(ids) <= 2:
        return ids
    inner = ids[1:-1]
    draws = rng.random(len(inner))
    kept = []
    for token, u in zip(inner, draws):
        if u >= p:
            kept.append(token)
        elif u < 0.5 * p:
            kept.append(mask_id)
        elif u < 0.6 * p:
            kept.append(int(word_ids[rng.integers(len(word_ids))]))
    return [ids[0], *kept, ids[-1]]


def drop_regions(features: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """The rows of (R, F) `features` that survive a drop of probability p each (never none)."""
    p = _probability("region_drop", p)
    if p == 0.0:
        return features
    draws = rng.random(len(features))
    keep = draws >= p
    if not keep.any():
        keep[np.argmax(draws)] = True
    return features[keep]


def random_crop_box(width: int, height: int, rng: np.random.Generator):
    """(left, top, right, bottom) of a crop of CROP_SCALE of the area at a CROP_RATIO aspect
    ratio (log-uniform), torchvision's RandomResizedCrop rule; the centre square after ten
    misses."""
    area = width * height
    log_ratio = np.log(CROP_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(width - w + 1))
            top = int(rng.integers(height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class Augmentation:
    """What the training datasets apply to their items; all off by default."""
    caption_drop: float = 0.0
    region_drop: float = 0.0
    image_crop: bool = False
    seed: int = 0

    def __post_init__(self):
        _probability("caption_drop", self.caption_drop)
        _probability("region_drop", self.region_drop)

    @property
    def active(self) -> bool:
        return self.caption_drop > 0 or self.region_drop > 0 or self.image_crop

    @classmethod
    def from_config(cls, train_config) -> "Augmentation":
        return cls(train_config.caption_drop, train_config.region_drop,
                   train_config.image_crop, train_config.seed)
