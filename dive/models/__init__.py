"""The DivE model: image and text encoders that each return a set of K L2-normalised embeddings."""
from .config import PRESETS, ModelConfig
from .dive import DivE
from .image import RegionEncoder, ResNetEncoder
from .official import convert_official, load_official
from .text import BertTextEncoder, GRUTextEncoder

__all__ = ["PRESETS", "BertTextEncoder", "DivE", "GRUTextEncoder", "ModelConfig",
           "RegionEncoder", "ResNetEncoder", "convert_official", "load_official"]
