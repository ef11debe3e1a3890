"""ECCV Caption, CxC and COCO 1K/5K metrics from a score matrix over the COCO 5K test split.

The same numbers as `eccv_caption.Metrics().compute_all_metrics` (with target_metrics
eccv_r1, eccv_map_at_r, eccv_rprecision, coco_1k_recalls, coco_5k_recalls, cxc_recalls and
Ks=(1, 5, 10)) given the full rankings of the matrix, ties to the lower index, computed with
whole-matrix tensor operations instead of per-query Python loops. Every metric needs only each
query's first max(R, 10) items (R: its number of positives), and the COCO 1K folds its first 10
items within its own fold (a fold's ranking is the whole line's without the other folds' items).
`top_rows_and_columns` finds all of these exactly without ranking whole lines: on CPU in one
native pass over the matrix for both directions (csrc/top_lines_cpu.cpp), elsewhere from group
maxima. The ground truth is the one the `eccv-caption` package ships
(`pip install 'dive[eval]'`); its data files are read directly.
"""
import functools
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import _native, checks
from ..ops._native_args import ptr
from ..retrieval import stable_topk
from .ranks import check_scores

KS = (1, 5, 10)
FOLDS = 5


class _Positives:
    """One ground truth in one direction: query ids and their positive ids, in CSR form."""

    def __init__(self, queries: np.ndarray, offsets: np.ndarray, items: np.ndarray):
        self.queries, self.offsets, self.items = queries, offsets, items
        self._at = None

    def at(self, query_ids: np.ndarray) -> np.ndarray:
        """Entry of each of `query_ids` (-1 where it is not a query here)."""
        if self._at is None:
            self._at = _Lookup(self.queries)
        return self._at(query_ids)

    @classmethod
    def from_table(cls, table: dict) -> "_Positives":
        sizes = np.fromiter((len(v) for v in table.values()), dtype=np.int64, count=len(table))
        items = np.fromiter((i for v in table.values() for i in v), dtype=np.int64,
                            count=int(sizes.sum()))
        return cls(np.fromiter(table, dtype=np.int64, count=len(table)),
                   np.concatenate([[0], np.cumsum(sizes)]), items)

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def pairs(self):
        """(query position, positive id) for every positive."""
        return np.repeat(np.arange(len(self.queries)), self.counts()), self.items

    def subset(self, query_ids: np.ndarray) -> "_Positives":
        """The entries of `query_ids` (all of which must be queries here)."""
        at = self.at(query_ids)
        sizes = self.counts()[at]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        # Position of every kept positive: its entry's start plus its rank within the entry.
        flat = np.repeat(self.offsets[at] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return _Positives(query_ids, offsets, self.items[flat])

    def first(self, query_ids: np.ndarray) -> np.ndarray:
        """The first positive of each of `query_ids` (the package's owner image of a caption)."""
        return self.items[self.offsets[self.at(query_ids)]]


class _Lookup:
    """Position of each id in `ids`; -1 for ids not there."""

    def __init__(self, ids: np.ndarray):
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]

    def __len__(self) -> int:
        return len(self.sorted)

    def __call__(self, query: np.ndarray) -> np.ndarray:
        if not len(self.sorted):
            return np.full(len(query), -1, dtype=np.int64)
        at = np.searchsorted(self.sorted, query).clip(max=len(self.sorted) - 1)
        return np.where(self.sorted[at] == query, self.order[at], -1)


@functools.lru_cache(maxsize=1)
def ground_truth() -> dict:
    """{"coco"|"cxc"|"eccv": {"i2t"|"t2i": _Positives}, "caption_order": the 25,000 COCO 5K
    caption ids in the package's order (its 1K folds are consecutive fifths of it)}."""
    spec = importlib.util.find_spec("eccv_caption")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("eccv_metrics needs the ground truth of the eccv-caption package: "
                          "pip install 'dive[eval]' (or pip install eccv_caption)")
    data = Path(spec.submodule_search_locations[0]) / "data"
    gt = {}
    for name, stem in (("coco", "original"), ("cxc", "cxc"), ("eccv", "eccv")):
        gt[name] = {}
        for direction, file in (("i2t", "image_to_caption"), ("t2i", "caption_to_image")):
            with open(data / f"{stem}_{file}.json") as fh:
                # The package scores against set(positives): duplicates count once.
                table = {int(k): list(dict.fromkeys(int(v) for v in vs))
                         for k, vs in json.load(fh).items()}
            gt[name][direction] = _Positives.from_table(table)
    gt["caption_order"] = np.load(data / "coco_test_ids.npy").astype(np.int64)
    return gt


def package_order_ids() -> tuple:
    """(image_ids (5,000,), caption_ids (25,000,)): COCO ids of the 5K test split in the order
    the eccv-caption package lists its captions (coco_test_ids.npy; SCAN's `testall` order, five
    consecutive captions per image) and their images in that order. The ids of a split that
    follows this order, e.g. for `dive evaluate --eccv`."""
    gt = ground_truth()
    captions = gt["caption_order"]
    owners = gt["coco"]["t2i"].first(captions).reshape(-1, 5)
    if not (owners == owners[:, :1]).all():
        raise ValueError("the eccv-caption caption order does not group five captions per "
                         "image; pass the ids explicitly")
    return owners[:, 0].copy(), captions.copy()


def _as_ids(ids, n: int, name: str, what: str) -> np.ndarray:
    ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"{name} must be a 1-D sequence of int ids, got {ids.dtype} "
                         f"{ids.shape}")
    if len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} ids but sim has {n} {what}s")
    ids = ids.astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ValueError(f"{name} has duplicates, e.g. {uniq[counts > 1][0]}")
    return ids


def _check_split(ids: np.ndarray, known: np.ndarray, name: str, what: str) -> None:
    """The ids must be exactly the split's: the package has no ranking for a missing query."""
    unknown = ~np.isin(ids, known)
    if unknown.any():
        raise ValueError(f"{name}: {int(unknown.sum())} ids are absent from the ground truth "
                         f"(COCO 5K test {what}s), e.g. {ids[unknown][0]}")
    missing = ~np.isin(known, ids)
    if missing.any():
        raise ValueError(f"{name}: {int(missing.sum())} of the {len(known)} COCO 5K test "
                         f"{what}s are missing, e.g. {known[missing][0]}; the protocol needs "
                         "all of them")


def top_items(sim: Tensor, k: int, rows_are_queries: bool = True) -> Tensor:
    """(Q, k) indices of each query's k best items, best first, ties to the lower index (the
    first k of a stable descending sort), without ranking whole lines. Queries are the rows of
    `sim` (items its columns) or, with rows_are_queries=False, its columns."""
    n_lines = sim.shape[0] if rows_are_queries else sim.shape[1]
    n_items = sim.shape[1] if rows_are_queries else sim.shape[0]
    k = torch.full((n_lines,), min(k, n_items), dtype=torch.long, device=sim.device)
    return top_lines(sim, k, rows_are_queries)


# Groups the native pass takes in top_rows_and_columns (more: one sub-matrix at a time).
MAX_NATIVE_GROUPS = 64
# Items per group: a query's candidates are the DEPTH items of about k groups.
DEPTH = 8


def top_lines(sim: Tensor, k: Tensor, rows_are_queries: bool = True) -> Tensor:
    """(Q, max(k)) indices of each query line's k[q] best items, best first, ties to the lower
    index; -1 past its own k[q]. k: (Q,) int64, each in 1..items. Queries are the rows of `sim`
    (items its columns) or, with rows_are_queries=False, its columns."""
    if rows_are_queries:
        return top_rows_and_columns(sim, k, None)[0]
    return top_rows_and_columns(sim, None, k)[1]


def top_rows_and_columns(sim: Tensor, row_k, col_k, groups=None) -> tuple:
    """(top_lines(sim, row_k, True), top_lines(sim, col_k, False)); a direction whose k is None
    gives None. groups=(row_group, col_group, k) adds each row's k best columns of its own group
    and each column's k best rows of its own group ((rows, k) and (cols, k) in the same form;
    row i and column j share a group when row_group[i] == col_group[j]). On CPU (float32 or
    float64, dive._C built) one pass over the matrix serves all four."""
    _check_k(row_k, sim.shape[0], sim.shape[1], "row_k")
    _check_k(col_k, sim.shape[1], sim.shape[0], "col_k")
    if groups is not None:
        _check_groups(groups, sim.shape)
    module = _native.cpu_module()
    if module is not None and sim.device.type == "cpu" and sim.dtype in (torch.float32,
                                                                          torch.float64):
        return _native_top(module, sim, row_k, col_k, groups)
    tops = (None if row_k is None else _grouped_top_lines(sim, row_k, True),
            None if col_k is None else _grouped_top_lines(sim, col_k, False))
    return tops if groups is None else tops + _tops_in_groups(sim, *groups)


def _check_k(k, n_lines: int, n_items: int, name: str) -> None:
    if k is None:
        return
    if not isinstance(k, Tensor) or k.dtype != torch.long or k.shape != (n_lines,):
        raise ValueError(f"{name}: k must be an int64 tensor of shape ({n_lines},), got "
                         f"{getattr(k, 'dtype', type(k).__name__)} "
                         f"{tuple(getattr(k, 'shape', ()))}")
    if n_lines and not (1 <= int(k.min()) and int(k.max()) <= n_items):
        raise ValueError(f"{name}: k must be in 1..{n_items} (the items of a line), got "
                         f"{int(k.min())}..{int(k.max())}")


def _check_groups(groups, shape) -> None:
    if len(groups) != 3:
        raise ValueError("groups must be (row_group, col_group, k)")
    for g, n, name in ((groups[0], shape[0], "row_group"), (groups[1], shape[1], "col_group")):
        if not isinstance(g, Tensor) or g.dtype.is_floating_point or g.shape != (n,):
            raise ValueError(f"groups: {name} must be an integer tensor of shape ({n},), got "
                             f"{getattr(g, 'dtype', type(g).__name__)} "
                             f"{tuple(getattr(g, 'shape', ()))}")
    checks.count("groups: k", groups[2])


def _native_top(module, sim: Tensor, row_k, col_k, groups) -> tuple:
    a = sim.detach()
    if a.stride(1) != 1 or a.stride(0) < a.shape[1]:
        a = a.contiguous()
    row_group = col_group = group_k = None
    n_groups = 0
    if groups is not None:
        ids, index = torch.unique(torch.cat([groups[0], groups[1]]).long(), return_inverse=True)
        if len(ids) > MAX_NATIVE_GROUPS:  # the native pass keeps an offset per group and column
            return _native_top(module, a, row_k, col_k, None) + _tops_in_groups(a, *groups)
        row_group, col_group = index[:a.shape[0]], index[a.shape[0]:]
        n_groups, group_k = len(ids), groups[2]
    ks = [row_k, col_k,
          None if groups is None else torch.full((a.shape[0],), group_k, dtype=torch.long),
          None if groups is None else torch.full((a.shape[1],), group_k, dtype=torch.long)]
    ks = [None if k is None else k.contiguous() for k in ks]
    tops = [None if k is None else torch.empty(len(k), int(k.max()) if len(k) else 0,
                                               dtype=torch.long) for k in ks]
    requests = []
    for k, top in zip(ks, tops):
        requests += [ptr(k), 0 if top is None else top.shape[1], ptr(top)]
    module.top_lines(a.data_ptr(), a.dtype == torch.float64, a.shape[0], a.shape[1],
                     a.stride(0), *requests[:6], ptr(row_group), ptr(col_group), n_groups,
                     *requests[6:])
    return tuple(tops[:2]) if groups is None else tuple(tops)


def _tops_in_groups(sim: Tensor, row_group: Tensor, col_group: Tensor, k: int) -> tuple:
    """The group lists of top_rows_and_columns, one group's sub-matrix at a time."""
    dev = sim.device
    row_group, col_group = row_group.to(dev), col_group.to(dev)
    row_top = torch.full((sim.shape[0], k), -1, dtype=torch.long, device=dev)
    col_top = torch.full((sim.shape[1], k), -1, dtype=torch.long, device=dev)
    for g in torch.unique(torch.cat([row_group, col_group])).tolist():
        rows = (row_group == g).nonzero().squeeze(1)
        cols = (col_group == g).nonzero().squeeze(1)
        if len(rows) == 0 or len(cols) == 0:
            continue
        sub = sim[rows[:, None], cols[None, :]]
        for lines, items, top, rows_are_queries in ((rows, cols, row_top, True),
                                                    (cols, rows, col_top, False)):
            width = min(k, len(items))
            found = _grouped_top_lines(sub, torch.full((len(lines),), width, device=dev),
                                       rows_are_queries)
            top[lines, :width] = items[found]
    return row_top, col_top


def _grouped_top_lines(sim: Tensor, k: Tensor, rows_are_queries: bool) -> Tensor:
    """top_lines without the native pass (other devices and dtypes). The items are dealt into
    G groups (item i into group i mod G, about DEPTH items each), and those groups into coarser
    ones. The k-th largest coarse maximum of a line is at most its
    k-th best score (the k coarse groups that reach it each hold an item that does), and every
    item at or above it lies in a group whose maximum is too. So one elementwise pass of
    maxima, a top-k over the coarse maxima, and an exact stable top-k over the items of the
    few groups that reach the threshold give the top items without ranking whole lines.
    """
    rows = rows_are_queries
    n_lines, n_items = (sim.shape[0], sim.shape[1]) if rows else (sim.shape[1], sim.shape[0])
    dev = sim.device
    k_max = int(k.max()) if len(k) else 0
    if n_lines == 0 or k_max == 0:
        return torch.full((n_lines, k_max), -1, dtype=torch.long, device=dev)
    g = min(n_items, max(n_items // DEPTH, k_max))
    depth = -(-n_items // g)
    fine = _strided_maxima(sim, g, rows)  # items along dim 1 for rows, dim 0 for columns
    coarse = _strided_maxima(fine, max(g // DEPTH, k_max), rows)
    if not rows:
        coarse = coarse.T
    tau = coarse.topk(k_max, dim=1).values.gather(1, (k - 1)[:, None]).squeeze(1)
    if rows:
        line, group = (fine >= tau[:, None]).nonzero(as_tuple=True)  # by line, then group
    else:
        # (group, line) order reads the matrix row after row below; then by line, stably.
        group, line = (fine >= tau[None, :]).nonzero(as_tuple=True)
    items = group + g * torch.arange(depth, device=dev)[:, None]  # (depth, pairs)
    valid = items < n_items
    items.clamp_(max=n_items - 1)
    values = _entries(sim, line, items) if rows else _entries(sim, items, line)
    values.masked_fill_(~valid, -math.inf)
    if not rows:
        order = _stable_argsort(line, n_lines)
        line, items, values = line[order], items[:, order], values[:, order]
    # Each line's candidates as one padded row, (Q, depth, groups): flattened, its items
    # ascend (item = group + G * step), so a stable top-k breaks ties to the lower index.
    counts = torch.bincount(line, minlength=n_lines)
    slot = torch.arange(len(line), device=dev) - (counts.cumsum(0) - counts)[line]
    width = int(counts.max())
    pad_v = torch.full((n_lines, depth, width), -math.inf, dtype=sim.dtype, device=dev)
    pad_v.permute(0, 2, 1)[line, slot] = values.T
    pad_i = torch.full((n_lines, depth, width), -1, dtype=torch.long, device=dev)
    pad_i.permute(0, 2, 1)[line, slot] = items.T
    best = stable_topk(pad_v.flatten(1), min(k_max, depth * width))[1]
    top = pad_i.flatten(1).gather(1, best)
    top[torch.arange(k_max, device=dev)[None, :] >= k[:, None]] = -1
    return top


def _entries(sim: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """sim[r, c] for broadcast index tensors (numpy's flat take on CPU: about twice as fast)."""
    if sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64):
        a = np.ascontiguousarray(sim.detach().numpy())
        return torch.from_numpy(np.take(a.reshape(-1), (r * a.shape[1] + c).numpy()))
    return sim[r, c]


def _stable_argsort(keys: Tensor, bound: int) -> Tensor:
    """Stable argsort of int keys in [0, bound): numpy's radix sort where they fit 16 bits."""
    if keys.device.type == "cpu" and bound <= 1 << 16:
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
    return keys.sort(stable=True).indices


def _strided_maxima(sim: Tensor, g: int, rows: bool) -> Tensor:
    """The maximum of each query line over the items i with i mod g = group, laid out as sim:
    (Q, g) for row queries, (g, Q) for column queries. The matrix viewed as slices of g items,
    maxima taken across the slices: elementwise, so it vectorises (numpy's reduction does so
    best on CPU), where a max-reduction per group would not."""
    n = sim.shape[1] if rows else sim.shape[0]
    full = n // g * g
    if sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64):
        a = sim.detach().numpy()
        if rows:
            out = a[:, :full].reshape(len(a), -1, g).max(1)
            if full < n:
                np.maximum(out[:, :n - full], a[:, full:], out=out[:, :n - full])
        else:
            out = a[:full].reshape(-1, g, a.shape[1]).max(0)
            if full < n:
                np.maximum(out[:n - full], a[full:], out=out[:n - full])
        return torch.from_numpy(out)
    if rows:
        out = sim[:, :full].unflatten(1, (-1, g)).amax(1)
        if full < n:
            out[:, :n - full] = torch.maximum(out[:, :n - full], sim[:, full:])
        return out
    out = sim[:full].unflatten(0, (-1, g)).amax(0)
    if full < n:
        out[:n - full] = torch.maximum(out[:n - full], sim[full:])
    return out


def _hits(top: Tensor, line_of: np.ndarray, gt: _Positives, item_at: "_Lookup") -> Tensor:
    """(len(gt.queries), k) bool: whether each of the query's top items is one of its positives.
    top: (Q, k) top items of the lines (-1: none); line_of: the line of each of gt's queries;
    item_at: the line of each item id."""
    n_items = len(item_at)
    q, items = gt.pairs()
    i_pos = item_at(items)
    keep = i_pos >= 0
    keys = torch.from_numpy(np.sort(q[keep] * n_items + i_pos[keep])).to(top.device)
    lines = torch.from_numpy(line_of).to(top.device)
    key = top[lines] + torch.arange(len(lines), device=top.device)[:, None] * n_items
    if not len(keys):
        return torch.zeros_like(key, dtype=torch.bool)
    at = torch.searchsorted(keys, key).clamp_(max=len(keys) - 1)
    return (keys[at] == key) & (top[lines] >= 0)


def _first_hits(hit: Tensor) -> np.ndarray:
    """Position of each query's first hit among its top items (the number of items if none)."""
    found = hit.any(1)
    return torch.where(found, hit.to(torch.uint8).argmax(1), hit.shape[1]).cpu().numpy()


def _recalls(hit: Tensor) -> dict:
    """R@K from each query's hits among its top items: its first positive ranks below K."""
    first = _first_hits(hit)
    return {k: float(np.mean(first < k)) for k in KS}


def _top_recalls(top, gts, query_at, item_at) -> list:
    """R@K for each ground truth in `gts` (one direction) from the lines' top max(KS) items;
    query_at / item_at give the matrix's query and item line of an id. Positives outside the
    matrix never hit."""
    return [_recalls(_hits(top, query_at(gt.queries), gt, item_at)) for gt in gts]


def _folds(coco, caption_order, image_at, caption_at) -> tuple:
    """The COCO 1K fold of every image and caption (matrix order) as the package defines the
    folds: consecutive fifths of its caption list, and the images of those captions."""
    n = len(caption_order) // FOLDS
    image_fold = np.full(len(image_at), -1)
    caption_fold = np.full(len(caption_at), -1)
    for fold in range(FOLDS):
        captions = caption_order[fold * n:(fold + 1) * n]
        caption_fold[caption_at(captions)] = fold
        rows = image_at(np.unique(coco["t2i"].first(captions)))
        if (image_fold[rows] >= 0).any():
            raise ValueError("the eccv-caption caption order puts an image's captions in two "
                             "1K folds; its COCO 1K protocol is not defined here")
        image_fold[rows] = fold
    return torch.from_numpy(image_fold), torch.from_numpy(caption_fold)


def _fold_recalls(fold_tops, folds, coco, image_at, caption_at) -> tuple:
    """COCO 1K R@K (i2t, t2i) from each line's top items within its own fold (`fold_tops`),
    averaged over the folds as the package does."""
    out = []
    for top, fold, gt, query_at, item_at in (
            (fold_tops[0], folds[0], coco["i2t"], image_at, caption_at),
            (fold_tops[1], folds[1], coco["t2i"], caption_at, image_at)):
        lines = query_at(gt.queries)
        first = _first_hits(_hits(top, lines, gt, item_at))
        query_fold = fold.numpy()[lines]
        out.append({k: float(np.mean([np.mean(first[query_fold == f] < k)
                                      for f in range(FOLDS)])) for k in KS})
    return tuple(out)


def _line_k(eccv: _Positives, query_at, n_items):
    """Items each query line needs, max(max(KS), its R) (R for the ECCV queries), and the lines
    of the ECCV queries."""
    lines = torch.from_numpy(query_at(eccv.queries))
    k = torch.full((len(query_at),), max(KS), dtype=torch.long)
    k[lines] = torch.from_numpy(eccv.counts()).clamp(min=max(KS))
    return k.clamp_(max=n_items), lines


def _split_top(top, lines, eccv: _Positives, n_items):
    """(top max(KS) items of every line, top-R items of the ECCV queries' lines)."""
    r_max = min(int(eccv.counts().max()), n_items)
    return top[:, :min(max(KS), n_items)], top[lines.to(top.device), :r_max]


def _eccv_scores(top, gt: _Positives, item_at) -> dict:
    """R@1, R-Precision and mAP@R with R = the number of positives (those outside the matrix
    included, as the package counts them), from the exact top-R of each of gt's queries."""
    r_of = torch.from_numpy(gt.counts()).to(top.device)
    k = top.shape[1]
    hit = _hits(top, np.arange(len(top)), gt, item_at).double()
    r = torch.arange(1, k + 1, device=top.device, dtype=torch.float64)
    # The package's precision at r, 1 - misses / r, term for term.
    prec = 1 - (r - hit.cumsum(1)) / r
    within = r[None, :] <= r_of[:, None]
    mean_ap = (prec * hit * within).sum(1) / r_of
    r_prec = prec.gather(1, (r_of.clamp(max=k) - 1)[:, None]).squeeze(1)
    return {"eccv_map_at_r": float(np.mean(mean_ap.cpu().numpy())),
            "eccv_rprecision": float(np.mean(r_prec.cpu().numpy())),
            "eccv_r1": float(np.mean(hit[:, 0].cpu().numpy()))}


def eccv_metrics(sim, image_ids, caption_ids) -> dict:
    """ECCV Caption (mAP@R, R-Precision, R@1), CxC and COCO 1K/5K R@1/5/10 of an (images x
    captions) score matrix over the COCO 5K test split, rows and columns in any order.

    Returns the dictionary of `eccv_caption.Metrics().compute_all_metrics(i2t, t2i,
    target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "coco_1k_recalls",
    "coco_5k_recalls", "cxc_recalls"), Ks=(1, 5, 10))` for the full rankings of the matrix:
    {"coco_1k_r1": {"i2t": ..., "t2i": ...}, ..., "eccv_r1": {...}}, fractions in [0, 1].
    """
    sim = check_scores(sim)
    gt = ground_truth()
    coco, cxc = gt["coco"], gt["cxc"]
    image_ids = _as_ids(image_ids, sim.shape[0], "image_ids", "image")
    caption_ids = _as_ids(caption_ids, sim.shape[1], "caption_ids", "caption")
    _check_split(image_ids, np.sort(coco["i2t"].queries), "image_ids", "image")
    _check_split(caption_ids, np.sort(coco["t2i"].queries), "caption_ids", "caption")
    eccv_gt = gt["eccv"]
    image_at, caption_at = _Lookup(image_ids), _Lookup(caption_ids)
    # One selection for every list: each line's max(max(KS), its R) best items overall and its
    # max(KS) best within its own 1K fold.
    k_i2t, lines_i2t = _line_k(eccv_gt["i2t"], image_at, len(caption_ids))
    k_t2i, lines_t2i = _line_k(eccv_gt["t2i"], caption_at, len(image_ids))
    folds = _folds(coco, gt["caption_order"], image_at, caption_at)
    top_i2t, top_t2i, *fold_tops = top_rows_and_columns(
        sim, k_i2t.to(sim.device), k_t2i.to(sim.device), (*folds, max(KS)))
    coco_1k = _fold_recalls(fold_tops, folds, coco, image_at, caption_at)
    top_i2t, eccv_i2t = _split_top(top_i2t, lines_i2t, eccv_gt["i2t"], len(caption_ids))
    top_t2i, eccv_t2i = _split_top(top_t2i, lines_t2i, eccv_gt["t2i"], len(image_ids))
    i2t = _top_recalls(top_i2t, [coco["i2t"], cxc["i2t"]], image_at, caption_at)
    t2i = _top_recalls(top_t2i, [coco["t2i"], cxc["t2i"]], caption_at, image_at)
    out = {}
    for name, (i2t_k, t2i_k) in (("coco_1k", coco_1k), ("coco_5k", (i2t[0], t2i[0])),
                                 ("cxc", (i2t[1], t2i[1]))):
        for k in KS:
            out[f"{name}_r{k}"] = {"i2t": i2t_k[k], "t2i": t2i_k[k]}
    eccv = {"i2t": _eccv_scores(eccv_i2t, eccv_gt["i2t"], caption_at),
            "t2i": _eccv_scores(eccv_t2i, eccv_gt["t2i"], image_at)}
    for key in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1"):
        out[key] = {d: eccv[d][key] for d in ("i2t", "t2i")}
    return out
