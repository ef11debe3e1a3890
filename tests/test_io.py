"""dive.io.atomic_write: the file appears whole or not at all, and a failed write leaves the old
one and no temporary file (the checkpoint, the vocabulary and SetIndex all write through it)."""
from pathlib import Path

import pytest

from dive.data import Vocabulary
from dive.io import atomic_write


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_then_fail(tmp):
        open(tmp, "w").write("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_vocabulary_save_is_atomic(tmp_path, monkeypatch):
    vocab = Vocabulary.build(["a dog runs", "a cat sits"])
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path).words == vocab.words

    def half_then_fail(self, text, encoding=None):
        open(self, "w").write(text[:5])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        Vocabulary.build(["other words"]).save(path)
    monkeypatch.undo()
    assert Vocabulary.load(path).words == vocab.words
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]
