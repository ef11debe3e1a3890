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
    # Where the paper's scripts differ from dive's defaults (the presets take the scripts'):
    block_norm: str = "post"            # aggregation block LayerNorms: "post" (after each
                                        # residual), "pre_final" (one on the output; the
                                        # scripts' --spm_pre_norm --spm_last_ln) or "pre" (none)
    word_positions: str = "index"       # bi-GRU word positions of the sine encoding: "index"
                                        # (0..L-1) or "normalized" ((1..L)/L*2pi, L the padded
                                        # length; the reference's)
    global_fc: bool = True              # a linear layer on the image's max-pooled global
                                        # feature (the scripts have none: --img_res_last_fc off)
    projection_dropout: float = 0.0     # dropout on the projected image regions (the scripts'
                                        # --img_1x1_dropout 0.1)
    # The reference's padding arithmetic, for its checkpoints ("official"): padded tokens take
    # 1/K of every slot's attention and enter the image BatchNorm statistics. "exact" (dive)
    # leaves padding out of both.
    padding: str = "exact"

    def __post_init__(self):
        choices = (("block_norm", ("post", "pre_final", "pre")),
                   ("word_positions", ("index", "normalized")), ("padding", ("exact", "official")))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.projection_dropout < 1.0:
            raise ValueError(f"projection_dropout must be in [0, 1), got "
                             f"{self.projection_dropout!r}")

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


# The paper's settings (DivE, CVPR 2023, and its reference code's COCO/F30K scripts, the same
# architecture for both datasets): pre-norm rounds with one final LayerNorm, normalised word
# positions, no linear layer on the image global feature, dropout 0.1 on the projected regions.
PAPER = dict(block_norm="pre_final", word_positions="normalized", global_fc=False,
             projection_dropout=0.1)
PRESETS = {
    "butd_bigru": ModelConfig(image_encoder="regions", text_encoder="bigru", **PAPER),
    "resnet152_bigru": ModelConfig(image_encoder="resnet", text_encoder="bigru",
                                   resnet_arch="resnet152", **PAPER),
    "bert": ModelConfig(image_encoder="regions", text_encoder="bert", **PAPER),
}
