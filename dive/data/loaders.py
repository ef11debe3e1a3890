"""torch Datasets over a RetrievalSplit and their collate functions.

Training iterates over images, each with all its captions (ImageCaptionsDataset, the reference
code's batches), or over captions (PairDataset: one (image, caption) pair each, so an image
appears once per caption); evaluation encodes every image once and every caption once, in split
order, which is the (images x captions) layout dive.eval expects. Batches are dicts of padded
tensors with boolean masks (True = a real region / token) and are left in dataset order: no
length sorting.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import Augmentation, drop_regions, drop_words, item_rng
from .images import ImageFiles
from .scan import RetrievalSplit


def _image_tensor(split, index):
    # np.array copies the row out of the memory map; float32 whatever the file stores.
    return torch.from_numpy(np.array(split.images[index], dtype=np.float32))


class _Augmented(Dataset):
    """The split, tokenizer and augmentation a training dataset shares; `set_epoch` picks the
    epoch whose draws item i gets: item_rng(augment.seed, epoch, i) (dive.data.augment)."""

    def __init__(self, split: RetrievalSplit, vocab, augment: Augmentation = Augmentation()):
        self.split, self.vocab, self.augment = split, vocab, augment
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _rng(self, i):
        return item_rng(self.augment.seed, self.epoch, i) if self.augment.active else None

    def _image(self, index, rng):
        if rng is None:
            return _image_tensor(self.split, index)
        images = self.split.images
        if images.ndim == 4:
            crop = self.augment.image_crop and isinstance(images, ImageFiles)
            pixels = images.load(index, rng) if crop else images[index]
            return torch.from_numpy(np.array(pixels, dtype=np.float32))
        return torch.from_numpy(drop_regions(np.array(images[index], dtype=np.float32),
                                             self.augment.region_drop, rng))

    def _caption(self, j, rng):
        ids = self.vocab.encode(self.split.captions[j])
        if rng is not None:
            ids = drop_words(ids, self.augment.caption_drop, rng, self.vocab.mask_id,
                             self.vocab.word_ids)
        return torch.tensor(ids, dtype=torch.long)


class PairDataset(_Augmented):
    """Item i: (image features (R, F) float32, caption ids, image index, caption index i)."""

    def __len__(self):
        return self.split.num_captions

    def __getitem__(self, i):
        image = int(self.split.caption_image_ids[i])
        rng = self._rng(i)
        features = self._image(image, rng)
        return features, self._caption(i, rng), image, i


class ImageCaptionsDataset(_Augmented):
    """Item i: (image features (R, F) float32, [ids of each of its captions], image index i,
    [their caption indices, ascending])."""

    def __init__(self, split: RetrievalSplit, vocab, augment: Augmentation = Augmentation()):
        super().__init__(split, vocab, augment)
        owners = split.caption_image_ids
        order = np.argsort(owners, kind="stable")
        ends = np.cumsum(np.bincount(owners, minlength=split.num_images))
        self.captions_of = np.split(order, ends[:-1])

    def __len__(self):
        return self.split.num_images

    def __getitem__(self, i):
        rng = self._rng(i)
        features = self._image(i, rng)
        indices = self.captions_of[i].tolist()
        return features, [self._caption(j, rng) for j in indices], i, indices


class ImageDataset(Dataset):
    """Item i: (image features (R, F) float32, image index i)."""

    def __init__(self, split: RetrievalSplit):
        self.split = split

    def __len__(self):
        return self.split.num_images

    def __getitem__(self, i):
        return _image_tensor(self.split, i), i


class CaptionDataset(Dataset):
    """Item i: (caption ids, caption index i); `vocab` is a Vocabulary or BertTokens."""

    def __init__(self, split: RetrievalSplit, vocab):
        self.split, self.vocab = split, vocab

    def __len__(self):
        return self.split.num_captions

    def __getitem__(self, i):
        return torch.tensor(self.vocab.encode(self.split.captions[i]), dtype=torch.long), i


def pad_images(features):
    """(R_i, F) tensors -> zero-padded (B, R_max, F) float32 and its (B, R_max) mask;
    (3, H, W) images of one size -> (B, 3, H, W) and no mask."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    if features[0].dim() == 3:
        shapes = {tuple(f.shape) for f in features}
        if len(shapes) > 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}")
        return torch.stack(features), None
    for f in features:
        if f.dim() != 2 or f.shape[0] < 1:
            raise ValueError(f"image features must be (R, F) with R >= 1, got {tuple(f.shape)}")
    dims = {f.shape[1] for f in features}
    if len(dims) > 1:
        raise ValueError(f"image features in one batch must share F, got {sorted(dims)}")
    regions = max(f.shape[0] for f in features)
    images = torch.zeros(len(features), regions, dims.pop(), dtype=torch.float32)
    mask = torch.zeros(len(features), regions, dtype=torch.bool)
    for b, f in enumerate(features):
        images[b, :f.shape[0]] = f
        mask[b, :f.shape[0]] = True
    return images, mask


def pad_captions(captions):
    """1-D id tensors -> (B, L_max) long padded with 0 (<pad>), its mask and the (B,) lengths."""
    if not captions:
        raise ValueError("cannot collate an empty batch")
    for c in captions:
        if c.dim() != 1 or c.numel() < 1:
            raise ValueError(f"caption ids must be a non-empty 1-D tensor, got {tuple(c.shape)}")
    lengths = torch.tensor([c.numel() for c in captions], dtype=torch.long)
    ids = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for b, c in enumerate(captions):
        ids[b, :c.numel()] = c
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    return ids, mask, lengths


def collate_pairs(batch) -> dict:
    """PairDataset items -> images, image_mask, captions, caption_mask, lengths, image_ids
    (the image index: pairs of one image share it), caption_image_ids (the same) and
    caption_ids."""
    features, captions, image_ids, caption_ids = zip(*batch) if batch else ((), (), (), ())
    images, image_mask = pad_images(list(features))
    ids, caption_mask, lengths = pad_captions(list(captions))
    image_ids = torch.tensor(image_ids, dtype=torch.long)
    return {"images": images, "image_mask": image_mask, "captions": ids,
            "caption_mask": caption_mask, "lengths": lengths, "image_ids": image_ids,
            "caption_image_ids": image_ids.clone(),
            "caption_ids": torch.tensor(caption_ids, dtype=torch.long)}


def collate_image_captions(batch) -> dict:
    """ImageCaptionsDataset items -> the keys of collate_pairs, with B images and all their
    captions: image_ids (B,), captions and caption_image_ids (B * captions per image)."""
    features, captions, image_ids, caption_ids = zip(*batch) if batch else ((), (), (), ())
    images, image_mask = pad_images(list(features))
    ids, caption_mask, lengths = pad_captions([c for group in captions for c in group])
    owners = [i for i, group in zip(image_ids, captions) for _ in group]
    return {"images": images, "image_mask": image_mask, "captions": ids,
            "caption_mask": caption_mask, "lengths": lengths,
            "image_ids": torch.tensor(image_ids, dtype=torch.long),
            "caption_image_ids": torch.tensor(owners, dtype=torch.long),
            "caption_ids": torch.tensor([j for group in caption_ids for j in group],
                                        dtype=torch.long)}


def collate_images(batch) -> dict:
    """ImageDataset items -> images, image_mask, image_ids."""
    features, image_ids = zip(*batch) if batch else ((), ())
    images, image_mask = pad_images(list(features))
    return {"images": images, "image_mask": image_mask,
            "image_ids": torch.tensor(image_ids, dtype=torch.long)}


def collate_captions(batch) -> dict:
    """CaptionDataset items -> captions, caption_mask, lengths, caption_ids."""
    captions, caption_ids = zip(*batch) if batch else ((), ())
    ids, caption_mask, lengths = pad_captions(list(captions))
    return {"captions": ids, "caption_mask": caption_mask, "lengths": lengths,
            "caption_ids": torch.tensor(caption_ids, dtype=torch.long)}
