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
    """Local features (B, N, D) -> SetPrediction with an L2-normalised (B, K, D) set: slots over
    the local features plus a residual global feature (max-pooled local features -> linear; the
    set prediction module adds it through a LayerNorm)."""

    def __init__(self, config, positions=None):
        super().__init__()
        d = config.embed_dim
        self.global_fc = nn.Linear(d, d)
        self.spm = SetPredictionModule(
            d, d, num_slots=config.num_slots, depth=config.depth, heads=config.heads,
            head_dim=config.head_dim, ff_mult=config.ff_mult, dropout=config.dropout,
            share_weights=config.share_weights, slot_init=config.slot_init, positions=positions)

    def forward(self, local: Tensor, mask: Optional[Tensor] = None,
                return_attention: bool = False) -> SetPrediction:
        glob = self.global_fc(masked_max(local, mask))
        out = self.spm(local, glob, mask, return_attention=return_attention)
        return out._replace(sets=F.normalize(out.sets, dim=-1))
