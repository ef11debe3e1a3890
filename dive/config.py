"""One configuration object for a DivE run (model, loss, training), with the paper's presets."""
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_args

from .checks import count, finite_number, json_file
from .data.augment import Augmentation
from .losses import LossConfig
from .models.config import PRESETS as MODEL_PRESETS
from .models.config import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the paper's COCO run (the reference's train_eval_coco.sh)."""
    epochs: int = 80
    batch_size: int = 200         # images a step ("image" sampling), or (image, caption) pairs
    sampling: str = "image"       # "image": each image with all its captions (the reference's
                                  # batches); "caption": one (image, caption) pair per item
    lr: float = 1e-3              # AdamW peak learning rate
    spm_lr_scale: float = 0.1     # the image encoder (but a ResNet) and the text set
                                  # prediction module learn at lr * this
    weight_decay: float = 1e-4
    warmup_steps: int = 0         # linear warm-up, then cosine decay to 0 at the last step
    grad_clip: float = 1.0        # max gradient norm
    warm_epochs: int = 0          # epochs on all negatives before the hardest ones (VSE++ style)
    amp: bool = True              # bf16 autocast on CUDA (ignored on CPU)
    seed: int = 0
    save_every: int = 500         # steps between resumable checkpoints (and at each epoch end)
    log_every: int = 50
    eval_batch_size: int = 256
    val_split: str = "dev"        # falls back to "test" when the data has no dev split
    val_images: int = 0           # validate on the split's first N images (and their
                                  # captions); 0 = all. The paper presets: 1000, as the
                                  # reference validates on the first 1,000 dev images
    # Augmentation of the training items (dive.data.augment), the paper's 0.2 / 0.2
    caption_drop: float = 0.2     # each word masked / replaced / deleted with this probability
    region_drop: float = 0.2      # each precomputed region dropped with this probability
    image_crop: bool = True       # raw images: random resized crop + flip
    workers: int = 0              # DataLoader worker processes (the results do not depend on it)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "save_every", "log_every", "eval_batch_size"):
            count(name, getattr(self, name))
        for name in ("warmup_steps", "warm_epochs", "seed", "workers", "val_images"):
            count(name, getattr(self, name), minimum=0)
        finite_number("lr", self.lr, positive=True)
        finite_number("grad_clip", self.grad_clip, positive=True)
        for name in ("spm_lr_scale", "weight_decay"):
            if finite_number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        Augmentation(self.caption_drop, self.region_drop, self.image_crop, self.seed)
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")


SAMPLING = ("image", "caption")


def _section(cls, data, name):
    if not isinstance(data, dict):
        raise ValueError(f"the {name} section must be a JSON object, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {name} settings {unknown}; known: {sorted(known)}")
    for key, value in data.items():
        _check_type(f"{name}.{key}", value, known[key].type)
    return cls(**data)


def _check_type(name: str, value, kind):
    """TypeError unless `value` is of the field's type (`kind`: a class or an Optional of one;
    an int passes as a float, a bool passes as nothing but a bool)."""
    kinds = get_args(kind) or (kind,)
    for k in kinds:
        if k is type(None) and value is None:
            return
        if k is bool and isinstance(value, bool):
            return
        if k in (int, float) and isinstance(value, int if k is int else (int, float)) \
                and not isinstance(value, bool):
            return
        if k is str and isinstance(value, str):
            return
    names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    raise TypeError(f"{name} must be {names}, got {value!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self):
        return {"model": asdict(self.model), "loss": asdict(self.loss),
                "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ValueError(f"a config is a JSON object with the sections model, loss and "
                             f"train, got {type(data).__name__}")
        unknown = sorted(set(data) - {"model", "loss", "train"})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known: model, loss, train")
        return cls(model=_section(ModelConfig, data.get("model", {}), "model"),
                   loss=_section(LossConfig, data.get("loss", {}), "loss"),
                   train=_section(TrainConfig, data.get("train", {}), "train"))

    def save(self, path):
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    @classmethod
    def load(cls, path):
        """The config saved at `path`; FileNotFoundError or ValueError naming the file (bad
        JSON, an unknown setting, a value of the wrong type or range)."""
        if Path(path).is_dir():
            raise IsADirectoryError(f"config file {path} is a folder, not a JSON file")
        data = json_file(path, "config file")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"config file {path}: {exc}") from None

    def with_changes(self, section: str, **changes):
        return replace(self, **{section: replace(getattr(self, section), **changes)})


# The demo: a small model that learns the synthetic dataset in a couple of minutes on CPU.
_DEMO_MODEL = ModelConfig(embed_dim=128, num_slots=4, word_dim=64, depth=2, heads=2,
                          head_dim=32, ff_mult=2, dropout=0.0)
PRESETS = {
    **{name: Config(model=model, train=TrainConfig(val_images=1000))
       for name, model in MODEL_PRESETS.items()},
    "demo": Config(model=_DEMO_MODEL,
                   train=TrainConfig(epochs=5, batch_size=64, lr=1e-3, spm_lr_scale=1.0,
                                     warmup_steps=50, grad_clip=2.0, warm_epochs=1,
                                     save_every=100, log_every=20, caption_drop=0.0,
                                     region_drop=0.0, sampling="caption")),
}
