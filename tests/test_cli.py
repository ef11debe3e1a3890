"""The `dive` command's failures: one line `dive <command>: error: ...` naming the flag or the
file, under that command's usage, exit code 2, no traceback, and before any work is done."""
import errno
import json
import os

import numpy as np
import pytest
import torch

from dive.cli import main
from dive.config import Config
from dive.data import Vocabulary, load_scan, make_synthetic
from dive.models import DivE
from tiny import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_train=40, num_dev=0, num_test=20, seed=5)
    return root


def fails(capsys, argv, *needles):
    """Runs `dive argv` and checks the one-line error of its subcommand; returns the line."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: dive {argv[0]} "), err  # the subcommand's usage
    error = lines[-1]
    assert error.startswith(f"dive {argv[0]}: error: "), err
    for needle in needles:
        assert str(needle) in error, (needle, error)
    return error


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--epochs", "-3"], "--epochs"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--seed", "x"], "--seed"),
    (["train", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "d", "--lr", "nan"], "--lr"),
    (["train", "--data", "d", "--workers", "-1"], "--workers"),
    (["train", "--data", "d", "--device", "bogus"], "--device"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--device", "cuda:99"], "--device"),
    (["visualize", "--checkpoint", "c", "--data", "d", "--index", "-1"], "--index"),
    (["gallery", "--images", "0"], "--images"),
    (["gallery", "--temperature", "-1"], "--temperature"),
    (["evaluate-embeddings", "--images", "a", "--captions", "b", "--temperature", "inf"],
     "--temperature"),
])
def test_a_bad_flag_fails_before_any_work(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    fails(capsys, argv + ["--out", tmp_path / "out"] if argv[0] == "demo" else argv, flag)
    assert list(tmp_path.iterdir()) == []  # no dataset built, no run folder made


def test_an_unavailable_device_is_named(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails(capsys, ["demo", "--out", tmp_path / "demo", "--device", "cuda"], "--device", "cuda")
    assert not (tmp_path / "demo").exists()


def test_a_usage_error_prints_the_subcommands_usage(capsys):
    fails(capsys, ["evaluate", "--data", "d"], "--checkpoint")  # a required flag missing


def _checkpoint(data, folder, **changes):
    """A checkpoint as `train` writes it (untrained weights, `changes` applied), beside its
    vocabulary; no training needed."""
    folder.mkdir(parents=True, exist_ok=True)
    split = load_scan(data, "train")
    config = tiny_config().with_changes("model", region_dim=split.images.shape[2])
    vocab = Vocabulary.build(split.captions)
    vocab.save(folder / "vocab.json")
    torch.manual_seed(0)
    state = DivE(config.model, vocab).state_dict()
    for name, value in changes.items():
        state[name] = value
    torch.save({"config": config.to_dict(), "model": state}, folder / "best.pt")
    return folder / "best.pt"


def test_a_checkpoint_that_is_not_one(tmp_path, data, capsys):
    good = _checkpoint(data, tmp_path / "run")
    evaluate = ["evaluate", "--data", data, "--device", "cpu", "--quiet", "--checkpoint"]
    (tmp_path / "text.pt").write_text("not a checkpoint")
    fails(capsys, evaluate + [tmp_path / "text.pt"], "text.pt", "not a dive checkpoint")
    blob = good.read_bytes()
    (tmp_path / "run" / "cut.pt").write_bytes(blob[:len(blob) // 2])
    fails(capsys, evaluate + [tmp_path / "run" / "cut.pt"], "cut.pt", "truncated")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    fails(capsys, evaluate + [tmp_path / "other.pt"], "other.pt", "'config'")
    fails(capsys, evaluate + [tmp_path], str(tmp_path), "folder")
    fails(capsys, evaluate + [tmp_path / "missing.pt"], "missing.pt", "does not exist")
    fails(capsys, ["visualize", "--checkpoint", tmp_path / "text.pt", "--data", data,
                   "--out", tmp_path / "a.png"], "text.pt")
    assert main([str(a) for a in evaluate + [good, "--json"]]) == 0  # the good one evaluates


def test_evaluate_refuses_a_model_that_gives_nan_sets(tmp_path, data, capsys):
    _checkpoint(data, tmp_path / "ok")
    state = torch.load(tmp_path / "ok" / "best.pt", weights_only=False)["model"]
    name = next(n for n in state if n.startswith("image_encoder.") and n.endswith("weight"))
    poisoned = state[name].clone()
    poisoned.view(-1)[0] = float("nan")
    path = _checkpoint(data, tmp_path / "nan", **{name: poisoned})
    fails(capsys, ["evaluate", "--checkpoint", path, "--data", data, "--device", "cpu",
                   "--quiet"], str(path), "NaN or inf", "image sets")


def _sets(path, n, k=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sets = torch.nn.functional.normalize(torch.randn(n, k, d, generator=gen), dim=-1)
    np.save(path, sets.numpy())
    return sets


def test_evaluate_embeddings_refuses_bad_files(tmp_path, capsys):
    img = _sets(tmp_path / "img.npy", 1000)
    cap = img.repeat_interleave(5, 0)
    np.save(tmp_path / "cap.npy", cap.numpy())
    base = ["evaluate-embeddings", "--protocol", "f30k", "--quiet", "--json"]
    good = ["--images", tmp_path / "img.npy", "--captions", tmp_path / "cap.npy"]
    assert main([str(a) for a in base + good]) == 0
    capsys.readouterr()

    def refused(flag, path, *needles):
        argv = list(good)
        argv[argv.index(flag) + 1] = path
        return fails(capsys, base + argv, flag, path.name, *needles)

    nan = cap.clone()
    nan[7, 1, 3] = float("nan")
    nan[4000, 0, 0] = float("inf")
    np.save(tmp_path / "nan.npy", nan.numpy())
    refused("--captions", tmp_path / "nan.npy", "2 of 5000 sets hold NaN or inf", "7, 4000")
    (tmp_path / "empty.npy").write_bytes(b"")
    refused("--images", tmp_path / "empty.npy", "not a whole .npy")
    blob = (tmp_path / "img.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[:len(blob) // 2])
    refused("--images", tmp_path / "cut.npy", "not a whole .npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    refused("--images", tmp_path / "objects.npy", "not a whole .npy")
    np.save(tmp_path / "ints.npy", np.zeros((1000, 2, 8), np.int64))
    refused("--images", tmp_path / "ints.npy", "expected float")
    (tmp_path / "folder.npy").mkdir()
    refused("--captions", tmp_path / "folder.npy", "folder")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00junk")
    refused("--images", tmp_path / "junk.safetensors", "safetensors")
    eccv = base[:1] + ["--protocol", "eccv", "--quiet"] + good
    (tmp_path / "ids.txt").write_text("1 2 x")
    fails(capsys, eccv + ["--image-ids", tmp_path / "ids.txt", "--caption-ids",
                          tmp_path / "ids.txt"], "--image-ids", "ids.txt", "integer ids")


def test_a_config_of_the_wrong_type_names_the_file_and_setting(tmp_path, data, capsys):
    train = ["train", "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--config"]
    for name, body, needles in (
            ("epochs.json", {"train": {"epochs": "5"}}, ["train.epochs", "int"]),
            ("amp.json", {"train": {"amp": 1}}, ["train.amp", "bool"]),
            ("dim.json", {"model": {"embed_dim": 1.5}}, ["model.embed_dim"]),
            ("section.json", {"loss": [1, 2]}, ["loss section"]),
            ("list.json", [1, 2], ["JSON object"]),
            ("range.json", {"train": {"epochs": 0}}, ["epochs must be a positive int"])):
        (tmp_path / name).write_text(json.dumps(body))
        fails(capsys, train + [tmp_path / name], name, *needles)
    (tmp_path / "bad.json").write_text("{")
    fails(capsys, train + [tmp_path / "bad.json"], "bad.json", "JSON")
    fails(capsys, train + [tmp_path], str(tmp_path), "folder")
    assert not (tmp_path / "run").exists()


def test_config_types():
    assert Config.from_dict({"train": {"lr": 1, "seed": 3}}).train.lr == 1  # an int is a float
    assert Config.from_dict({"model": {"bert_path": None}}).model.bert_path is None
    for section, key, value in (("train", "epochs", True), ("train", "lr", "0.1"),
                                ("model", "bert_path", 3), ("loss", "hardest", "yes")):
        with pytest.raises(TypeError, match=f"{section}.{key}"):
            Config.from_dict({section: {key: value}})


def test_data_that_is_a_file_or_missing(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    tiny_config().save(tmp_path / "cfg.json")
    train = ["train", "--config", tmp_path / "cfg.json", "--device", "cpu", "--quiet"]
    fails(capsys, train + ["--data", tmp_path / "file.txt", "--out", tmp_path / "a"],
          "--data", "file.txt")
    fails(capsys, train + ["--data", tmp_path / "none", "--out", tmp_path / "b"],
          "train_ims.npy", "does not exist")
    fails(capsys, train + ["--data", tmp_path, "--out", tmp_path / "file.txt"], "file.txt")


def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_checkpoint(tmp_path, data, capsys,
                                                                       monkeypatch):
    """The first checkpoint hits ENOSPC half-written: the error names the file, and neither a
    .tmp nor a last.pt is left."""
    tiny_config(epochs=1, save_every=1).save(tmp_path / "cfg.json")
    real_save = torch.save

    def full_disk(state, target, *args, **kwargs):
        if "optimizer" not in state:
            return real_save(state, target, *args, **kwargs)
        if isinstance(target, (str, os.PathLike)):  # half a file, then the disk is full
            with open(target, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
        else:
            target.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "last.pt"))

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    fails(capsys, ["train", "--config", tmp_path / "cfg.json", "--data", data, "--out", run,
                   "--device", "cpu", "--quiet"], "No space left on device", "last.pt")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "log.jsonl", "vocab.json"]
