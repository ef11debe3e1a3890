"""Text encoders: a bi-GRU over word embeddings, or a BERT-family model from a local directory."""
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .common import SetHead


def load_glove(path, vocab, dim: int) -> tuple[Tensor, int]:
    """Rows of a GloVe-format text file ("word v1 ... v_dim" per line) for the vocabulary's
    words; returns (table, words found). Words not in the file keep their random init.

    Only the lines of wanted words are parsed (glove.840B.300d has 2.2M lines), and a "word"
    with spaces in it (a few lines of glove.840B) is read as all but the last `dim` fields.
    """
    table = torch.empty(len(vocab), dim).uniform_(-0.1, 0.1)
    wanted = {word: idx for idx, word in enumerate(vocab.words)}
    found = set()
    with open(path, encoding="utf8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.partition(" ")[0] not in wanted:
                continue
            fields = line.rstrip().split(" ")
            if len(fields) <= dim:
                raise ValueError(f"{path}:{line_no}: {len(fields) - 1} values for "
                                 f"{fields[0]!r}, expected word_dim={dim}")
            word = " ".join(fields[:-dim])
            if word in wanted:
                try:
                    table[wanted[word]] = torch.tensor([float(v) for v in fields[-dim:]])
                except ValueError:
                    raise ValueError(f"{path}:{line_no}: values for {word!r} are not all "
                                     "numbers") from None
                found.add(word)
    return table, len(found)


class GRUTextEncoder(nn.Module):
    """(B, L) word ids + (B, L) mask -> (B, K, D) set, as in the paper's bi-GRU setting: the
    slots attend over the word embeddings (sine positions on the keys), and the global feature
    is the bidirectional GRU's final state (the two directions averaged, D each)."""

    def __init__(self, config, vocab_size: int, vocab=None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if config.glove_path:
            if vocab is None:
                raise ValueError("glove_path needs the vocabulary")
            table, _ = load_glove(config.glove_path, vocab, config.word_dim)
            with torch.no_grad():
                self.embed.weight.copy_(table)
        self.gru = nn.GRU(config.word_dim, config.embed_dim, batch_first=True,
                          bidirectional=True)
        self.dropout = nn.Dropout(config.dropout)
        positions = "sine_normalized" if config.word_positions == "normalized" else "sine"
        self.head = SetHead(config, config.word_dim, positions=positions)

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
        _, last = self.gru(packed)  # (2, B, D): the final state of each direction
        glob = self.dropout(last.mean(0))
        return self.head(words, glob, mask, return_attention)


class BertTokens:
    """Adapter with the Vocabulary's `encode(text) -> ids` for a Hugging Face tokenizer."""

    def __init__(self, tokenizer, max_length: int = 64):
        if tokenizer.pad_token_id != 0:
            raise ValueError(f"the tokenizer's pad id must be 0 (the collate pads with 0), got "
                             f"{tokenizer.pad_token_id}")
        self.tokenizer, self.max_length = tokenizer, max_length
        # Caption augmentation: the mask token and the word pieces a random replacement is
        # drawn from (every id but the special tokens).
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            self.mask_id = tokenizer.unk_token_id
        special = set(tokenizer.all_special_ids)
        self.word_ids = [i for i in range(len(tokenizer)) if i not in special]

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, truncation=True, max_length=self.max_length)

    def __len__(self):
        return len(self.tokenizer)


class BertTextEncoder(nn.Module):
    """(B, L) token ids + mask -> (B, K, D): a BERT-family encoder loaded from a local directory
    (never downloaded), its last hidden states projected to D, then the set head with the
    projected [CLS] state as the global feature."""

    def __init__(self, config, model=None):
        super().__init__()
        if model is None:
            model = load_bert(config.bert_path)
        self.bert = model
        self.project = nn.Linear(model.config.hidden_size, config.embed_dim)
        self.head = SetHead(config, config.embed_dim, positions=None)

    def forward(self, ids: Tensor, mask: Tensor, return_attention=False):
        local = self.project(self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state)
        # The global feature is the projected [CLS] token (BERT's own sentence summary).
        return self.head(local, local[:, 0], mask, return_attention)


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
