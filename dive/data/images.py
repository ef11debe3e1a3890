"""Raw images for the CNN setting: Karpathy split files plus an image folder, as a RetrievalSplit
whose `images` load, resize and normalise on access."""
from pathlib import Path

import numpy as np

from .augment import random_crop_box
from .karpathy import load_karpathy
from .scan import RetrievalSplit

# torchvision's ImageNet statistics, which its pretrained ResNets expect.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


class ImageFiles:
    """(N, 3, size, size) float32 images read from files on access: the shorter side resized to
    `size`, the centre cropped square, ImageNet-normalised."""

    ndim = 4

    def __init__(self, paths, size: int = 512):
        if size < 32:
            raise ValueError(f"image_size must be >= 32, got {size}")
        self.paths, self.size = [Path(p) for p in paths], size

    @property
    def shape(self):
        return (len(self.paths), 3, self.size, self.size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i) -> np.ndarray:
        return self.load(i)

    def load(self, i, rng=None) -> np.ndarray:
        """Image i; with a numpy Generator `rng`, a random resized crop flipped half the time
        (dive.data.augment) instead of the centre square."""
        try:
            from PIL import Image
        except ImportError as exc:
            raise ImportError("images from files need Pillow: pip install pillow") from exc
        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("RGB")
                if rng is None:
                    img = self._centre_square(img)
                else:
                    img = img.resize((self.size, self.size), Image.BILINEAR,
                                     box=random_crop_box(img.width, img.height, rng))
                    if rng.random() < 0.5:
                        img = img.transpose(Image.FLIP_LEFT_RIGHT)
                pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except OSError as exc:
            raise ValueError(f"cannot read image {self.paths[i]}: {exc}") from None
        return (pixels - MEAN) / STD

    def _centre_square(self, img):
        from PIL import Image
        scale = self.size / min(img.size)
        w = max(self.size, round(img.width * scale))
        h = max(self.size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


def karpathy_split(json_path, image_root, split: str, *, image_size: int = 512,
                   captions_per_image: int = 5) -> RetrievalSplit:
    """The images and captions of a Karpathy split file's `split` ("dev" means "val")."""
    split = "val" if split == "dev" else split
    entries = load_karpathy(json_path, image_root, split, captions_per_image=captions_per_image)
    captions = [c for e in entries for c in e.captions]
    ids = [e.image_id if e.image_id is not None else i for i, e in enumerate(entries)]
    return RetrievalSplit(ImageFiles([e.path for e in entries], image_size), captions,
                          captions_per_image, image_ids=np.asarray(ids, dtype=np.int64))
