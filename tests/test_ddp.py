"""Data-parallel training (dive.ddp, `dive train` under torchrun) on gloo processes on the CPU.

- The gradient of the global-batch loss on 2 ranks (DistributedDataParallel, all_gather with
  gradient, BatchNorm over the global batch) equals one process on the concatenated batch, in
  float64 to 1e-10, loss, parameter gradients and BatchNorm running statistics alike.
- Sharded full-gallery evaluation equals the single-process metrics.
- `dive train` through torchrun: one rank trains exactly as the plain run; two ranks log once,
  start with the plain run's loss and gradient norm, resume bit-exactly after a kill, and refuse
  a resume with another world size on every rank.

Rank groups run this file's __main__ block in subprocesses (tests/multiproc.py).
"""
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import multiproc
import tiny
from dive import ddp, distributed
from dive.cli import main
from dive.data import (ImageCaptionsDataset, PairDataset, Vocabulary, collate_image_captions,
                       collate_pairs, load_scan, make_synthetic)
from dive.eval import fold_metrics, recall_metrics
from dive.eval.recall import caption_ranks, image_ranks, metrics_from_ranks, sharded_recall
from dive.losses import DiveLoss, LossConfig
from dive.models import DivE
from dive.retrieval import similarity_matrix
from dive.train import batch_loss, epoch_batches, evaluate, train
from tiny import events

# Generous: they only catch hangs, and a busy machine slows ranks unevenly (tests/multiproc.py).
LIMIT_S = 900
TIMEOUT_S = 300
BATCH = 12


def tiny_config(**train):
    # No dropout: ranks draw other dropout masks than one process would.
    return tiny.tiny_config(model=dict(dropout=0.0), **{
        **dict(batch_size=BATCH, warmup_steps=2, save_every=3, eval_batch_size=16,
               warm_epochs=1), **train})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_train=12, num_dev=0, num_test=15, seed=5)
    return root


def loss_config():
    # Every regulariser on, so that each one's gradient crosses the all_gather.
    return LossConfig(diversity_weight=0.01)


def build(split, seed):
    torch.manual_seed(seed)
    vocab = Vocabulary.build(split.captions)
    config = tiny_config().model.replace(region_dim=split.images.shape[2])
    return DivE(config, vocab).double(), vocab


def forward(model, batch):
    img, cap = model(batch["images"].double(), batch["image_mask"], batch["captions"],
                     batch["caption_mask"])
    return img, cap


SAMPLINGS = {"caption": (PairDataset, collate_pairs),
             "image": (ImageCaptionsDataset, collate_image_captions)}


def first_batch(split, vocab, sampling, indices=None):
    """The collated global batch 0 of the sampling (or its items `indices`) and its indices."""
    dataset, collate = SAMPLINGS[sampling]
    items = dataset(split, vocab)
    if indices is None:
        indices = epoch_batches(len(items), BATCH, seed=3, epoch=0)[0]
    return collate([items[i] for i in indices]), indices


# ----------------------------------------------------------------------------- one process


def test_shard_range_covers_every_item_once(monkeypatch):
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            monkeypatch.setattr(distributed, "world_size", lambda: world)
            parts = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda: r)
                parts.append(distributed.shard_range(n))
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_block_ranks_equal_the_whole_matrix_metrics():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    cpi = 3
    sim = (torch.rand(11, 33, generator=gen) * 4).round()  # many ties, broken by index
    rows = [(0, 4), (4, 5), (5, 11)]
    cols = [(0, 10), (10, 33)]
    i2t = torch.cat([image_ranks(sim[a:b], cpi, a) for a, b in rows])
    t2i = torch.cat([caption_ranks(sim[:, a:b], cpi, a) for a, b in cols])
    assert metrics_from_ranks(i2t, t2i) == recall_metrics(sim, cpi)


def test_sync_batchnorm_in_one_process_is_batchnorm():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(6, momentum=None)))
    synced = ddp.sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], ddp.SyncBatchNorm) and isinstance(synced[2][0], ddp.SyncBatchNorm)
    assert plain.state_dict().keys() == synced.state_dict().keys()
    x = torch.randn(9, 5)
    for _ in range(2):
        assert torch.equal(plain(x), synced(x))
    for a, b in zip(plain.state_dict().values(), synced.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"expects \(N, 6, \.\.\.\)"):
        synced[1](torch.randn(4, 5))


def test_distributed_flag_without_torchrun_is_a_clear_error(data, tmp_path, monkeypatch, capsys):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--distributed"])
    assert "not launched by torchrun" in capsys.readouterr().err


# ----------------------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def two(tmp_path_factory, data):
    """Rank outcomes of group "two", and the single-process answers they are compared with."""
    split = load_scan(data, "train")
    model, vocab = build(split, seed=7)
    test = load_scan(data, "test")
    shared = {"data": str(data), "state": model.state_dict(),
              "global": {s: first_batch(split, vocab, s)[1] for s in SAMPLINGS}}
    results = multiproc.launch(__file__, "two", 2, tmp_path_factory.mktemp("two"), shared,
                               timeout=TIMEOUT_S, limit_s=LIMIT_S)
    return results, shared, model, split, test


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_each_global_batch_is_the_single_process_batch(two, sampling):
    results, shared, *_ = two
    mine, whole = [r["mine"][sampling] for r in results], shared["global"][sampling]
    assert len(mine[0]) == len(mine[1]) == BATCH // 2
    assert sorted(mine[0] + mine[1]) == sorted(whole)
    assert mine[0] == whole[0::2] and mine[1] == whole[1::2]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradients_equal_one_process_on_the_concatenated_batch(two, sampling):
    results, shared, _, split, _ = two
    model, vocab = build(split, seed=7)
    batch, _ = first_batch(split, vocab, sampling, shared["global"][sampling])
    model.train()
    img, cap = forward(model, batch)
    loss, terms = batch_loss(DiveLoss(loss_config()), img, cap, batch["image_ids"],
                             batch["caption_image_ids"])
    assert set(terms) == {"triplet", "mmd", "uniformity", "diversity"}
    loss.backward()
    for r, got in enumerate(results):
        got = got["steps"][sampling]
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-10, abs=1e-12), r
        for name, p in model.named_parameters():
            g = got["grads"][name]
            scale = p.grad.abs().max().item()
            assert (g - p.grad).abs().max().item() <= 1e-10 * max(1.0, scale), (r, name)
        for name, b in model.state_dict().items():
            if "running" in name:
                assert torch.allclose(got["buffers"][name], b, rtol=1e-10, atol=1e-12), name


def test_sharded_evaluation_equals_one_process(two):
    results, shared, model, split, test = two
    model = model.float()
    model.load_state_dict(shared["state"])
    vocab = Vocabulary.build(split.captions)
    want = evaluate(model, test, vocab, torch.device("cpu"), batch_size=4, progress=False)
    for r, got in enumerate(results):
        assert got["evaluate"] == want, r
        assert got["recall"] == got["recall_want"], r
        assert torch.equal(got["gathered"], torch.ones(3, 2, 2)), r


def test_sharded_evaluation_refuses_to_save_sets(two):
    results, *_ = two
    for got in results:
        assert got["save sets"] == "save_sets works in a single process only"


def test_a_rank_that_cannot_load_its_data_fails_every_rank(two):
    results, *_ = two
    for got in results:
        kind, message = got["bad data"]
        assert kind == "ValueError", message
        assert "starting the run failed on 1 of 2 ranks: rank 1: FileNotFoundError" in message


def rank_two(r, shared, workdir, results):
    try:  # rank 1 alone is given a missing folder; both must raise, neither may hang
        train(tiny_config(), shared["data"] if r == 0 else workdir / "nothing-here",
              workdir / "bad-run", device="cpu", progress=False)
        results["bad data"] = ("ok", "")
    except Exception as exc:
        results["bad data"] = (type(exc).__name__, str(exc))

    from torch.nn.parallel import DistributedDataParallel
    split = load_scan(shared["data"], "train")
    results["mine"], results["steps"] = {}, {}
    for sampling in SAMPLINGS:
        model, vocab = build(split, seed=7)
        batch, results["mine"][sampling] = first_batch(split, vocab, sampling)
        net = ddp.sync_batchnorm(model)
        wrapped = DistributedDataParallel(net)
        wrapped.train()
        img, cap = forward(wrapped, batch)
        loss, _ = batch_loss(DiveLoss(loss_config()), img, cap, batch["image_ids"],
                             batch["caption_image_ids"])
        loss.backward()
        results["steps"][sampling] = {
            "loss": loss.item(),
            "grads": {name: p.grad.clone() for name, p in net.named_parameters()},
            "buffers": {name: b.clone() for name, b in net.state_dict().items()}}

    model, vocab = build(split, seed=7)
    model = model.float()
    try:  # sets cannot be saved by one rank of a sharded evaluation
        evaluate(model, load_scan(shared["data"], "test"), vocab, torch.device("cpu"),
                 progress=False, save_sets=workdir / "sets")
        results["save sets"] = "ok"
    except ValueError as exc:
        results["save sets"] = str(exc)
    model.load_state_dict(shared["state"])
    test = load_scan(shared["data"], "test")
    results["evaluate"] = evaluate(model, test, vocab, torch.device("cpu"), batch_size=4,
                                   progress=False)
    # 15 images split 8 / 7: the five COCO 1K folds of 3 images land on both ranks.
    gen = torch.Generator().manual_seed(11)
    images = torch.nn.functional.normalize(torch.randn(15, 3, 8, generator=gen), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(75, 2, 8, generator=gen), dim=-1)
    results["recall"] = sharded_recall(images, captions, 5, coco_1k=True)
    sim = similarity_matrix(images, captions)
    want = recall_metrics(sim, 5)
    want["coco_1k"] = fold_metrics(sim, 5)
    results["recall_want"] = want
    # More ranks than items: rank 1 encodes nothing and holds a 1-D empty tensor.
    results["gathered"] = distributed.gather_rows(torch.ones(3, 2, 2) if r == 0
                                                 else torch.empty(0))


# ----------------------------------------------------------------------------- dive train


def dive_train(data, run, *extra, device="cpu"):
    return ["-m", "dive", "train", "--config", str(run.parent / "config.json"), "--data",
            str(data), "--out", str(run), "--device", device, "--quiet", "--dist-timeout",
            str(TIMEOUT_S), *extra]


def torchrun(nproc, data, run, *extra, device="cpu"):
    return [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *dive_train(data, run, *extra, device=device)]


# torchrun starts its workers with `python -m dive`: PYTHONSAFEPATH keeps the source tree in the
# working directory (no compiled extension) off their path, as -P does for this process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}


def run_ok(cmd):
    env = ENV
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def weights(run):
    return torch.load(run / "last.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("runs")
    tiny_config().save(root / "config.json")
    # The plain run in a process of its own with the same thread count: a CPU reduction's order
    # follows the number of threads.
    run_ok([sys.executable, "-P", *dive_train(data, root / "plain")])
    run_ok(torchrun(1, data, root / "one"))
    (root / "two.out").write_text(run_ok(torchrun(2, data, root / "two")).stdout)
    return root


@pytest.mark.slow  # torchrun training runs
def test_torchrun_with_one_process_equals_the_plain_run(runs):
    assert events(runs / "one", "step") == events(runs / "plain", "step")
    want = weights(runs / "plain")
    for name, tensor in weights(runs / "one").items():
        assert torch.equal(tensor, want[name]), name


@pytest.mark.slow  # torchrun training runs
def test_two_ranks_train_the_global_batch_and_log_once(runs):
    plain, two = runs / "plain", runs / "two"
    steps = events(two, "step")
    assert [e["step"] for e in steps] == [e["step"] for e in events(plain, "step")]
    assert len(events(two, "eval")) == 2 and len(events(two, "done")) == 1
    assert (runs / "two.out").read_text().count("checkpoints in") == 1  # rank 0 reports
    # The first step sees the same global batch and weights as the plain run.
    first = events(plain, "step")[0]
    assert steps[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert steps[0]["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)
    assert torch.load(two / "last.pt", weights_only=False)["world_size"] == 2


@pytest.mark.slow  # torchrun training runs
def test_two_ranks_resume_after_a_kill_and_refuse_another_world_size(runs, data):
    killed = runs / "killed"
    env = ENV
    proc = subprocess.Popen(torchrun(2, data, killed), start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:  # kill after the first checkpoint, before the end
        if (killed / "last.pt").exists() and not list(killed.glob("last.pt.*.tmp")):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not events(killed, "done"), "the run ended before the kill"

    wrong = subprocess.run(torchrun(1, data, killed, "--resume"), capture_output=True,
                           text=True, timeout=LIMIT_S, env=env)
    assert wrong.returncode != 0
    assert "written by a run on 2 rank(s) and this one has 1" in wrong.stderr
    with pytest.raises(SystemExit):  # nor in a plain process
        main(["train", "--data", str(data), "--out", str(killed), "--resume", "--quiet"])

    run_ok(torchrun(2, data, killed, "--resume"))
    want = weights(runs / "two")
    for name, tensor in weights(killed).items():
        assert torch.equal(tensor, want[name]), name
    assert events(killed, "eval")[-1]["rsum"] == events(runs / "two", "eval")[-1]["rsum"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torchrun_with_one_gpu_process_equals_the_plain_run(data, tmp_path):
    """On a GPU (NCCL) the kernels' atomics make two runs differ in the last bits, so the logs
    are compared at a tolerance; the first step sees identical weights and batch."""
    tiny_config().save(tmp_path / "config.json")
    run_ok([sys.executable, "-P", *dive_train(data, tmp_path / "plain", device="cuda")])
    run_ok(torchrun(1, data, tmp_path / "one", device="cuda"))
    plain, one = events(tmp_path / "plain", "step"), events(tmp_path / "one", "step")
    assert len(plain) == len(one)
    assert one[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)
    for a, b in zip(one, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), a["step"]
    assert events(tmp_path / "one", "eval")[-1]["rsum"] == pytest.approx(
        events(tmp_path / "plain", "eval")[-1]["rsum"], abs=10)


@pytest.mark.slow  # torchrun training runs
def test_a_batch_that_does_not_split_over_the_ranks_fails_on_every_rank(runs, data):
    done = subprocess.run(torchrun(2, data, runs / "odd", "--batch-size", "7"),
                          capture_output=True, text=True, timeout=LIMIT_S, env=ENV)
    assert done.returncode != 0
    assert done.stderr.count("batch_size 7 is the global batch") >= 2, done.stderr[-3000:]


if __name__ == "__main__":
    group, workdir = sys.argv[1], Path(sys.argv[2])
    shared = torch.load(workdir / "data.pt", weights_only=False)
    r, _ = distributed.init(backend="gloo", timeout=float(os.environ["TEST_TIMEOUT"]))
    results = {}
    {"two": rank_two}[group](r, shared, workdir, results)
    torch.save(results, workdir / f"result-{r}.pt")
    torch.distributed.destroy_process_group()
