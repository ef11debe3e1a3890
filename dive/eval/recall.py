"""The DivE / VSE++ recall protocol: R@1/5/10, median and mean rank both ways, RSUM.

Images are the rows of the score matrix and caption j belongs to image j // captions_per_image.
An image's rank is the best rank among its captions in its row; a caption's rank is the rank of
its image in its column. Ranks match the reference per-query argsort loop exactly on matrices
without ties; ties go to the lower index (see dive.eval.ranks).
"""
import math

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..checks import count
from ..retrieval.search import similarity_matrix
from .ranks import check_scores, first_positive_ranks

KS = (1, 5, 10)


def _summary(ranks: Tensor) -> dict:
    """The reference's formulas, in float64 on the host, from exact integer ranks."""
    ranks = ranks.cpu()
    n = len(ranks)
    out = {f"r{k}": 100.0 * int((ranks < k).sum()) / n for k in KS}
    ordered = ranks.sort().values
    mid = n // 2
    median = ordered[mid].item() if n % 2 else (ordered[mid - 1].item() + ordered[mid].item()) / 2
    out["medr"] = float(math.floor(median) + 1)
    out["meanr"] = int(ranks.sum()) / n + 1
    return out


def _check_cpi(captions_per_image):
    count("captions_per_image", captions_per_image)


def _check_shape(sim: Tensor, captions_per_image: int):
    n_img, n_cap = sim.shape
    if n_img == 0 or n_cap != captions_per_image * n_img:
        raise ValueError(f"sim has shape {tuple(sim.shape)}: expected (images, images * "
                         f"captions_per_image) with captions_per_image={captions_per_image}")


def image_ranks(sim: Tensor, cpi: int, first_image: int = 0) -> Tensor:
    """(rows,) 0-based rank of each image's best caption: `sim` holds the rows of images
    first_image.. against every caption of the split."""
    caps = torch.arange(first_image * cpi, (first_image + sim.shape[0]) * cpi, device=sim.device)
    rank, = first_positive_ranks(sim, [(caps // cpi - first_image, caps)], rows_are_queries=True)
    return rank


def caption_ranks(sim: Tensor, cpi: int, first_caption: int = 0) -> Tensor:
    """(columns,) 0-based rank of each caption's image: `sim` holds every image of the split
    against the columns of captions first_caption.."""
    local = torch.arange(sim.shape[1], device=sim.device)
    rank, = first_positive_ranks(sim, [(local, (local + first_caption) // cpi)],
                                 rows_are_queries=False)
    return rank


def metrics_from_ranks(i2t: Tensor, t2i: Tensor) -> dict:
    """recall_metrics' dict from every image's and every caption's rank."""
    i2t, t2i = _summary(i2t), _summary(t2i)
    rsum = i2t["r1"] + i2t["r5"] + i2t["r10"] + t2i["r1"] + t2i["r5"] + t2i["r10"]
    return {"i2t": i2t, "t2i": t2i, "rsum": rsum}


def _recall(sim: Tensor, cpi: int) -> dict:
    return metrics_from_ranks(image_ranks(sim, cpi), caption_ranks(sim, cpi))


def recall_metrics(sim, captions_per_image: int = 5) -> dict:
    """{"i2t": {"r1", "r5", "r10", "medr", "meanr"}, "t2i": {...}, "rsum"} of an
    (images, images * captions_per_image) score matrix, recalls in percent, on its device."""
    _check_cpi(captions_per_image)
    sim = check_scores(sim)
    _check_shape(sim, captions_per_image)
    return _recall(sim, captions_per_image)


def fold_metrics(sim, captions_per_image: int = 5, folds: int = 5) -> dict:
    """The mean of recall_metrics over `folds` contiguous blocks of images and their captions,
    for a matrix of any size (coco_1k_5fold is this on the COCO 5K test matrix)."""
    _check_cpi(captions_per_image)
    sim = check_scores(sim)
    _check_shape(sim, captions_per_image)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1 \
            or sim.shape[0] % folds:
        raise ValueError(f"folds must be a positive int dividing the {sim.shape[0]} images, got "
                         f"{folds!r}")
    n = sim.shape[0] // folds
    c = n * captions_per_image
    return mean_metrics([_recall(sim[f * n:(f + 1) * n, f * c:(f + 1) * c], captions_per_image)
                         for f in range(folds)])


def coco_1k_5fold(sim, captions_per_image: int = 5, folds: int = 5) -> dict:
    """COCO 1K: the mean of recall_metrics over the five contiguous 1,000-image blocks of the
    5,000 x 25,000 COCO 5K test matrix (images 1000f..1000f+999 and their captions), as the
    DivE / VSE++ 5-fold evaluation. Any other shape is a ValueError: each fold is 1,000 images
    (1000 * folds images, captions_per_image captions each); fold_metrics folds any matrix."""
    _check_cpi(captions_per_image)
    count("folds", folds)
    shape = (1000 * folds, 1000 * folds * captions_per_image)
    return fold_metrics(_fixed_shape(sim, shape, "COCO 1K 5-fold", "fold_metrics folds a "
                                     "matrix of another size"), captions_per_image, folds)


def mean_metrics(parts: list) -> dict:
    """The mean of several recall_metrics dicts (the COCO 1K folds), key by key."""
    out = {d: {key: float(np.mean([p[d][key] for p in parts])) for key in parts[0][d]}
           for d in ("i2t", "t2i")}
    out["rsum"] = float(np.mean([p["rsum"] for p in parts]))
    return out


def _fixed_shape(sim, shape, protocol, hint="recall_metrics takes any (N, N * c) matrix"):
    sim = check_scores(sim)
    if tuple(sim.shape) != shape:
        raise ValueError(f"{protocol} needs a {shape[0]} x {shape[1]} matrix (images x "
                         f"captions), got {tuple(sim.shape)}; {hint}")
    return sim


def coco_5k(sim) -> dict:
    """COCO 5K: recall_metrics over the whole 5,000 x 25,000 test matrix."""
    return _recall(_fixed_shape(sim, (5000, 25000), "COCO 5K"), 5)


def f30k_1k(sim) -> dict:
    """Flickr30K 1K: recall_metrics over the whole 1,000 x 5,000 test matrix."""
    return _recall(_fixed_shape(sim, (1000, 5000), "Flickr30K 1K"), 5)


def sharded_recall(images: Tensor, captions: Tensor, captions_per_image: int, *,
                   temperature: float = 16.0, coco_1k: bool = False) -> dict:
    """Collective: recall_metrics of the (images x captions) smooth-Chamfer matrix, split over
    the ranks of torch.distributed (the plain computation without a process group), every rank
    holding all the sets: rank r ranks its block of images against every caption and its block
    of captions against every image, so no rank forms more than about 2/W of the matrix, and
    only the integer ranks travel. With coco_1k, also the COCO 1K five-fold mean under
    "coco_1k" (fold f on rank f mod W)."""
    cpi = captions_per_image
    rows = distributed.shard_range(images.shape[0])
    cols = distributed.shard_range(captions.shape[0])
    block = similarity_matrix(images[rows.start:rows.stop], captions, temperature=temperature)
    i2t = distributed.gather_rows(image_ranks(block, cpi, rows.start))
    block = similarity_matrix(images, captions[cols.start:cols.stop], temperature=temperature)
    t2i = distributed.gather_rows(caption_ranks(block, cpi, cols.start))
    del block
    metrics = metrics_from_ranks(i2t, t2i)
    if coco_1k:
        n, c = images.shape[0] // 5, images.shape[0] // 5 * cpi
        mine = {f: recall_metrics(similarity_matrix(images[f * n:(f + 1) * n],
                                                    captions[f * c:(f + 1) * c],
                                                    temperature=temperature), cpi)
                for f in range(5) if f % distributed.world_size() == distributed.rank()}
        folds = {}
        for part in distributed.gather_object(mine):
            folds.update(part)
        metrics["coco_1k"] = mean_metrics([folds[f] for f in range(5)])
    return metrics
