"""Evaluation speed from set embeddings, against the reference per-query loop, same run.

CPU: COCO 1K shape (1,000 images x 5,000 captions, K=4, D=1024, fp32): similarity_matrix +
recall_metrics against DivE's evaluation loop (one query at a time: its scores by the reference
similarity, a full sort, the rank of its match). eccv_metrics on a COCO 5K matrix against
building the full rankings and calling the eccv_caption package (marked slow: about a minute
and 4 GB for the package route).
GPU (marked gpu): COCO 5K shape, bf16 sets: the whole evaluation (similarity, 5K recalls and 1K
5-fold; then also the ECCV / CxC metrics, where eccv_caption is installed) against the fused
similarity alone (the "x floor" column) and the reference loop; 10 images on CPU in
gpu_check.sh's dry run.
eccv_metrics against the route it replaces, rankings from torch.topk (top-1000 captions per image,
top-200 images per caption) fed to eccv_caption: identical dictionaries.
"""
import operator
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dive.eval import eccv_metrics, fold_metrics, recall_metrics
from dive.ops import smooth_chamfer_ref
from dive.retrieval import similarity_matrix

K, D, CPI = 4, 1024, 5


def planted_sets(images, dtype=torch.float32, device="cpu", noise=14.0):
    """Image sets and captions near their image (as `dive gallery`): realistic recalls."""
    img = F.normalize(torch.randn(images, K, D, device=device), dim=-1)
    cap = img.repeat_interleave(CPI, 0)
    cap = F.normalize(cap + noise * torch.randn_like(cap) / D**0.5, dim=-1)
    return img.to(dtype), cap.to(dtype)


def reference_loop(img, cap):
    """DivE eval.py i2t / t2i: per query its similarity row (or column), a full sort, a rank."""
    n = len(img)
    i2t = []
    for i in range(n):
        order = smooth_chamfer_ref(img[i:i + 1], cap)[0].argsort(descending=True)
        i2t.append(((order >= CPI * i) & (order < CPI * (i + 1))).nonzero()[0, 0].item())
    t2i = []
    for i in range(n):
        scores = smooth_chamfer_ref(img, cap[CPI * i:CPI * (i + 1)]).T
        for row in scores:
            t2i.append((row.argsort(descending=True) == i).nonzero()[0, 0].item())
    return [100.0 * np.mean(np.array(r) < k) for r in (i2t, t2i) for k in (1, 5, 10)]


@pytest.fixture(scope="module")
def coco1k():
    torch.manual_seed(0)
    return planted_sets(1000)


def test_cpu_similarity(benchmark, record, coco1k):
    benchmark(similarity_matrix, *coco1k)
    record("cpu coco1k evaluation", "similarity_matrix", "floor")


def test_cpu_evaluation(benchmark, record, coco1k):
    def run():
        return recall_metrics(similarity_matrix(*coco1k))

    metrics = benchmark(run)
    record("cpu coco1k evaluation", "similarity + recall_metrics", rsum=round(metrics["rsum"], 2))


def test_cpu_reference_loop(benchmark, record, coco1k):
    recalls = benchmark.pedantic(reference_loop, coco1k, rounds=1, iterations=1)
    record("cpu coco1k evaluation", "reference per-query loop", "ref",
           rsum=round(float(sum(recalls)), 2))


def package_metrics(metric, i2t, t2i):
    """eccv_caption's dictionary of every metric eccv_metrics computes, from rankings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute_all_metrics(
            i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision",
                                      "coco_1k_recalls", "coco_5k_recalls", "cxc_recalls"),
            Ks=(1, 5, 10), verbose=False)


@pytest.fixture(scope="module")
def coco5k_matrix():
    """A planted COCO 5K score matrix over the real ids, rows and columns in random order."""
    pytest.importorskip("eccv_caption")
    from dive.eval.eccv import ground_truth
    gen = np.random.default_rng(0)
    gt = ground_truth()
    image_ids = gen.permutation(np.sort(gt["coco"]["i2t"].queries))
    caption_ids = gen.permutation(gt["caption_order"])
    row = {v: i for i, v in enumerate(image_ids.tolist())}
    col = {v: i for i, v in enumerate(caption_ids.tolist())}
    q, items = gt["coco"]["i2t"].pairs()
    torch.manual_seed(0)
    sim = torch.randn(5000, 25000)
    rows = torch.tensor([row[i] for i in gt["coco"]["i2t"].queries[q].tolist()])
    sim[rows, torch.tensor([col[c] for c in items.tolist()])] += 3.0
    return sim, image_ids, caption_ids


def test_cpu_eccv_metrics(benchmark, record, coco5k_matrix):
    benchmark(eccv_metrics, *coco5k_matrix)
    record("cpu coco5k eccv_metrics", "eccv_metrics")


def test_cpu_eccv_topk_route(benchmark, record, coco5k_matrix):
    """The usual route to the package's metrics: top-1000 captions of each image and top-200
    images of each caption from torch.topk, fed to eccv_caption."""
    sim, image_ids, caption_ids = coco5k_matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns when ujson is missing
        from eccv_caption import Metrics
    metric = Metrics()

    def topk_route():
        img_objs, cap_objs = image_ids.tolist(), caption_ids.tolist()
        top = sim.topk(1000, dim=1).indices.numpy()
        i2t = {img_objs[a]: operator.itemgetter(*top[a].tolist())(cap_objs)
               for a in range(len(top))}
        top = sim.topk(200, dim=0).indices.T.numpy()
        t2i = {cap_objs[b]: operator.itemgetter(*top[b].tolist())(img_objs)
               for b in range(len(top))}
        return package_metrics(metric, i2t, t2i)

    want = benchmark.pedantic(topk_route, rounds=3, iterations=1)
    assert want == eccv_metrics(*coco5k_matrix)
    record("cpu coco5k eccv_metrics", "torch.topk rankings + eccv_caption", "ref")


@pytest.mark.slow
def test_cpu_eccv_package_route(benchmark, record, coco5k_matrix):
    sim, image_ids, caption_ids = coco5k_matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns when ujson is missing
        from eccv_caption import Metrics
    metric = Metrics()

    def package_route():
        # Full rankings (ties to the lower index), ids shared between lists to bound memory.
        img_objs, cap_objs = image_ids.tolist(), caption_ids.tolist()
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices.numpy()
        i2t = {img_objs[a]: operator.itemgetter(*order[a].tolist())(cap_objs)
               for a in range(len(order))}
        order = torch.sort(sim.T.contiguous(), dim=1, descending=True, stable=True).indices.numpy()
        t2i = {cap_objs[b]: operator.itemgetter(*order[b].tolist())(img_objs)
               for b in range(len(order))}
        del order
        return package_metrics(metric, i2t, t2i)

    want = benchmark.pedantic(package_route, rounds=1, iterations=1)
    assert want == eccv_metrics(*coco5k_matrix)
    record("cpu coco5k eccv_metrics", "full rankings + eccv_caption")


# ----------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def coco5k_gpu():
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()  # else gpu_check.sh's dry run: tiny, on CPU
    img, cap = planted_sets(5000 if cuda else 10, torch.bfloat16, "cuda" if cuda else "cpu")
    try:
        from dive.eval.eccv import ground_truth
        gt = ground_truth() if cuda else None
    except (ImportError, OSError):  # not installed, or its data files missing
        gt = None
    if gt is None:
        return img, cap, None
    # The package's own order: captions as listed, images by first appearance.
    caption_ids = gt["caption_order"]
    owners = gt["coco"]["t2i"].first(caption_ids)
    _, first = np.unique(owners, return_index=True)
    return img, cap, (owners[np.sort(first)], caption_ids)


@pytest.mark.gpu
@pytest.mark.quick
def test_gpu_similarity(benchmark, record, gpu, coco5k_gpu):
    img, cap, _ = coco5k_gpu
    gpu.time(benchmark, lambda: similarity_matrix(img, cap), rounds=5, warmup_rounds=1)
    record("gpu coco5k bf16 evaluation", "similarity_matrix", "floor")


@pytest.mark.gpu
@pytest.mark.parametrize("eccv", [pytest.param(False, marks=pytest.mark.quick), True],
                         ids=["recalls", "recalls+eccv"])
def test_gpu_evaluation(benchmark, record, gpu, coco5k_gpu, eccv):
    img, cap, ids = coco5k_gpu
    if eccv and ids is None:
        pytest.skip("eccv_caption is not installed (or no GPU: the ids are COCO 5K's)")

    def run():
        sim = similarity_matrix(img, cap)
        out = {"5k": recall_metrics(sim), "1k": fold_metrics(sim)}
        if eccv:
            out["eccv"] = eccv_metrics(sim, *ids)
        return out

    metrics = gpu.time(benchmark, run, rounds=5, warmup_rounds=1)
    name = "similarity + 5K/1K recalls" + (" + ECCV/CxC" if eccv else "")
    record("gpu coco5k bf16 evaluation", name, rsum_5k=round(metrics["5k"]["rsum"], 2))


@pytest.mark.gpu
def test_gpu_reference_loop(benchmark, record, gpu, coco5k_gpu):
    img, cap, _ = coco5k_gpu
    fold = len(img) // 5

    def evalrank():
        # DivE's evalrank on COCO: the loop on each 1K fold, then on the whole 5K.
        for f in range(5):
            reference_loop(img[fold * f:fold * (f + 1)], cap[CPI * fold * f:CPI * fold * (f + 1)])
        return reference_loop(img, cap)

    recalls = gpu.time(benchmark, evalrank, rounds=1, warmup_rounds=0)
    record("gpu coco5k bf16 evaluation", "reference per-query loop", "ref",
           rsum_5k=round(float(sum(recalls)), 2))
