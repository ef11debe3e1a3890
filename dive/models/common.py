"""Pieces both encoders share: masked max-pooling and the set head."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import SetPrediction, SetPredictionModule


def masked_max(tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(B, N, C) -> (B, C): max over the real tokens only."""
    if mask is None:
        return tokens.max(dim=1).values
    lowest = torch.finfo(tokens.dtype).min
    return tokens.masked_fill(~mask[..., None], lowest).max(dim=1).values


class SetHead(nn.Module):
    """Local tokens (B, N, token_dim) and a global feature (B, D) -> SetPrediction with an
    L2-normalised (B, K, D) set: slots over the tokens plus the global feature (through the set
    prediction module's LayerNorm). Each encoder forms its own global feature."""

    def __init__(self, config, token_dim: int, positions=None):
        super().__init__()
        self.spm = SetPredictionModule(
            config.embed_dim, token_dim, num_slots=config.num_slots, depth=config.depth,
            heads=config.heads, head_dim=config.head_dim, ff_mult=config.ff_mult,
            dropout=config.dropout, share_weights=config.share_weights,
            slot_init=config.slot_init, positions=positions, block_norm=config.block_norm,
            padding=config.padding)

    def forward(self, local: Tensor, global_feature: Tensor, mask: Optional[Tensor] = None,
                return_attention: bool = False) -> SetPrediction:
        out = self.spm(local, global_feature, mask, return_attention=return_attention)
        return out._replace(sets=F.normalize(out.sets, dim=-1))
