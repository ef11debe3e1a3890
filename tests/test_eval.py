"""dive.eval against test-local per-query implementations (DivE / VSE++) and the eccv_caption
package on its real COCO 5K ids; every bad input; the `dive evaluate-embeddings` command."""
import json
import warnings

import numpy as np
import pytest
import torch

from dive import cli
from dive.eval import (coco_1k_5fold, coco_5k, eccv_metrics, f30k_1k, fold_metrics,
                       recall_metrics)
from dive.eval import eccv as eccv_module
from dive.eval import ranks as ranks_module


def reference_recalls(sim, cpi=5, stable=False):
    """The per-query argsort loop of DivE's eval.py i2t/t2i on a precomputed matrix.

    stable=False is the reference's order (argsort ascending, reversed); stable=True is dive's
    documented tie rule (stable descending: among equal scores the lower index first).
    """
    sim = np.asarray(sim, dtype=np.float64)
    order = (lambda v: np.argsort(-v, kind="stable")) if stable else (lambda v: np.argsort(v)[::-1])
    n = sim.shape[0]
    ranks = np.zeros(n)
    for i in range(n):
        inds = order(sim[i])
        ranks[i] = min(np.where(inds == j)[0][0] for j in range(cpi * i, cpi * (i + 1)))
    ranks_t = np.zeros(cpi * n)
    for j in range(cpi * n):
        ranks_t[j] = np.where(order(sim[:, j]) == j // cpi)[0][0]

    def summary(r):
        return {"r1": 100.0 * len(np.where(r < 1)[0]) / len(r),
                "r5": 100.0 * len(np.where(r < 5)[0]) / len(r),
                "r10": 100.0 * len(np.where(r < 10)[0]) / len(r),
                "medr": np.floor(np.median(r)) + 1, "meanr": r.mean() + 1}

    a, b = summary(ranks), summary(ranks_t)
    return {"i2t": a, "t2i": b, "rsum": a["r1"] + a["r5"] + a["r10"] + b["r1"] + b["r5"] + b["r10"]}


def planted(n, cpi, signal=1.0):
    """Random scores with each caption's own image raised: recalls neither 0 nor 100."""
    sim = torch.randn(n, cpi * n)
    caps = torch.arange(cpi * n)
    sim[caps // cpi, caps] += signal
    return sim


@pytest.mark.parametrize("n,cpi", [(1, 1), (1, 5), (3, 1), (7, 5), (30, 5), (23, 3)])
def test_recall_metrics_equals_reference_loop(n, cpi, seed):
    sim = planted(n, cpi)
    assert recall_metrics(sim, cpi) == reference_recalls(sim, cpi), f"seed={seed}"


def test_recall_metrics_ties_go_to_the_lower_index(seed):
    sim = (planted(40, 5) * 2).round() / 2  # a few levels: most scores are tied
    got = recall_metrics(sim)
    assert got == reference_recalls(sim, stable=True), f"seed={seed}"


def test_recall_metrics_all_tied():
    # Everything tied: image i's first caption (column 5i) comes after the 5i lower columns;
    # caption j's image j // 5 after the j // 5 lower rows.
    got = recall_metrics(torch.zeros(4, 20))
    assert got["i2t"] == {"r1": 25.0, "r5": 25.0, "r10": 50.0, "medr": 8.0, "meanr": 8.5}
    assert got["t2i"] == {"r1": 25.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.5}


def test_ranks_over_many_blocks(monkeypatch, seed):
    # Blocks of a few rows, and tie corrections split over several blocks too.
    monkeypatch.setattr(ranks_module, "BLOCK_ELEMENTS", 64)
    sim = (planted(25, 5) * 2).round() / 2
    assert recall_metrics(sim) == reference_recalls(sim, stable=True), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_recall_metrics_other_dtypes(dtype, seed):
    sim = planted(20, 5).to(dtype)
    assert recall_metrics(sim) == reference_recalls(sim.double(), stable=True), \
        f"dtype={dtype} seed={seed}"


def test_recall_metrics_takes_numpy(seed):
    sim = planted(10, 5).numpy()
    assert recall_metrics(sim) == reference_recalls(sim), f"seed={seed}"


def test_fold_metrics_is_the_mean_over_contiguous_folds(seed):
    sim = planted(50, 5)
    parts = [reference_recalls(sim[10 * f:10 * f + 10, 50 * f:50 * f + 50]) for f in range(5)]
    got = fold_metrics(sim)
    for d in ("i2t", "t2i"):
        for key in ("r1", "r5", "r10", "medr", "meanr"):
            assert got[d][key] == np.mean([p[d][key] for p in parts]), f"{d} {key} seed={seed}"
    assert got["rsum"] == np.mean([p["rsum"] for p in parts]), f"seed={seed}"
    assert fold_metrics(sim, folds=2)["rsum"] == np.mean(
        [reference_recalls(sim[25 * f:25 * f + 25, 125 * f:125 * f + 125])["rsum"]
         for f in range(2)]), f"seed={seed}"


def test_coco_1k_5fold_is_fold_metrics_on_the_coco_5k_matrix_only(seed):
    # Folds of 1,000 images: one fold keeps the test small (5,000 x 25,000 is 500 MB).
    sim = planted(1000, 5, signal=3.0)
    assert coco_1k_5fold(sim, folds=1) == fold_metrics(sim, 5, 1) == recall_metrics(sim), \
        f"seed={seed}"
    # A smaller matrix was cut into smaller folds without a word.
    for bad, kwargs in ((planted(100, 5), {}), (sim, {}), (sim[:, :4000], {"folds": 1}),
                        (sim[:, :4000], {"captions_per_image": 4}), (sim, {"folds": 2})):
        with pytest.raises(ValueError, match=r"COCO 1K 5-fold needs a \d+ x \d+ matrix .*"
                           r"got \(\d+, \d+\); fold_metrics"):
            coco_1k_5fold(bad, **kwargs)


def test_f30k_1k_is_recall_metrics_on_its_shape(seed):
    sim = planted(1000, 5, signal=3.0)
    assert f30k_1k(sim) == recall_metrics(sim), f"seed={seed}"


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 14), "shape"),
    (torch.zeros(3, 15, 1), "2-D"),
    (torch.zeros(0, 0), "shape"),
    (torch.zeros(3, 15, dtype=torch.int64), "floating"),
    ("not a matrix", "2-D"),
])
def test_recall_metrics_rejects_bad_matrices(bad, match):
    with pytest.raises(ValueError, match=match):
        recall_metrics(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_named(value):
    sim = torch.zeros(3, 15)
    sim[1, 7] = value
    for fn in (recall_metrics, fold_metrics):
        with pytest.raises(ValueError, match=r"NaN/inf.*sim\[1, 7\]"):
            fn(sim, 5) if fn is recall_metrics else fn(sim, 5, folds=3)


def test_finite_scores_whose_sum_overflows_are_accepted():
    sim = torch.full((2, 10), 3e38)
    sim[0, 0] = 0.0
    assert recall_metrics(sim)["i2t"]["r1"] == 50.0


@pytest.mark.parametrize("cpi", [0, -1, 2.5, True])
def test_bad_captions_per_image(cpi):
    with pytest.raises(ValueError, match="captions_per_image"):
        recall_metrics(torch.zeros(2, 10), cpi)


def test_protocol_shapes_are_checked():
    with pytest.raises(ValueError, match="COCO 5K needs a 5000 x 25000"):
        coco_5k(torch.zeros(10, 50))
    with pytest.raises(ValueError, match="Flickr30K 1K needs a 1000 x 5000"):
        f30k_1k(torch.zeros(10, 50))
    with pytest.raises(ValueError, match="folds"):
        fold_metrics(torch.zeros(12, 60))
    with pytest.raises(ValueError, match="COCO 1K 5-fold needs a 5000 x 25000"):
        coco_1k_5fold(torch.zeros(12, 60))


# ----------------------------------------------------------------------------- ECCV Caption


@pytest.fixture(scope="module")
def package():
    pytest.importorskip("eccv_caption")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns when ujson is missing
        from eccv_caption import Metrics
    return Metrics()


def _positions(ids, query):
    lookup = {v: i for i, v in enumerate(ids.tolist())}
    return np.array([lookup.get(v, -1) for v in query.tolist()])


@pytest.mark.parametrize("selection", ["native", "grouped"])
def test_eccv_metrics_equals_the_package(package, seed, selection, monkeypatch):
    """A planted integer-level matrix (many ties) over the real COCO 5K ids in a random order;
    the selection of top items by the native pass or by the path of other devices and dtypes
    (dive._C hidden from it)."""
    if selection == "grouped":
        monkeypatch.setattr(eccv_module._native, "cpu_module", lambda: None)
    gen = np.random.default_rng(seed)
    gt = eccv_module.ground_truth()
    image_ids = gen.permutation(np.sort(gt["coco"]["i2t"].queries))
    caption_ids = gen.permutation(gt["caption_order"])
    levels = torch.randn(5000, 25000).mul_(3)
    for name, boost in (("coco", 6.0), ("cxc", 2.0), ("eccv", 2.0)):
        q, items = gt[name]["i2t"].pairs()
        rows = _positions(image_ids, gt[name]["i2t"].queries[q])
        cols = _positions(caption_ids, items)
        levels[torch.from_numpy(rows[cols >= 0]), torch.from_numpy(cols[cols >= 0])] += boost
    levels.round_()
    got = eccv_metrics(levels / 8, image_ids, caption_ids)

    # The package's rankings, ties to the lower index: levels * 2**15 - index is exact in
    # float32 and orders by (score desc, index asc). The package reads a ranking only up to the
    # positions its metrics look at (R <= 48 for ECCV, 10 for R@10, the first 10 items of the
    # query's own 1K fold), so prefixes holding those give exactly its full-ranking result.
    fold = {c: i // 5000 for i, c in enumerate(gt["caption_order"].tolist())}
    cap_fold = np.array([fold[c] for c in caption_ids.tolist()])
    owner_fold = dict(zip(gt["coco"]["t2i"].first(caption_ids).tolist(), cap_fold.tolist()))
    img_fold = np.array([owner_fold[i] for i in image_ids.tolist()])
    rankings = []
    for dim, q_ids, i_ids, q_fold, i_fold in ((1, image_ids, caption_ids, img_fold, cap_fold),
                                              (0, caption_ids, image_ids, cap_fold, img_fold)):
        index = torch.arange(levels.shape[dim], dtype=torch.float32)
        key = levels * 32768 - (index if dim else index[:, None])
        top = key.topk(400, dim=dim).indices
        top = (top if dim else top.T).numpy()
        del key
        same_fold = (i_fold[top] == q_fold[:, None]).cumsum(1)
        assert (same_fold[:, -1] >= 10).all(), f"prefix too short, seed={seed}"
        ends = np.maximum((same_fold >= 10).argmax(1) + 1, 50)
        rankings.append({int(q_ids[a]): i_ids[top[a, :ends[a]]].tolist()
                         for a in range(len(q_ids))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = package.compute_all_metrics(
            *rankings, target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision",
                                       "coco_1k_recalls", "coco_5k_recalls", "cxc_recalls"),
            Ks=(1, 5, 10), verbose=False)
    assert list(got) == list(want), f"seed={seed}"
    for key in want:
        assert set(got[key]) == {"i2t", "t2i"}, key
        for d in ("i2t", "t2i"):
            assert got[key][d] == pytest.approx(want[key][d], rel=1e-12, abs=1e-15), \
                f"{key} {d} seed={seed}"
            assert 0 < got[key][d] < 1, f"{key} {d}: planted scores should neither miss nor " \
                f"find everything, seed={seed}"


@pytest.fixture(scope="module")
def coco_ids():
    pytest.importorskip("eccv_caption")
    gt = eccv_module.ground_truth()
    return np.sort(gt["coco"]["i2t"].queries), gt["caption_order"]


def test_eccv_metrics_bad_input(coco_ids):
    images, captions = coco_ids
    sim = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="image_ids has 2 ids but sim has 3 images"):
        eccv_metrics(sim, images[:2], captions[:4])
    with pytest.raises(ValueError, match="caption_ids has 5 ids but sim has 4 captions"):
        eccv_metrics(sim, images[:3], captions[:5])
    with pytest.raises(ValueError, match="image_ids has duplicates"):
        eccv_metrics(sim, images[[0, 1, 0]], captions[:4])
    with pytest.raises(ValueError, match=r"image_ids: 1 ids are absent from the ground truth"):
        eccv_metrics(sim, np.array([images[0], images[1], -5]), captions[:4])
    with pytest.raises(ValueError, match=r"image_ids: 4997 of the 5000 .* are missing"):
        eccv_metrics(sim, images[:3], captions[:4])
    with pytest.raises(ValueError, match=r"caption_ids: 2 ids are absent from the ground truth"):
        eccv_metrics(torch.zeros(5000, 4), images, np.array([-1, -2, *captions[:2]]))
    with pytest.raises(ValueError, match=r"caption_ids: 24996 of the 25000 .* are missing"):
        eccv_metrics(torch.zeros(5000, 4), images, captions[:4])
    with pytest.raises(ValueError, match="int ids"):
        eccv_metrics(sim, images[:3].astype(float), captions[:4])
    sim[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        eccv_metrics(sim, images[:3], captions[:4])


def test_eccv_metrics_names_the_missing_package(monkeypatch):
    eccv_module.ground_truth.cache_clear()
    monkeypatch.setattr(eccv_module.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ImportError, match=r"dive\[eval\]"):
            eccv_metrics(torch.zeros(2, 2), [1, 2], [3, 4])
    finally:
        monkeypatch.undo()
        eccv_module.ground_truth.cache_clear()


# ----------------------------------------------------------------------------- CLI


def _save_sets(path, n, k, d):
    sets = torch.nn.functional.normalize(torch.randn(n, k, d), dim=-1)
    np.save(path, sets.numpy())
    return sets


def test_cli_evaluate_embeddings_f30k(tmp_path, capsys):
    img = _save_sets(tmp_path / "img.npy", 1000, 2, 8)
    cap = img.repeat_interleave(5, 0) + 0.3 * torch.randn(5000, 2, 8)
    np.save(tmp_path / "cap.npy", cap.numpy())
    assert cli.main(["evaluate-embeddings", "--images", str(tmp_path / "img.npy"), "--captions",
                     str(tmp_path / "cap.npy"), "--protocol", "f30k", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    from dive.retrieval import similarity_matrix
    assert out["metrics"] == json.loads(json.dumps(f30k_1k(similarity_matrix(img, cap))))
    assert set(out["seconds"]) == {"load", "similarity", "metrics"}
    assert out["metrics"]["i2t"]["r1"] > 10  # planted: far above chance (0.5%)


def test_cli_evaluate_embeddings_table_and_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file
    _save_sets(tmp_path / "img.npy", 1000, 1, 4)
    save_file({"sets": torch.randn(5000, 1, 4), "other": torch.zeros(1)},
              str(tmp_path / "cap.safetensors"))
    assert cli.main(["evaluate-embeddings", "--images", str(tmp_path / "img.npy"), "--captions",
                     str(tmp_path / "cap.safetensors"), "--protocol", "f30k", "--quiet"]) == 0
    out = capsys.readouterr().out
    for text in ("Flickr30K 1K", "similarity", "metrics", "R@10", "RSUM"):
        assert text in out, text


def test_cli_evaluate_embeddings_errors(tmp_path, capsys):
    _save_sets(tmp_path / "img.npy", 10, 2, 8)
    _save_sets(tmp_path / "cap.npy", 50, 2, 8)
    _save_sets(tmp_path / "cap6.npy", 50, 2, 6)
    base = ["evaluate-embeddings", "--images", str(tmp_path / "img.npy"), "--quiet"]
    for extra, message in (
            (["--captions", str(tmp_path / "cap.npy")], "COCO 5K needs 5,000 images"),
            (["--captions", str(tmp_path / "cap6.npy"), "--protocol", "f30k"], "D=8"),
            (["--captions", str(tmp_path / "cap.npy"), "--protocol", "eccv"], "--image-ids"),
            (["--captions", str(tmp_path / "nope.npy")], "nope.npy")):
        with pytest.raises(SystemExit) as exc:
            cli.main(base + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, message


def test_cli_evaluate_embeddings_generic(tmp_path, capsys):
    # Any N images x N*c captions, as `dive evaluate --save-sets` writes them for the demo split.
    img = _save_sets(tmp_path / "img.npy", 30, 2, 8)
    cap = img.repeat_interleave(3, 0) + 0.5 * torch.randn(90, 2, 8)
    np.save(tmp_path / "cap.npy", cap.numpy())
    base = ["evaluate-embeddings", "--images", str(tmp_path / "img.npy"), "--captions",
            str(tmp_path / "cap.npy"), "--protocol", "generic", "--quiet"]
    from dive.retrieval import similarity_matrix
    want = json.loads(json.dumps(recall_metrics(similarity_matrix(img, cap), 3)))
    for extra in ([], ["--captions-per-image", "3"]):
        assert cli.main(base + extra + ["--json"]) == 0
        assert json.loads(capsys.readouterr().out)["metrics"] == want
    assert cli.main(base) == 0
    assert "30 images, 3 captions each" in capsys.readouterr().out
    for extra, message in (([], "got 30 images and 89 captions"),
                           (["--captions-per-image", "2"], "(2 per image")):
        np.save(tmp_path / "cap89.npy", cap[:89].numpy())
        cap_file = ["--captions", str(tmp_path / ("cap89.npy" if not extra else "cap.npy"))]
        with pytest.raises(SystemExit) as exc:
            cli.main(base + cap_file + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--protocol generic needs N images and N * c captions" in err and message in err


def test_cli_gallery_small(capsys):
    assert cli.main(["gallery", "--images", "40", "--dim", "32", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["seconds"]) == {"synthesize", "similarity", "metrics"}
    assert 0 <= report["recall"]["rsum"] <= 600 and "recall_5fold" in report
    assert cli.main(["gallery", "--images", "12", "--dim", "16", "--quiet", "--noise", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 images" in out and "i2t chance" in out and "RSUM 600.00" in out


def test_cli_evaluate_embeddings_eccv_reads_ids(tmp_path, capsys, monkeypatch):
    # The glue only: ids from .npy and text reach eccv_metrics in order, the table prints.
    _save_sets(tmp_path / "img.npy", 4, 2, 8)
    _save_sets(tmp_path / "cap.npy", 6, 2, 8)
    np.save(tmp_path / "iid.npy", np.array([5, 3, 9, 1]))
    (tmp_path / "cid.txt").write_text("11\n12 13\n14\n15\n16\n")
    seen = {}

    def fake_eccv(sim, image_ids, caption_ids):
        seen.update(shape=tuple(sim.shape), image_ids=list(image_ids),
                    caption_ids=list(caption_ids))
        keys = ["eccv_map_at_r", "eccv_rprecision", "eccv_r1"] + [
            f"{name}_r{k}" for name in ("coco_1k", "coco_5k", "cxc") for k in (1, 5, 10)]
        return {key: {"i2t": 0.5, "t2i": 0.25} for key in keys}

    monkeypatch.setattr(cli, "eccv_metrics", fake_eccv)
    base = ["evaluate-embeddings", "--images", str(tmp_path / "img.npy"), "--captions",
            str(tmp_path / "cap.npy"), "--protocol", "eccv", "--quiet"]
    assert cli.main(base + ["--image-ids", str(tmp_path / "iid.npy"),
                            "--caption-ids", str(tmp_path / "cid.txt")]) == 0
    assert seen == {"shape": (4, 6), "image_ids": [5, 3, 9, 1],
                    "caption_ids": [11, 12, 13, 14, 15, 16]}
    out = capsys.readouterr().out
    assert "ECCV mAP@R" in out and "CxC R@10" in out and "50.00" in out
    (tmp_path / "short.txt").write_text("11 12")
    with pytest.raises(SystemExit):
        cli.main(base + ["--image-ids", str(tmp_path / "iid.npy"),
                         "--caption-ids", str(tmp_path / "short.txt")])
    assert "2 caption ids for 4 image and 6 caption sets" in capsys.readouterr().err
