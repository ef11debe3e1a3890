"""Training, checkpoints, exact resume after a kill, evaluate, demo and visualize commands."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dive.cli import main
from dive.data import make_synthetic
from dive.train import epoch_batches, lr_factor
from tiny import events, tiny_bert_dir, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_train=60, num_dev=0, num_test=40, seed=3)
    return root


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_epoch_batches_are_a_fixed_shuffle():
    a = epoch_batches(10, 4, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]
    assert a == epoch_batches(10, 4, seed=1, epoch=0)
    assert a != epoch_batches(10, 4, seed=1, epoch=1)


def _train_cli(data, run, *extra):
    cfg = run.parent / f"{run.name}-config.json"
    return [sys.executable, "-P", "-m", "dive", "train", "--config", str(cfg), "--data",
            str(data), "--out", str(run), "--device", "cpu", "--quiet", *extra]


def test_train_writes_log_and_checkpoints_and_evaluate_agrees(data, tmp_path, capsys):
    from dive.data import Vocabulary, load_scan
    run = tmp_path / "run"
    run.mkdir()  # what a failed start on other data left: none of it is reused
    Vocabulary.build(["a zebra"]).save(run / "vocab.json")
    (run / "log.jsonl").write_text(json.dumps({"event": "step", "step": 99}) + "\n")
    (run / "best.pt").write_bytes(b"stale")
    tiny_config().save(tmp_path / "run-config.json")
    assert main(_train_cli(data, run)[4:]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.json", "vocab.json", "log.jsonl",
                                                "last.pt", "best.pt"}
    assert Vocabulary.load(run / "vocab.json").words == \
        Vocabulary.build(load_scan(data, "train").captions).words
    steps, evals = events(run, "step"), events(run, "eval")
    assert len(evals) == 2 and steps[-1]["step"] == 20  # 60 images x 5 captions / 32 per batch
    assert evals[0]["split"] == "test"  # no dev split in this data
    assert all(k in steps[0] for k in ("loss", "triplet", "mmd", "uniformity", "lr"))
    best = max(evals, key=lambda e: e["rsum"])
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--json",
          "--quiet", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rsum"] == pytest.approx(best["rsum"], abs=1e-9)
    assert got["i2t"] == pytest.approx(best["i2t"]) and got["t2i"] == pytest.approx(best["t2i"])
    main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--json",
          "--quiet", "--device", "cpu", "--save-sets", str(tmp_path / "sets")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == got
    from dive.eval import recall_metrics
    from dive.retrieval import similarity_matrix
    images = torch.from_numpy(np.load(tmp_path / "sets" / "images.npy"))
    captions = torch.from_numpy(np.load(tmp_path / "sets" / "captions.npy"))
    assert images.shape == (40, 2, 32) and captions.shape == (200, 2, 32)
    assert np.load(tmp_path / "sets" / "image_ids.npy").tolist() == list(range(40))
    assert recall_metrics(similarity_matrix(images, captions)) == got
    # The saved sets are what `dive evaluate-embeddings` reads, under its generic protocol.
    main(["evaluate-embeddings", "--images", str(tmp_path / "sets" / "images.npy"), "--captions",
          str(tmp_path / "sets" / "captions.npy"), "--protocol", "generic", "--json", "--quiet"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"] == got
    with pytest.raises(SystemExit):  # a second run into the same folder is refused
        main(_train_cli(data, run)[4:])
    # --resume with settings that contradict the saved run is an error naming them; the
    # run's own settings resume (here: nothing left to train) and log "done" once.
    resume = _train_cli(data, run, "--resume")[4:]
    own = ["train", "--resume", "--out", str(run), "--data", str(data), "--device", "cpu"]
    for argv, needle in ((resume + ["--epochs", "7"], "train.epochs 7"),
                         (own + ["--lr", "0.5"], "train.lr 0.5"),
                         (own + ["--preset", "butd_bigru"], "model.embed_dim")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and err.startswith("dive train: error: --resume: ")
        assert needle in err and "last.pt" in err, err
    assert main(resume + ["--epochs", "2"]) == 0
    assert len(events(run, "done")) == 1 and len(events(run, "step")) == len(steps)


@pytest.mark.slow  # three training runs in subprocesses
@pytest.mark.parametrize("sampling, batch_size", [("caption", 32), ("image", 8)])
def test_resume_after_kill_matches_an_uninterrupted_run(data, tmp_path, sampling, batch_size):
    config = tiny_config(epochs=3, save_every=3, sampling=sampling, batch_size=batch_size)
    config.save(tmp_path / "straight-config.json")
    config.save(tmp_path / "killed-config.json")
    subprocess.run(_train_cli(data, tmp_path / "straight"), check=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cli(data, killed), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill mid-run, between two checkpoints
        if (killed / "log.jsonl").exists() and any(e["step"] >= 4 for e in events(killed, "step")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(True for _ in events(killed, "done")), "the run ended before the kill"
    subprocess.run(_train_cli(data, killed, "--resume"), check=True, timeout=600)

    want = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    got = torch.load(killed / "last.pt", weights_only=False)
    assert got["step"] == want["step"] and got["epoch"] == want["epoch"] == 3
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert events(killed, "eval")[-1]["rsum"] == events(tmp_path / "straight", "eval")[-1]["rsum"]
    for kind, key in (("step", "step"), ("eval", "step"), ("done", "steps")):
        # each record once, though the kill came after step 4 and the checkpoint at step 3
        assert [e[key] for e in events(killed, kind)] == \
            [e[key] for e in events(tmp_path / "straight", kind)], kind


def test_worker_processes_train_the_same_weights(data, tmp_path):
    from dive.train import train
    config = tiny_config(epochs=1)
    runs = {w: train(config, data, tmp_path / f"w{w}", device="cpu", progress=False, workers=w)
            for w in (0, 2)}
    assert runs[0]["best"]["rsum"] == runs[2]["best"]["rsum"]
    want = torch.load(tmp_path / "w0" / "last.pt", weights_only=False)
    got = torch.load(tmp_path / "w2" / "last.pt", weights_only=False)
    assert got["config"]["train"]["workers"] == 2
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


def test_bert_text_encoder_trains_and_evaluate_agrees(data, tmp_path, capsys):
    from dive.data import load_scan, tokenize
    words = sorted({w for c in load_scan(data, "train").captions for w in tokenize(c)})
    bert = tiny_bert_dir(tmp_path, words)
    config = tiny_config(epochs=1).with_changes("model", text_encoder="bert",
                                                bert_path=str(bert))
    config.save(tmp_path / "run-config.json")
    run = tmp_path / "run"
    main(_train_cli(data, run)[4:])
    assert not (run / "vocab.json").exists()  # BERT brings its own tokenizer
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--json",
          "--quiet", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rsum"] == pytest.approx(events(run, "eval")[-1]["rsum"], abs=1e-9)


def test_resume_needs_a_run(tmp_path, data):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "none"), "--resume"])


def test_demo_numbers_equal_evaluate(tmp_path, capsys, monkeypatch):
    from dive import commands
    monkeypatch.setattr(commands, "make_synthetic",
                        lambda root, seed: make_synthetic(root, num_train=80, num_dev=0,
                                                          num_test=30, seed=seed))
    monkeypatch.setitem(commands.PRESETS, "demo", tiny_config(epochs=1))
    main(["demo", "--out", str(tmp_path), "--quiet", "--json", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "x chance" in printed and "i2t chance" in printed
    demo = json.loads(printed.strip().splitlines()[-1])
    main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data",
          str(tmp_path / "data"), "--json", "--quiet", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == demo


def test_visualize_writes_a_png(tmp_path, data, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    tiny_config(epochs=1).save(tmp_path / "run-config.json")
    main(_train_cli(data, run)[4:])
    out = tmp_path / "att.png"
    main(["visualize", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--index", "3",
          "--out", str(out), "--device", "cpu"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    with pytest.raises(SystemExit):
        main(["visualize", "--checkpoint", str(run / "best.pt"), "--data", str(data),
              "--index", "999", "--out", str(out)])


@pytest.mark.slow
def test_demo_beats_chance_twentyfold(tmp_path, capsys):
    """The README's main job as shipped: the full demo on CPU, R@1 >= 20x chance both ways."""
    from dive.data import load_scan
    from dive.report import chance_recalls
    main(["demo", "--out", str(tmp_path), "--quiet", "--json", "--device", "cpu"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test = load_scan(tmp_path / "data", "test")
    chance = chance_recalls(test.num_images, test.captions_per_image)
    for direction in ("i2t", "t2i"):
        assert metrics[direction]["r1"] >= 20 * chance[direction]["r1"], metrics


def test_resnet_trains_on_karpathy_image_files(tmp_path, capsys):
    """The CNN setting end to end: a Karpathy split file and an image folder, a ResNet-18
    encoder (weights from a local file), one epoch, then evaluate on the test split."""
    required = os.environ.get("DIVE_REQUIRE_TORCHVISION") == "1"
    if required:
        import torchvision
    else:
        torchvision = pytest.importorskip("torchvision")
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    words = ["red", "green", "blue", "dark", "bright", "pale"]
    entries = []
    for i in range(16):
        colour = torch.randint(0, 256, (3,), generator=gen).tolist()
        Image.new("RGB", (48, 40), tuple(colour)).save(tmp_path / f"{i}.png")
        name = words[i % 6]
        entries.append({"filename": f"{i}.png", "split": "test" if i >= 12 else "train",
                        "imgid": i, "sentences": [{"raw": f"a {name} picture {j}"}
                                                  for j in range(5)]})
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    config = tiny_config(epochs=1, batch_size=16, val_split="test").with_changes(
        "model", image_encoder="resnet", resnet_arch="resnet18", image_size=64,
        resnet_weights=str(tmp_path / "r18.pth"))
    config.save(tmp_path / "cfg.json")
    args = ["--data", str(tmp_path / "dataset.json"), "--image-root", str(tmp_path),
            "--device", "cpu", "--quiet"]
    main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"), *args])
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--json", *args])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["rsum"] == pytest.approx(events(tmp_path / "run", "eval")[0]["rsum"])
    with pytest.raises(SystemExit):  # raw images without an image folder
        main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data",
              str(tmp_path / "dataset.json")])
    # Slots laid over the image's grid; CI's torchvision venv has matplotlib.
    if required or importlib.util.find_spec("matplotlib") is not None:
        out = tmp_path / "att.png"
        main(["visualize", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--index", "1",
              "--out", str(out), *args])
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_coco_5k_split_also_reports_the_1k_folds(monkeypatch):
    from dive.eval import model as eval_module
    from dive.data import RetrievalSplit
    from dive.eval import coco_1k_5fold, recall_metrics
    sims = []

    def fake_encode(model, split, tokens, device, batch_size, progress, workers):
        gen = torch.Generator().manual_seed(0)
        return torch.randn(5000, 2, 8, generator=gen), torch.randn(25000, 2, 8, generator=gen)

    def keep(*args, **kwargs):
        sims.append(train_module_similarity(*args, **kwargs))
        return sims[-1]

    train_module_similarity = eval_module.similarity_matrix
    monkeypatch.setattr(eval_module, "encode_split", fake_encode)
    monkeypatch.setattr(eval_module, "similarity_matrix", keep)
    split = RetrievalSplit(np.zeros((5000, 1, 1), np.float32), ["x"] * 25000, 5)
    metrics = eval_module.evaluate(None, split, None, torch.device("cpu"), progress=False)
    assert metrics["coco_1k"] == coco_1k_5fold(sims[0])
    assert metrics["rsum"] == recall_metrics(sims[0])["rsum"]


def test_learning_rates_follow_the_reference():
    from dive.data import Vocabulary
    from dive.models import DivE
    from dive.train import param_groups
    config = tiny_config(lr=0.5, spm_lr_scale=0.1)
    model = DivE(config.model.replace(region_dim=6), Vocabulary.build(["a red dog"]))
    rest, slow = param_groups(model, config.train)
    assert (rest["lr"], slow["lr"]) == (0.5, pytest.approx(0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    slow_names = {names[id(p)] for p in slow["params"]}
    rest_names = {names[id(p)] for p in rest["params"]}
    assert len(slow_names) + len(rest_names) == len(names)
    assert {n for n in names.values() if n.startswith("image_encoder.")} <= slow_names
    assert any(".head.spm." in n for n in slow_names if n.startswith("text_encoder."))
    assert {n.split(".")[1] for n in rest_names} == {"embed", "gru"}
