"""ECCV Caption, CxC and COCO 1K/5K metrics from a score matrix over the COCO 5K test split.

The same numbers as `eccv_caption.Metrics().compute_all_metrics` (with target_metrics
eccv_r1, eccv_map_at_r, eccv_rprecision, coco_1k_recalls, coco_5k_recalls, cxc_recalls and
Ks=(1, 5, 10)) given the full rankings of the matrix, ties to the lower index, computed with
whole-matrix tensor operations instead of per-query Python loops. Every metric needs only each
query's first max(R, 10) items (R: its number of positives), which `top_items` finds exactly
without ranking whole lines. The ground truth is the one
the `eccv-caption` package ships (`pip install 'dive[eval]'`); its data files are read directly.
"""
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..retrieval import stable_topk
from .ranks import check_scores

KS = (1, 5, 10)
FOLDS = 5


class _Positives:
    """One ground truth in one direction: query ids and their positive ids, in CSR form."""

    def __init__(self, queries: np.ndarray, offsets: np.ndarray, items: np.ndarray):
        self.queries, self.offsets, self.items = queries, offsets, items

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
        at = _Lookup(self.queries)(query_ids)
        sizes = self.counts()[at]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        # Position of every kept positive: its entry's start plus its rank within the entry.
        flat = np.repeat(self.offsets[at] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return _Positives(query_ids, offsets, self.items[flat])

    def first(self, query_ids: np.ndarray) -> np.ndarray:
        """The first positive of each of `query_ids` (the package's owner image of a caption)."""
        return self.items[self.offsets[_Lookup(self.queries)(query_ids)]]


class _Lookup:
    """Position of each id in `ids`; -1 for ids not there."""

    def __init__(self, ids: np.ndarray):
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]

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
    `sim` (items its columns) or, with rows_are_queries=False, its columns.

    The items are dealt into G groups (item i into group i mod G, G about sqrt(items * k), which
    balances the two steps below); the k best items lie in the k groups with the highest maxima
    (each is in a group whose maximum is at least the k-th best score, and at least k groups
    reach that). So one pass of elementwise maxima over the matrix, a top-k over the G maxima
    and one over the k groups' items replace a top-k over every item. A query with a tie among
    its k + 1 best candidates, or whose (k+1)-th group maximum equals its k-th best score, is
    redone exactly over its whole line (ties go to the lower index only there).
    """
    return _Groups(sim, k, rows_are_queries).top(k)


def _strided_maxima(sim: Tensor, g: int, rows: bool) -> Tensor:
    """(Q, g): the maximum of each query line over the items i with i mod g = group. The matrix
    viewed as slices of g items, maxima taken across the slices: elementwise, so it vectorises
    (numpy's reduction does so best on CPU), where a max-reduction per group would not."""
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
            out = np.ascontiguousarray(out.T)
        return torch.from_numpy(out)
    if rows:
        out = sim[:, :full].unflatten(1, (-1, g)).amax(1)
        if full < n:
            out[:, :n - full] = torch.maximum(out[:, :n - full], sim[:, full:])
        return out
    out = sim[:full].unflatten(0, (-1, g)).amax(0)
    if full < n:
        out[:n - full] = torch.maximum(out[:n - full], sim[full:])
    return out.T.contiguous()


class _Groups:
    """The group maxima of every query line in one direction (see top_items)."""

    def __init__(self, sim: Tensor, k: int, rows: bool):
        self.sim, self.rows = sim, rows
        self.n_items = n = sim.shape[1] if rows else sim.shape[0]
        self.n_groups = g = min(n, max(1, round(math.sqrt(n * max(1, k)))))
        self.depth = -(-n // g)  # items per group (the last ones one fewer)
        self.maxima = _strided_maxima(sim, g, rows)

    def top(self, k: int, lines: Optional[Tensor] = None) -> Tensor:
        """(Q, k) top items of the query lines `lines` (all when None)."""
        sim, dev, g = self.sim, self.sim.device, self.n_groups
        k = min(k, self.n_items)
        every = lines is None
        maxima = self.maxima if every else self.maxima[lines]
        if every:
            lines = torch.arange(len(maxima), device=dev)
        picked = min(k, g)
        group_max, groups = maxima.topk(min(picked + 1, g), dim=1)
        # (Q, picked, depth) candidate items: group + G * j.
        items = groups[:, :picked, None] + g * torch.arange(self.depth, device=dev)
        valid = items < self.n_items
        items = items.clamp(max=self.n_items - 1).flatten(1)
        if self.rows and every:
            scores = sim.gather(1, items)
        elif self.rows:
            scores = _take(sim, lines[:, None] * sim.shape[1] + items)
        else:
            scores = self._column_scores(lines, groups[:, :picked])
        scores = scores.masked_fill(~valid.flatten(1), -math.inf)
        values, at = scores.topk(min(k + 1, scores.shape[1]), dim=1)
        top = items.gather(1, at[:, :k])
        redo = (values[:, 1:] == values[:, :-1]).any(1)
        if g > picked:
            redo |= group_max[:, picked] == values[:, k - 1]
        redo = redo.nonzero().squeeze(1)
        if len(redo):
            line = (sim.index_select(0, lines[redo]) if self.rows
                    else sim.index_select(1, lines[redo]).T)
            top[redo] = stable_topk(line, k)[1]
        return top

    def _column_scores(self, lines: Tensor, groups: Tensor) -> Tensor:
        """(Q, picked * depth) scores of column queries' candidates (the rows of their picked
        groups), read in (group, column) order: the rows then ascend, where reading column by
        column would jump a whole row apart each time."""
        sim, g, depth = self.sim, self.n_groups, self.depth
        n_q, picked = groups.shape
        dev = sim.device
        pair_groups = groups.flatten()
        pair_cols = lines.repeat_interleave(picked)
        order = (pair_groups * sim.shape[1] + pair_cols).argsort()
        rows = pair_groups[order] + g * torch.arange(depth, device=dev)[:, None]
        index = rows.clamp_(max=self.n_items - 1) * sim.shape[1] + pair_cols[order]
        values = _take(sim, index)  # (depth, pairs)
        out = torch.empty_like(values)
        out[:, order] = values
        return out.view(depth, n_q, picked).permute(1, 2, 0).reshape(n_q, picked * depth)


def _take(sim: Tensor, index: Tensor) -> Tensor:
    """sim's entries at the row-major flat `index` (numpy's gather on CPU: one C loop)."""
    if sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64):
        a = sim.detach().numpy()
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        return torch.from_numpy(np.take(a.reshape(-1), index.numpy()))
    return sim.reshape(-1).take(index)


def _hits(top: Tensor, line_of: np.ndarray, gt: _Positives, item_ids: np.ndarray) -> Tensor:
    """(len(gt.queries), k) bool: whether each of the query's top items is one of its positives.
    top: (Q, k) top items of the lines; line_of: the line of each of gt's queries."""
    n_items = len(item_ids)
    q, items = gt.pairs()
    i_pos = _Lookup(item_ids)(items)
    keep = i_pos >= 0
    keys = torch.from_numpy(np.sort(q[keep] * n_items + i_pos[keep])).to(top.device)
    lines = torch.from_numpy(line_of).to(top.device)
    key = top[lines] + torch.arange(len(lines), device=top.device)[:, None] * n_items
    if not len(keys):
        return torch.zeros_like(key, dtype=torch.bool)
    at = torch.searchsorted(keys, key).clamp_(max=len(keys) - 1)
    return keys[at] == key


def _recalls(hit: Tensor) -> dict:
    """R@K from each query's hits among its top items: its first positive ranks below K."""
    found = hit.any(1)
    first = torch.where(found, hit.to(torch.uint8).argmax(1), hit.shape[1])
    first = first.cpu().numpy()
    return {k: float(np.mean(first < k)) for k in KS}


def _top_recalls(top, gts, query_ids, item_ids) -> list:
    """R@K for each ground truth in `gts` (one direction) from the lines' top max(KS) items;
    query_ids / item_ids name the matrix's query and item lines. Positives outside the matrix
    never hit."""
    lookup = _Lookup(query_ids)
    return [_recalls(_hits(top, lookup(gt.queries), gt, item_ids)) for gt in gts]


def _fold_recalls(sim, coco, caption_order, fold, image_ids, caption_ids):
    """One COCO 1K fold as the package defines it: a fifth of its caption list, their images,
    rankings restricted to both; the matrix order is kept, so ties still go to the lower index."""
    n = len(caption_order) // FOLDS
    fold_caps = caption_order[fold * n:(fold + 1) * n]
    fold_imgs = np.unique(coco["t2i"].first(fold_caps))
    rows = torch.from_numpy(np.sort(_Lookup(image_ids)(fold_imgs))).to(sim.device)
    cols = torch.from_numpy(np.sort(_Lookup(caption_ids)(fold_caps))).to(sim.device)
    sub = _take(sim, rows[:, None] * sim.shape[1] + cols)
    sub_imgs, sub_caps = image_ids[rows.cpu().numpy()], caption_ids[cols.cpu().numpy()]
    # A fold is small (1,000 x 5,000): a top-k over its lines costs less than the groups.
    top_i2t = stable_topk(sub, max(KS))[1]
    top_t2i = stable_topk(sub.T.contiguous(), max(KS))[1]
    i2t, = _top_recalls(top_i2t, [coco["i2t"].subset(fold_imgs)], sub_imgs, sub_caps)
    t2i, = _top_recalls(top_t2i, [coco["t2i"].subset(fold_caps)], sub_caps, sub_imgs)
    return i2t, t2i


def _top_both(sim, k, extra=()):
    """[rows' top-k, columns' top-k] and, for each (lines, k', rows_are_queries) of `extra`,
    those lines' top-k' from the same group maxima (the ECCV queries' top-R)."""
    groups = {True: _Groups(sim, k, True), False: _Groups(sim, k, False)}
    return ([groups[True].top(k), groups[False].top(k)]
            + [groups[rows].top(k_lines, lines) for lines, k_lines, rows in extra])


def _eccv_request(sim, gt: _Positives, query_ids, item_ids, rows_are_queries):
    """(lines, k, rows_are_queries): the ECCV queries' lines and the top-k they need, k the
    largest number of positives R."""
    lines = torch.from_numpy(_Lookup(query_ids)(gt.queries)).to(sim.device)
    return lines, min(int(gt.counts().max()), len(item_ids)), rows_are_queries


def _eccv_scores(top, gt: _Positives, item_ids) -> dict:
    """R@1, R-Precision and mAP@R with R = the number of positives (those outside the matrix
    included, as the package counts them), from the exact top-R of each of gt's queries."""
    r_of = torch.from_numpy(gt.counts()).to(top.device)
    k = top.shape[1]
    hit = _hits(top, np.arange(len(top)), gt, item_ids).double()
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
    top_i2t, top_t2i, eccv_i2t, eccv_t2i = _top_both(sim, max(KS), (
        _eccv_request(sim, eccv_gt["i2t"], image_ids, caption_ids, True),
        _eccv_request(sim, eccv_gt["t2i"], caption_ids, image_ids, False)))
    i2t = _top_recalls(top_i2t, [coco["i2t"], cxc["i2t"]], image_ids, caption_ids)
    t2i = _top_recalls(top_t2i, [coco["t2i"], cxc["t2i"]], caption_ids, image_ids)
    folds = [_fold_recalls(sim, coco, gt["caption_order"], f, image_ids, caption_ids)
             for f in range(FOLDS)]
    coco_1k = [{k: float(np.mean([fold[d][k] for fold in folds])) for k in KS} for d in (0, 1)]
    out = {}
    for name, (i2t_k, t2i_k) in (("coco_1k", coco_1k), ("coco_5k", (i2t[0], t2i[0])),
                                 ("cxc", (i2t[1], t2i[1]))):
        for k in KS:
            out[f"{name}_r{k}"] = {"i2t": i2t_k[k], "t2i": t2i_k[k]}
    eccv = {"i2t": _eccv_scores(eccv_i2t, eccv_gt["i2t"], caption_ids),
            "t2i": _eccv_scores(eccv_t2i, eccv_gt["t2i"], image_ids)}
    for key in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1"):
        out[key] = {d: eccv[d][key] for d in ("i2t", "t2i")}
    return out
