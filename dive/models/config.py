"""The model's settings in one dataclass, with the paper's presets."""
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional


@dataclass(frozen=True)
class ModelConfig:
    image_encoder: str = "regions"      # "regions" (precomputed BUTD features) or "resnet"
    text_encoder: str = "bigru"         # "bigru" or "bert"
    embed_dim: int = 1024               # D of every set element
    num_slots: int = 4                  # K
    region_dim: int = 2048              # feature size of a precomputed region / grid cell
    word_dim: int = 300                 # bi-GRU word embedding size
    depth: int = 4                      # aggregation rounds
    heads: int = 4
    head_dim: int = 512
    ff_mult: int = 4
    dropout: float = 0.1
    share_weights: bool = True
    slot_init: str = "learned"          # "learned" or "gaussian"
    resnet_arch: str = "resnet152"      # any torchvision ResNet, for image_encoder="resnet"
    resnet_weights: Optional[str] = None  # local .pth file; None = random init (no downloads)
    image_size: int = 512               # square crop fed to the ResNet
    bert_path: Optional[str] = None     # local directory of a BERT-family model + tokenizer
    glove_path: Optional[str] = None    # optional local GloVe text file for the bi-GRU

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes):
        return replace(self, **changes)


# The paper's settings (DivE, CVPR 2023, and its reference code's COCO/F30K scripts).
PRESETS = {
    "butd_bigru": ModelConfig(image_encoder="regions", text_encoder="bigru"),
    "resnet152_bigru": ModelConfig(image_encoder="resnet", text_encoder="bigru",
                                   resnet_arch="resnet152"),
    "bert": ModelConfig(image_encoder="regions", text_encoder="bert"),
}
