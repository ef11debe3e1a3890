"""DivE: an image encoder and a text encoder, each giving a set of K L2-normalised embeddings."""
from typing import Optional

from torch import Tensor, nn

from .config import ModelConfig
from .image import RegionEncoder, ResNetEncoder
from .text import BertTextEncoder, GRUTextEncoder


class DivE(nn.Module):
    """`encode_images` and `encode_captions` return (B, K, D) sets; compare them with
    `dive.ops.smooth_chamfer`. `vocab` (with `len()` and `.words`) is needed for the bi-GRU."""

    def __init__(self, config: ModelConfig, vocab=None):
        super().__init__()
        self.config = config
        if config.image_encoder == "regions":
            self.image_encoder = RegionEncoder(config)
        elif config.image_encoder == "resnet":
            self.image_encoder = ResNetEncoder(config)
        else:
            raise ValueError(f"image_encoder must be 'regions' or 'resnet', got "
                             f"{config.image_encoder!r}")
        if config.text_encoder == "bigru":
            if vocab is None:
                raise ValueError("text_encoder='bigru' needs the vocabulary")
            self.text_encoder = GRUTextEncoder(config, len(vocab), vocab)
        elif config.text_encoder == "bert":
            self.text_encoder = BertTextEncoder(config)
        else:
            raise ValueError(f"text_encoder must be 'bigru' or 'bert', got "
                             f"{config.text_encoder!r}")

    def encode_images(self, images: Tensor, mask: Optional[Tensor] = None,
                      return_attention: bool = False):
        """(B, K, D) sets; with return_attention, (sets, per-round attention weights)."""
        out = self.image_encoder(images, mask, return_attention)
        return (out.sets, out.attention) if return_attention else out.sets

    def encode_captions(self, ids: Tensor, mask: Tensor, return_attention: bool = False):
        """(B, K, D) sets; with return_attention, (sets, per-round attention weights)."""
        out = self.text_encoder(ids, mask, return_attention)
        return (out.sets, out.attention) if return_attention else out.sets

    def forward(self, images, image_mask, captions, caption_mask):
        """(image SetPrediction, caption SetPrediction) for training: the sets and the slots
        before the global feature (which the uniformity loss may use)."""
        return (self.image_encoder(images, image_mask),
                self.text_encoder(captions, caption_mask))
