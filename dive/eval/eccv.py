"""ECCV Caption, CxC and COCO 1K/5K metrics from a score matrix over the COCO 5K test split.

The same numbers as `eccv_caption.Metrics().compute_all_metrics` (with target_metrics
eccv_r1, eccv_map_at_r, eccv_rprecision, coco_1k_recalls, coco_5k_recalls, cxc_recalls and
Ks=(1, 5, 10)) given the full rankings of the matrix, ties to the lower index, computed with
whole-matrix tensor operations instead of per-query Python loops. The ground truth is the one
the `eccv-caption` package ships (`pip install 'dive[eval]'`); its data files are read directly.
"""
import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..retrieval import stable_topk
from .ranks import BLOCK_ELEMENTS, check_scores, first_positive_ranks

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


def _recalls(ranks: Tensor) -> dict:
    ranks = ranks.cpu().numpy()
    return {k: float(np.mean(ranks < k)) for k in KS}


def _first_rank_recalls(sim, gts, query_ids, item_ids, rows_are_queries):
    """R@K for each ground truth in `gts` (one direction); query_ids / item_ids name the
    matrix's query and item lines. Positives outside the matrix never hit."""
    query_pos, item_pos = _Lookup(query_ids), _Lookup(item_ids)
    pairs, queries = [], []
    for gt in gts:
        q, items = gt.pairs()
        q_pos, i_pos = query_pos(gt.queries), item_pos(items)
        keep = i_pos >= 0
        pairs.append((torch.from_numpy(q_pos[q][keep]).to(sim.device),
                      torch.from_numpy(i_pos[keep]).to(sim.device)))
        queries.append(torch.from_numpy(q_pos).to(sim.device))
    ranks = first_positive_ranks(sim, pairs, rows_are_queries)
    return [_recalls(r[q]) for r, q in zip(ranks, queries)]


def _fold_recalls(sim, coco, caption_order, fold, image_ids, caption_ids):
    """One COCO 1K fold as the package defines it: a fifth of its caption list, their images,
    rankings restricted to both; the matrix order is kept, so ties still go to the lower index."""
    n = len(caption_order) // FOLDS
    fold_caps = caption_order[fold * n:(fold + 1) * n]
    fold_imgs = np.unique(coco["t2i"].first(fold_caps))
    rows = torch.from_numpy(np.sort(_Lookup(image_ids)(fold_imgs))).to(sim.device)
    cols = torch.from_numpy(np.sort(_Lookup(caption_ids)(fold_caps))).to(sim.device)
    sub = sim[rows[:, None], cols]
    sub_imgs, sub_caps = image_ids[rows.cpu().numpy()], caption_ids[cols.cpu().numpy()]
    i2t, = _first_rank_recalls(sub, [coco["i2t"].subset(fold_imgs)], sub_imgs, sub_caps, True)
    t2i, = _first_rank_recalls(sub, [coco["t2i"].subset(fold_caps)], sub_caps, sub_imgs, False)
    return i2t, t2i


def _eccv_scores(sim, gt: _Positives, query_ids, item_ids, rows_are_queries) -> dict:
    """R@1, R-Precision and mAP@R with R = the number of positives (those outside the matrix
    included, as the package counts them), from the exact top-R of each query."""
    lines_of = torch.from_numpy(_Lookup(query_ids)(gt.queries)).to(sim.device)
    n_items = len(item_ids)
    r_of = torch.from_numpy(gt.counts()).to(sim.device)
    q, items = gt.pairs()
    i_pos = _Lookup(item_ids)(items)
    keys = torch.from_numpy(np.sort(q[i_pos >= 0] * n_items + i_pos[i_pos >= 0])).to(sim.device)
    k = min(int(r_of.max()), n_items)
    hits = []
    step = max(1, BLOCK_ELEMENTS // n_items)
    for c in range(0, len(lines_of), step):
        lines = lines_of[c:c + step]
        block = sim[lines] if rows_are_queries else sim.index_select(1, lines).T
        _, top = stable_topk(block, k)
        offset = torch.arange(c, c + len(lines), device=sim.device)[:, None] * n_items
        key = top + offset
        at = torch.searchsorted(keys, key).clamp_(max=max(len(keys) - 1, 0))
        hits.append(keys[at] == key if len(keys) else torch.zeros_like(key, dtype=torch.bool))
    hit = torch.cat(hits).double()
    r = torch.arange(1, k + 1, device=sim.device, dtype=torch.float64)
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
    i2t = _first_rank_recalls(sim, [coco["i2t"], cxc["i2t"]], image_ids, caption_ids, True)
    t2i = _first_rank_recalls(sim, [coco["t2i"], cxc["t2i"]], caption_ids, image_ids, False)
    folds = [_fold_recalls(sim, coco, gt["caption_order"], f, image_ids, caption_ids)
             for f in range(FOLDS)]
    coco_1k = [{k: float(np.mean([fold[d][k] for fold in folds])) for k in KS} for d in (0, 1)]
    out = {}
    for name, (i2t_k, t2i_k) in (("coco_1k", coco_1k), ("coco_5k", (i2t[0], t2i[0])),
                                 ("cxc", (i2t[1], t2i[1]))):
        for k in KS:
            out[f"{name}_r{k}"] = {"i2t": i2t_k[k], "t2i": t2i_k[k]}
    eccv = {"i2t": _eccv_scores(sim, gt["eccv"]["i2t"], image_ids, caption_ids, True),
            "t2i": _eccv_scores(sim, gt["eccv"]["t2i"], caption_ids, image_ids, False)}
    for key in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1"):
        out[key] = {d: eccv[d][key] for d in ("i2t", "t2i")}
    return out
