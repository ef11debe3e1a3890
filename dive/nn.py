"""DivE's set prediction layers: slots that attend over tokens through `dive.ops.slot_attention`.

Initialisation: linear layers keep PyTorch's default (Kaiming-uniform weights, uniform biases);
learned slot queries are N(0, 1) like the reference code; the Gaussian slot initialisation's mean
and log-sigma are Xavier-uniform (gain 1). LayerNorms start at weight 1, bias 0.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import ops


def sine_positions(length: int, dim: int, *, device=None, dtype=torch.float32,
                   normalized: bool = False) -> Tensor:
    """(length, dim) 1-D sinusoidal encoding (Vaswani et al.): sin on even, cos on odd channels,
    channel pair c at frequency 10000^(-2c/dim).

    Positions are 0..length-1, or with `normalized` (the reference code's text encoding)
    (1..length) / (length + 1e-6) * 2*pi: the whole sequence spans one period of the slowest
    channel, whatever its length. Computed in float64 for float64, else in float32.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    pos = torch.arange(length, device=device, dtype=work)[:, None]
    if normalized:
        pos = (pos + 1) / (length + 1e-6) * (2 * math.pi)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=work)
                     * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=work)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[:dim // 2])
    return table.to(dtype)


BLOCK_NORMS = ("post", "pre_final", "pre")
POSITIONS = (None, "sine", "sine_normalized")
PADDINGS = ("exact", "official")


class SlotCrossAttention(nn.Module):
    """Multi-head slot cross-attention: slots query, tokens are keys and values (no biases on the
    projections, as in the paper); the heads are concatenated and projected back to `dim`.

    padding "exact" leaves padded tokens (key_mask False) out of every slot. "official" is the
    reference code's arithmetic, for its checkpoints: a padded token's logits are replaced by the
    same value for every slot, so the softmax over slots gives it 1/K of each slot's weight and
    its value enters the output. Zeroing its key does exactly that (every logit q.0 = 0).
    """

    def __init__(self, dim: int, token_dim: int, heads: int = 4, head_dim: int = 512,
                 dropout: float = 0.0, eps: float = 1e-7, backend: str = "auto",
                 padding: str = "exact"):
        super().__init__()
        self.heads, self.head_dim, self.eps, self.backend = heads, head_dim, eps, backend
        self.padding = padding
        self.scale = head_dim ** -0.5
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(token_dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(token_dim, heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:  # (B, L, H*d) -> (B, H, L, d)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, slots: Tensor, tokens: Tensor, key_mask: Optional[Tensor] = None,
                token_pos: Optional[Tensor] = None, return_weights: bool = False):
        q = self._split(self.to_q(slots))
        k = self._split(self.to_k(tokens if token_pos is None else tokens + token_pos))
        v = self._split(self.to_v(tokens))
        if self.padding == "official" and key_mask is not None:
            k = k * key_mask[:, None, :, None].to(k.dtype)
            key_mask = None
        out = ops.slot_attention(q, k, v, key_mask=key_mask, scale=self.scale, eps=self.eps,
                                 backend=self.backend)
        out = self.dropout(self.to_out(out.transpose(1, 2).flatten(2)))
        if not return_weights:
            return out
        with torch.no_grad():
            weights = ops.slot_attention_weights(q, k, key_mask=key_mask, scale=self.scale,
                                                 eps=self.eps)
        return out, weights


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(dim * mult, dim))


class AggregationRound(nn.Module):
    """The layers one round applies: [pre-LN slots and tokens -> cross-attention] and
    [pre-LN -> feed-forward]. Shared across rounds when the block shares weights."""

    def __init__(self, dim, token_dim, heads, head_dim, ff_mult, dropout, backend, padding):
        super().__init__()
        self.slot_norm = nn.LayerNorm(dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.attention = SlotCrossAttention(dim, token_dim, heads, head_dim, dropout,
                                            backend=backend, padding=padding)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout)


class AggregationBlock(nn.Module):
    """K slots gather a (B, N, token_dim) token sequence into a (B, K, dim) set.

    Each of `depth` rounds: slots += attention(LN(slots), LN(tokens)); [slots = LN(slots)];
    slots += FF(LN(slots)); [slots = LN(slots)]. The bracketed post-LayerNorms and a final one
    depend on `block_norm`:
        "post"      LN after each residual, no final LN (the reference's --spm_post_norm);
        "pre_final" no LN after the residuals, one LN on the output (the paper's scripts:
                    --spm_pre_norm --spm_last_ln);
        "pre"       neither (--spm_pre_norm alone).
    With `share_weights` (the paper) every round uses the same attention and feed-forward
    layers; the post-LayerNorms are per round either way.

    Args:
        slot_init: "learned" (K learned queries) or "gaussian" (slots drawn per sample from
            N(mean, exp(log_sigma)^2) with learned mean and log-sigma; also drawn in eval mode, so
            pass a `generator` to forward for repeatable outputs).
        positions: None (regions), "sine" (words at 0..N-1) or "sine_normalized" (words at
            (1..N)/N*2pi, the reference's; N is the padded length): a 1-D sine encoding added to
            the tokens that form the keys (not the values).
        padding: "exact" or "official" (see SlotCrossAttention).
        backend: the slot_attention backend ("auto" picks the fastest; "torch" = reference).
    """

    def __init__(self, dim: int, token_dim: int, num_slots: int = 4, depth: int = 4,
                 heads: int = 4, head_dim: int = 512, ff_mult: int = 4, dropout: float = 0.0,
                 share_weights: bool = True, slot_init: str = "learned",
                 positions: Optional[str] = None, backend: str = "auto",
                 block_norm: str = "post", padding: str = "exact"):
        super().__init__()
        if slot_init not in ("learned", "gaussian"):
            raise ValueError(f"slot_init must be 'learned' or 'gaussian', got {slot_init!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if block_norm not in BLOCK_NORMS:
            raise ValueError(f"block_norm must be one of {BLOCK_NORMS}, got {block_norm!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if num_slots < 1 or depth < 1:
            raise ValueError(f"num_slots and depth must be >= 1, got {num_slots} and {depth}")
        self.dim, self.token_dim, self.num_slots = dim, token_dim, num_slots
        self.slot_init, self.positions, self.block_norm = slot_init, positions, block_norm
        if slot_init == "learned":
            self.slots = nn.Parameter(torch.randn(num_slots, dim))
        else:
            self.slot_mean = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, dim)))
            self.slot_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, dim)))
        make = lambda: AggregationRound(dim, token_dim, heads, head_dim, ff_mult, dropout,  # noqa: E731
                                        backend, padding)
        if share_weights:
            self.rounds = nn.ModuleList([make()] * depth)
        else:
            self.rounds = nn.ModuleList([make() for _ in range(depth)])
        post = block_norm == "post"
        self.attention_norms = nn.ModuleList(
            [nn.LayerNorm(dim) if post else nn.Identity() for _ in range(depth)])
        self.ff_norms = nn.ModuleList(
            [nn.LayerNorm(dim) if post else nn.Identity() for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim) if block_norm == "pre_final" else nn.Identity()

    def initial_slots(self, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.slot_init == "learned":
            return self.slots.expand(batch, -1, -1)
        noise = torch.randn(batch, self.num_slots, self.dim, generator=generator,
                            device=self.slot_mean.device, dtype=self.slot_mean.dtype)
        return self.slot_mean + self.slot_log_sigma.exp() * noise

    def forward(self, tokens: Tensor, key_mask: Optional[Tensor] = None, *,
                return_attention: bool = False, generator: Optional[torch.Generator] = None):
        """tokens (B, N, token_dim), key_mask bool (B, N) True = real token -> (B, K, dim) and,
        with return_attention, the list of per-round (B, heads, K, N) attention weights."""
        if tokens.dim() != 3 or tokens.shape[2] != self.token_dim:
            raise ValueError(f"tokens must have shape (B, N, {self.token_dim}), got "
                             f"{tuple(tokens.shape)}")
        pos = None
        if self.positions is not None:
            pos = sine_positions(tokens.shape[1], self.token_dim, device=tokens.device,
                                 dtype=tokens.dtype,
                                 normalized=self.positions == "sine_normalized")
        slots = self.initial_slots(tokens.shape[0], generator).to(tokens.dtype)
        maps = []
        for layers, attn_norm, ff_norm in zip(self.rounds, self.attention_norms, self.ff_norms):
            update = layers.attention(layers.slot_norm(slots), layers.token_norm(tokens),
                                      key_mask, pos, return_attention)
            if return_attention:
                update, weights = update
                maps.append(weights)
            slots = attn_norm(slots + update)
            slots = ff_norm(slots + layers.ff(layers.ff_norm(slots)))
        slots = self.final_norm(slots)
        return (slots, maps) if return_attention else slots


class SetPrediction(NamedTuple):
    sets: Tensor                  # (B, K, dim): slots + LayerNorm(global feature)
    slots: Tensor                 # (B, K, dim): the aggregation block's output alone
    attention: Optional[list]     # per-round (B, heads, K, N) weights, when asked for


class SetPredictionModule(nn.Module):
    """DivE's set prediction: an AggregationBlock over local features plus a residual global
    feature (LayerNorm(global) added to every slot), giving a (B, K, dim) set.

    The global feature (e.g. max-pooled local features through a linear layer) is the caller's:
    it differs between image and text encoders. Pass None to use the slots alone. Returns a
    SetPrediction; `.slots` is what the reference code calls the residual branch (its
    uniformity loss may use it).
    """

    def __init__(self, dim: int, token_dim: int, **block_args):
        super().__init__()
        self.block = AggregationBlock(dim, token_dim, **block_args)
        self.global_norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, global_feature: Optional[Tensor] = None,
                key_mask: Optional[Tensor] = None, *, return_attention: bool = False,
                generator: Optional[torch.Generator] = None) -> SetPrediction:
        result = self.block(tokens, key_mask, return_attention=return_attention,
                            generator=generator)
        slots, maps = result if return_attention else (result, None)
        sets = slots
        if global_feature is not None:
            if global_feature.shape != (tokens.shape[0], self.block.dim):
                raise ValueError(f"global_feature must have shape ({tokens.shape[0]}, "
                                 f"{self.block.dim}), got {tuple(global_feature.shape)}")
            sets = slots + self.global_norm(global_feature)[:, None, :]
        return SetPrediction(sets, slots, maps)


__all__ = ["AggregationBlock", "SetPrediction", "SetPredictionModule", "SlotCrossAttention",
           "sine_positions"]
