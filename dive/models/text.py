"""Text encoders: a bi-GRU over word embeddings, or a BERT-family model from a local directory."""
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .common import SetHead


def load_glove(path, vocab, dim: int) -> tuple[Tensor, int]:
    """Rows of a GloVe-format text file ("word v1 ... v_dim" per line) for the vocabulary's
    words; returns (table, words found). Words not in the file keep their random init."""
    table = torch.empty(len(vocab), dim).uniform_(-0.1, 0.1)
    wanted = {word: idx for idx, word in enumerate(vocab.words)}
    found = 0
    with open(path, encoding="utf8") as fh:
        for line_no, line in enumerate(fh, 1):
            word, *values = line.rstrip().split(" ")
            if word not in wanted:
                continue
            if len(values) != dim:
                raise ValueError(f"{path}:{line_no}: {len(values)} values for {word!r}, expected "
                                 f"word_dim={dim}")
            table[wanted[word]] = torch.tensor([float(v) for v in values])
            found += 1
    return table, found


class GRUTextEncoder(nn.Module):
    """(B, L) word ids + (B, L) mask -> (B, K, D) set: word embeddings -> bidirectional GRU
    (D/2 per direction) -> slots over the GRU states, with sine positions on the keys."""

    def __init__(self, config, vocab_size: int, vocab=None):
        super().__init__()
        if config.embed_dim % 2:
            raise ValueError(f"embed_dim must be even for the bi-GRU, got {config.embed_dim}")
        self.embed = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if config.glove_path:
            if vocab is None:
                raise ValueError("glove_path needs the vocabulary")
            table, _ = load_glove(config.glove_path, vocab, config.word_dim)
            with torch.no_grad():
                self.embed.weight.copy_(table)
        self.gru = nn.GRU(config.word_dim, config.embed_dim // 2, batch_first=True,
                          bidirectional=True)
        self.dropout = nn.Dropout(config.dropout)
        self.head = SetHead(config, positions="sine")

    def forward(self, ids: Tensor, mask: Tensor, return_attention=False):
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(f"captions must be (B, L) ids with a (B, L) mask, got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every caption needs at least one token (an empty caption?)")
        words = self.dropout(self.embed(ids))
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = self.gru(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=ids.shape[1])
        return self.head(self.dropout(states), mask, return_attention)


class BertTokens:
    """Adapter with the Vocabulary's `encode(text) -> ids` for a Hugging Face tokenizer."""

    def __init__(self, tokenizer, max_length: int = 64):
        if tokenizer.pad_token_id != 0:
            raise ValueError(f"the tokenizer's pad id must be 0 (the collate pads with 0), got "
                             f"{tokenizer.pad_token_id}")
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, truncation=True, max_length=self.max_length)

    def __len__(self):
        return len(self.tokenizer)


class BertTextEncoder(nn.Module):
    """(B, L) token ids + mask -> (B, K, D): a BERT-family encoder loaded from a local directory
    (never downloaded), its last hidden states projected to D, then the set head."""

    def __init__(self, config, model=None):
        super().__init__()
        if model is None:
            model = load_bert(config.bert_path)
        self.bert = model
        self.project = nn.Linear(model.config.hidden_size, config.embed_dim)
        self.head = SetHead(config, positions=None)

    def forward(self, ids: Tensor, mask: Tensor, return_attention=False):
        hidden = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.head(self.project(hidden), mask, return_attention)


def _local_dir(path) -> Path:
    if not path:
        raise ValueError("text_encoder='bert' needs bert_path: a local model directory")
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    return path


def load_bert(path):
    from transformers import AutoModel
    return AutoModel.from_pretrained(_local_dir(path), local_files_only=True)


def load_bert_tokens(path, max_length: int = 64) -> BertTokens:
    from transformers import AutoTokenizer
    return BertTokens(AutoTokenizer.from_pretrained(_local_dir(path), local_files_only=True),
                      max_length)
