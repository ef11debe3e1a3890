"""Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`).

Each entry of `images` has `filename` (and `filepath`, e.g. "val2014", for COCO), `split` (train,
val, test or restval) and `sentences[*].raw`. The standard protocol trains COCO on train +
restval (113,287 images), tests on the 5,000 `test` images (5K; the 1K results average five
consecutive blocks of 1,000, `dive.eval.coco_1k_5fold`) and Flickr30K on its 1,000 test images.
"""
from dataclasses import dataclass
from pathlib import Path

from ..checks import count, json_file

SPLITS = ("train", "val", "test", "restval")


@dataclass
class KarpathyImage:
    path: Path            # image_root / filepath / filename (relative when image_root is None)
    captions: list        # the first captions_per_image raw sentences
    split: str            # the split in the file (restval stays visible in a folded train split)
    image_id: int | None  # cocoid for COCO, else imgid; None when the file has neither


def load_karpathy(json_path, image_root, split: str, *, captions_per_image: int = 5,
                  allow_fewer: bool = False) -> list[KarpathyImage]:
    """The images of `split`, in file order; `train` includes `restval` (which COCO alone has).

    image_root=None skips the image files (e.g. to build a vocabulary from the captions);
    otherwise every selected image must exist under it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    count("captions_per_image", captions_per_image)
    json_path = Path(json_path)
    entries = _read_entries(json_path)
    wanted = ("train", "restval") if split == "train" else (split,)
    out = []
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
        for key in ("split", "filename", "sentences"):
            if key not in entry:
                raise ValueError(f"{where} has no {key!r}")
        if entry["split"] not in SPLITS:
            raise ValueError(f"{where} has split {entry['split']!r}, expected one of {SPLITS}")
        if entry["split"] not in wanted:
            continue
        captions = _captions(entry["sentences"], where)
        if len(captions) < captions_per_image and not allow_fewer:
            raise ValueError(f"{where} ({entry['filename']}) has {len(captions)} captions, "
                             f"expected at least {captions_per_image} (or allow_fewer=True)")
        out.append(KarpathyImage(path=Path(entry.get("filepath", "")) / entry["filename"],
                                 captions=captions[:captions_per_image], split=entry["split"],
                                 image_id=entry.get("cocoid", entry.get("imgid"))))
    if not out:
        raise ValueError(f"{json_path} has no images in split {split!r}")
    if image_root is not None:
        _resolve(out, Path(image_root))
    return out


def _read_entries(json_path):
    data = json_file(json_path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} must be an object with an 'images' list")
    return data["images"]


def _captions(sentences, where):
    if not isinstance(sentences, list):
        raise ValueError(f"{where}: 'sentences' must be a list")
    captions = []
    for j, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"{where}.sentences[{j}] has no non-empty 'raw' caption")
        captions.append(raw.strip())
    return captions


def _resolve(images, root):
    if not root.is_dir():
        raise FileNotFoundError(f"image_root {root} is not a directory")
    missing = []
    for image in images:
        image.path = root / image.path
        if not image.path.is_file():
            missing.append(image.path)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images are missing under "
                                f"{root}, e.g. {missing[0]}")
