"""A DivE run small enough to train in seconds on CPU, for the training tests."""
import json

import pytest

from dive.config import PRESETS, Config

TINY_MODEL = dict(embed_dim=32, num_slots=2, word_dim=16, depth=1, heads=2, head_dim=8,
                  ff_mult=2, dropout=0.1)
# Augmentation on (the demo has it off), so resume and data-parallel runs are checked with it.
TINY_TRAIN = dict(epochs=2, batch_size=32, warmup_steps=5, save_every=4, log_every=1,
                  eval_batch_size=64, caption_drop=0.2, region_drop=0.2)


def tiny_config(model=None, **train) -> Config:
    """The demo preset shrunk to TINY_MODEL (updated by `model`) and TINY_TRAIN (by `train`)."""
    base = PRESETS["demo"]
    config = Config(model=base.model.replace(**{**TINY_MODEL, **(model or {})}), loss=base.loss,
                    train=base.train)
    return config.with_changes("train", **{**TINY_TRAIN, **train})


def events(run, kind: str) -> list:
    """The records of one kind ("step", "eval", "done") in a run's log.jsonl."""
    with open(run / "log.jsonl") as fh:
        return [record for record in map(json.loads, fh) if record["event"] == kind]


def tiny_bert_dir(tmp_path, words=()):
    """A randomly initialised two-layer BERT and its tokenizer (the specials, a few words, then
    `words`), saved like a real checkpoint."""
    transformers = pytest.importorskip("transformers")
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "red", "car", "on"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(base + [w for w in words if w not in base]) + "\n")
    config = transformers.BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=16,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    transformers.BertTokenizer(str(vocab)).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"
