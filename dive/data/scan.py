"""The SCAN precomputed format (COCO / Flickr30K bottom-up-attention region features).

A split `s` under `root` is two files:
- `s_ims.npy`: (N_img, R, F) floats (R=36 regions, F=2048 for the real data), memory-mapped;
- `s_caps.txt`: one caption per line, `captions_per_image` consecutive lines per image in image
  order, so caption j belongs to image j // captions_per_image.
SCAN's COCO `testall` is the 5K test split and `test` the 1K one. Some dumps repeat every image
`captions_per_image` times (one row per caption); those rows are deduplicated on load.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checks import count


@dataclass
class RetrievalSplit:
    """Images and their captions, caption j belonging to image caption_image_ids[j].

    `len()` is the number of captions (one training pair each).
    """
    images: np.ndarray
    captions: list
    captions_per_image: int
    image_ids: np.ndarray = field(default=None)
    caption_image_ids: np.ndarray = field(default=None)

    def __post_init__(self):
        cpi = self.captions_per_image
        count("captions_per_image", cpi)
        if self.images.ndim not in (3, 4):
            raise ValueError(f"images must be (N_img, R, F) features or (N_img, 3, H, W) "
                             f"images, got shape {self.images.shape}")
        if len(self.captions) != cpi * len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images: "
                             f"expected {cpi} per image ({cpi * len(self.images)})")
        if self.image_ids is None:
            self.image_ids = np.arange(len(self.images), dtype=np.int64)
        if self.caption_image_ids is None:
            self.caption_image_ids = np.arange(len(self.captions), dtype=np.int64) // cpi
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64)
        self.caption_image_ids = np.asarray(self.caption_image_ids, dtype=np.int64)
        if self.image_ids.shape != (len(self.images),):
            raise ValueError(f"image_ids must have one entry per image ({len(self.images)}), "
                             f"got shape {self.image_ids.shape}")
        if self.caption_image_ids.shape != (len(self.captions),):
            raise ValueError(f"caption_image_ids must have one entry per caption "
                             f"({len(self.captions)}), got shape {self.caption_image_ids.shape}")
        if len(self.captions) and (self.caption_image_ids.min() < 0
                                   or self.caption_image_ids.max() >= len(self.images)):
            raise ValueError(f"caption_image_ids must index the {len(self.images)} images")

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def __len__(self) -> int:
        return len(self.captions)


def load_scan(root, split: str, *, captions_per_image: int = 5) -> RetrievalSplit:
    """The split `split` ("train", "dev", "test", "testall", ...) of a SCAN-format folder."""
    count("captions_per_image", captions_per_image)
    root = Path(root)
    ims_path, caps_path = root / f"{split}_ims.npy", root / f"{split}_caps.txt"
    for path in (ims_path, caps_path):
        if not path.is_file():
            raise FileNotFoundError(f"SCAN split {split!r}: {path} does not exist")
    images = _load_images(ims_path)
    captions = _load_captions(caps_path)
    cpi = captions_per_image
    if cpi > 1 and len(images) == len(captions):
        if not np.array_equal(images[0], images[cpi - 1]):
            raise ValueError(f"{ims_path} has one row per caption of {caps_path} "
                             f"({len(images)}), but rows 0..{cpi - 1} differ: expected each "
                             f"image repeated {cpi} times")
        images = images[::cpi]
    if len(captions) != cpi * len(images):
        raise ValueError(f"{caps_path} has {len(captions)} captions for the {len(images)} images "
                         f"of {ims_path}: expected {cpi} per image ({cpi * len(images)})")
    return RetrievalSplit(images=images, captions=captions, captions_per_image=cpi)


def _load_images(path):
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy array: {e}") from None
    if images.ndim != 3:
        raise ValueError(f"{path} must hold an (N_img, R, F) array, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{path} must hold floating-point features, got {images.dtype}")
    return images


def _load_captions(path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    captions = [line.strip() for line in lines]
    for number, caption in enumerate(captions, 1):
        if not caption:
            raise ValueError(f"{path} line {number} is an empty caption")
    return captions
