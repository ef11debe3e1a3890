"""Ranks in a score matrix without sorting it: the building block of every recall metric.

A query's ranking is its row (or column) of the matrix in descending order; among equal scores
the lower index comes first (a stable descending sort, as in dive.retrieval). The rank of an item
is then the number of items with a higher score plus the tied items before it, so one pass of
subtractions and sums over the matrix replaces a sort per query.
"""
import math

import numpy as np
import torch
from torch import Tensor

# Elements of one working block (64 MB in float32): few large ops, since on CPU the thread
# pool's synchronisation per op costs more than the cache misses, badly so on a busy machine.
BLOCK_ELEMENTS = 1 << 24


def check_scores(sim, name: str = "sim") -> Tensor:
    """`sim` as a 2-D floating tensor (numpy accepted); ValueError if it is not one or has
    NaN/inf."""
    if isinstance(sim, np.ndarray):
        sim = torch.from_numpy(sim)
    if not isinstance(sim, Tensor) or sim.dim() != 2 or not sim.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 2-D floating-point matrix, got "
                         f"{getattr(sim, 'dtype', type(sim).__name__)} "
                         f"{tuple(getattr(sim, 'shape', ()))}")
    # NaN and inf survive a sum, so a finite sum clears the whole matrix in one fast pass; the
    # elementwise check only runs to name the culprit or when the sum itself overflowed.
    if not math.isfinite(sim.sum().item()):
        bad = ~torch.isfinite(sim)
        if bad.any():
            i, j = bad.nonzero()[0].tolist()
            raise ValueError(f"{name} has {int(bad.sum())} NaN/inf entries, e.g. "
                             f"{name}[{i}, {j}] = {sim[i, j].item()}")
    return sim


def first_positive_ranks(sim: Tensor, positives, rows_are_queries: bool = True) -> list:
    """0-based rank of each query's first positive in its ranking, for several positive sets.

    positives: a list of (query, item) pairs of int64 index tensors, one per ground truth.
    Queries are rows (items columns) or, with rows_are_queries=False, columns. Returns one (Q,)
    int64 tensor per ground truth; a query without a positive gets the number of items (a miss
    at every K).
    """
    rows = rows_are_queries
    n_q, n_items = sim.shape if rows else sim.shape[::-1]
    work = torch.float64 if sim.dtype == torch.float64 else torch.float32
    # Float sums of +-1 are exact integers below 2**24 terms.
    acc = torch.float64 if n_items >= 1 << 24 else work
    dev = sim.device
    best, first = [], []
    for q, j in positives:
        score = (sim[q, j] if rows else sim[j, q]).to(work)
        top = torch.full((n_q,), math.inf, dtype=work, device=dev)
        top = top.scatter_reduce(0, q, score, "amax", include_self=False)
        at_top = score == top[q]
        lowest = torch.full((n_q,), n_items, dtype=torch.int64, device=dev)
        first.append(lowest.scatter_reduce(0, q[at_top], j[at_top], "amin"))
        best.append(top)
    thr = torch.stack(best)  # (G, Q): the score of each query's first positive
    first = torch.stack(first)  # (G, Q): its index

    # sign(s - t) summed gives (#above - #below), |sign| summed (#above + #below): both counts
    # in one pass over a block held in cache.
    signed = torch.zeros_like(thr, dtype=acc)
    nonzero = torch.zeros_like(thr, dtype=acc)
    step = max(1, BLOCK_ELEMENTS // max(1, sim.shape[1]))
    buf = torch.empty(min(step, sim.shape[0]), sim.shape[1], dtype=work, device=dev)
    for r0 in range(0, sim.shape[0], step):
        r1 = min(sim.shape[0], r0 + step)
        block, d = sim[r0:r1], buf[:r1 - r0]
        for g in range(len(thr)):
            if rows:
                torch.sub(block, thr[g, r0:r1, None], out=d)
                signed[g, r0:r1] = d.sign_().sum(1, dtype=acc)
                nonzero[g, r0:r1] = d.abs_().sum(1, dtype=acc)
            else:
                torch.sub(block, thr[g, None, :], out=d)
                signed[g] += d.sign_().sum(0, dtype=acc)
                nonzero[g] += d.abs_().sum(0, dtype=acc)
    ranks = ((signed + nonzero) / 2).long()
    tied = n_items - nonzero.long()  # includes the positive itself

    # Other items tied with the first positive precede it when their index is lower.
    g_idx, q_idx = (tied > 1).nonzero(as_tuple=True)
    lines = max(1, BLOCK_ELEMENTS // max(1, n_items))
    cols = torch.arange(n_items, device=dev)
    for c in range(0, len(q_idx), lines):
        g, q = g_idx[c:c + lines], q_idx[c:c + lines]
        vals = sim[q] if rows else sim[:, q].T
        ahead = (vals == thr[g, q, None]) & (cols < first[g, q, None])
        ranks[g, q] += ahead.sum(1)
    no_positive = torch.isinf(thr)
    ranks[no_positive] = n_items
    return list(ranks)
