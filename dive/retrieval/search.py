"""The whole score matrix in blocks and the exact streamed top-k over a gallery.

Ties rank by position: among equal scores the lower gallery index comes first, the order of a
stable descending sort. Every function here (and dive.eval) follows that rule.
"""
import os
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from ..checks import bool_mask, mask_rows_nonempty
from ..ops import smooth_chamfer

# The most bytes one block of scores takes on CPU; on CUDA a block takes up to a quarter of the
# free device memory. The op's own workspace is bounded separately (dive.ops.smooth_chamfer).
BLOCK_BYTES = 64 << 20
SET_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
# Rows named in a non-finite error before "...".
SHOWN_ROWS = 10


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def block_budget(device: torch.device) -> int:
    """Bytes one block of float32 scores may take on `device`."""
    free = _free_bytes(device) // 4
    return free if device.type == "cuda" else min(BLOCK_BYTES, free)


def _dtype(name, dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = SET_DTYPES.get(dtype, dtype)
    if dtype not in SET_DTYPES.values():
        raise ValueError(f"{name} must be one of {sorted(SET_DTYPES)}, got {dtype!r}")
    return dtype


def check_sets(name: str, sets, mask=None, *, finite: bool = True) -> Tensor:
    """`sets` unchanged; ValueError naming `name` unless it is an (N, set_size, D) float tensor
    and (with `finite`) every real element (mask True; all without a mask) is finite. The error
    lists the rows (sets) that hold NaN or inf, so that a caller can prefix a file name:
    "img.npy: ..."."""
    if not isinstance(sets, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(sets).__name__}")
    if sets.dim() != 3:
        raise ValueError(f"{name} must have shape (N, set_size, D), got {tuple(sets.shape)}")
    if sets.dtype not in SET_DTYPES.values():
        raise ValueError(f"{name} has dtype {sets.dtype}; supported: {sorted(SET_DTYPES)}")
    if not finite:
        return sets
    # NaN and inf survive a sum, so a finite sum clears the sets in one pass; the elementwise
    # check runs to name the rows, or when padding or the sum itself is not finite.
    if not len(sets) or torch.isfinite(sets.sum(dtype=torch.float64)):
        return sets
    bad = ~torch.isfinite(sets).all(2)
    if mask is not None:
        bad &= mask.to(bad.device)
    rows = bad.any(1).nonzero().flatten()
    if len(rows):
        listed = ", ".join(map(str, rows[:SHOWN_ROWS].tolist()))
        more = ", ..." if len(rows) > SHOWN_ROWS else ""
        raise ValueError(f"{name} holds NaN or inf in {len(rows)} of its {len(sets)} sets "
                         f"(rows {listed}{more})")
    return sets


def check_mask(name: str, mask, sets: Tensor) -> Optional[Tensor]:
    """`mask` (None, or a bool (N, set_size) tensor, True = real element, one per set) on sets'
    device; ValueError naming `name` otherwise. Checked whole, before any blocking."""
    if mask is None:
        return None
    bool_mask(name, mask, tuple(sets.shape[:2]), None, "(N, set_size)")
    mask_rows_nonempty(name, mask, element="real element")
    return mask.to(sets.device)


def similarity_matrix(x: Tensor, y: Tensor, *, temperature: float = 16.0,
                      denominator: float = 2.0, x_mask: Optional[Tensor] = None,
                      y_mask: Optional[Tensor] = None, out_device=None, dtype=None,
                      backend: str = "auto", progress: bool = False) -> Tensor:
    """The whole (NX, NY) smooth-Chamfer matrix, computed on x's device in blocks of x rows.

    Blocks are sized to the free memory of that device (see `block_budget`), so the matrix can
    go to `out_device` (e.g. "cpu" from a GPU) without ever being whole on the device; the op
    never forms the (NX*m x NY*n) cosine grid. `dtype` casts the sets first (e.g. torch.bfloat16
    on a GPU); the matrix is float32. NaN or inf in a real element of x or y is a ValueError
    naming the sets.
    """
    dtype = _dtype("dtype", dtype)
    x_mask, y_mask = check_mask("x_mask", x_mask, x), check_mask("y_mask", y_mask, y)
    check_sets("x", x, finite=False)
    check_sets("y", y, finite=False)
    if dtype is not None:
        x, y = x.to(dtype), y.to(dtype)
    # After the cast, which can overflow to inf.
    check_sets("x", x, x_mask)
    check_sets("y", y, y_mask)
    device = x.device
    out_device = device if out_device is None else torch.device(out_device)
    if out_device.type == "cuda" and out_device.index is None:
        out_device = torch.device("cuda", torch.cuda.current_device())
    kw = dict(temperature=temperature, denominator=denominator, y_mask=y_mask, backend=backend)
    nx, ny = x.shape[0], y.shape[0]
    rows = max(1, block_budget(device) // max(1, 4 * ny))
    if rows >= nx and out_device == device:
        return smooth_chamfer(x, y, x_mask=x_mask, **kw)
    if out_device.type == "cuda" and 4 * nx * ny > _free_bytes(out_device):
        raise ValueError(f"the ({nx}, {ny}) float32 matrix does not fit in the free memory of "
                         f"{out_device}: pass out_device='cpu'")
    pin = device.type == "cuda" and out_device.type == "cpu"
    out = torch.empty(nx, ny, dtype=torch.float32, device=out_device, pin_memory=pin)
    for a0 in tqdm(range(0, nx, rows), desc="similarity", unit="block", disable=not progress,
                   leave=False):
        a1 = min(nx, a0 + rows)
        block = smooth_chamfer(x[a0:a1], y, x_mask=None if x_mask is None else x_mask[a0:a1],
                               **kw)
        out[a0:a1].copy_(block, non_blocking=pin)
    if pin:
        torch.cuda.synchronize(device)
    return out


def stable_topk(scores: Tensor, k: int):
    """Top-k of each row of a 2-D score matrix, best first, ties to the lower column.

    Exactly the first k columns of a stable descending sort, at the cost of one torch.topk:
    topk(k + 1) tells which rows have ties across the cut, and only those rows are redone.
    Returns (values, column indices), both (rows, k).
    """
    n = scores.shape[1]
    vals, idx = scores.topk(min(k + 1, n), dim=1)
    straddle = vals[:, k] == vals[:, k - 1] if n > k else None
    vals, idx = vals[:, :k], idx[:, :k]
    if straddle is not None and straddle.any():
        # topk picks among the items tied with the k-th value arbitrarily: take the lowest columns.
        rows = straddle.nonzero().squeeze(1)
        sub, kth = scores[rows], vals[rows, k - 1:]
        need = k - (sub > kth).sum(1, keepdim=True)
        tied = sub == kth
        take = (sub > kth) | (tied & (tied.cumsum(1) <= need))
        idx[rows] = take.nonzero()[:, 1].view(len(rows), k)
        vals[rows] = sub.gather(1, idx[rows])
    idx, order = idx.sort(1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def check_k(k, n):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int between 1 and the gallery size {n}, got {k!r}")


def topk(queries: Tensor, gallery: Tensor, k: int, *, temperature: float = 16.0,
         denominator: float = 2.0, query_mask: Optional[Tensor] = None,
         gallery_mask: Optional[Tensor] = None, block: Optional[int] = None,
         backend: str = "auto"):
    """Exact top-k gallery sets for each query set, streamed over blocks of the gallery.

    Only a (queries x block) slab of scores exists at a time, merged into the running top-k, so
    a gallery whose full score matrix would not fit in memory works. `block`: gallery sets per
    step (default: sized to the free memory, see `block_budget`). NaN or inf in a real element
    of the queries or the gallery is a ValueError naming the sets.
    Returns (scores (Q, k) float32, gallery indices (Q, k) int64), best first.
    """
    gallery_mask = check_mask("gallery_mask", gallery_mask, gallery)
    check_sets("gallery", gallery, gallery_mask)
    return checked_gallery_topk(queries, gallery, k, temperature=temperature,
                                denominator=denominator, query_mask=query_mask,
                                gallery_mask=gallery_mask, block=block, backend=backend)


def checked_gallery_topk(queries, gallery, k, *, temperature=16.0, denominator=2.0,
                         query_mask=None, gallery_mask=None, block=None, backend="auto"):
    """`topk` for a gallery and gallery_mask already checked (a SetIndex's)."""
    query_mask = check_mask("query_mask", query_mask, queries)
    check_sets("queries", queries, query_mask)
    nq, ng = queries.shape[0], gallery.shape[0]
    check_k(k, ng)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int or None, got {block!r}")
    # A slab of scores and its concatenation with the running top-k take at most the budget.
    budget = block_budget(queries.device) // 8
    q_rows = max(1, min(nq, budget // (k + min(ng, 1024))))
    g_step = block or max(1, budget // q_rows - k)
    kw = dict(temperature=temperature, denominator=denominator, backend=backend)
    scores = torch.empty(nq, k, dtype=torch.float32, device=queries.device)
    index = torch.empty(nq, k, dtype=torch.int64, device=queries.device)
    for q0 in range(0, nq, q_rows):
        q1 = min(nq, q0 + q_rows)
        qm = None if query_mask is None else query_mask[q0:q1]
        best = best_idx = None
        for g0 in range(0, ng, g_step):
            g1 = min(ng, g0 + g_step)
            s = smooth_chamfer(queries[q0:q1], gallery[g0:g1], x_mask=qm,
                               y_mask=None if gallery_mask is None else gallery_mask[g0:g1], **kw)
            kept = 0 if best is None else best.shape[1]
            if kept:
                # The running top-k holds lower indices than this block and keeps ties in index
                # order, so position order is index order among equal scores.
                s = torch.cat([best, s], 1)
            best, pos = stable_topk(s, min(k, s.shape[1]))
            from_block = pos - kept + g0
            best_idx = from_block if not kept else torch.where(
                pos < kept, best_idx.gather(1, pos.clamp(max=kept - 1)), from_block)
        scores[q0:q1], index[q0:q1] = best, best_idx
    return scores, index
