"""Caption tokenizer and word vocabulary (no downloads: a regex instead of nltk's punkt).

`tokenize` approximates the `nltk.tokenize.word_tokenize(caption.lower())` the reference code
uses, so a vocabulary built here lines up with the reference's for the words that matter:
- lowercase; runs of letters/digits are words, hyphenated words stay whole ("black-and-white")
  and so do decimal numbers ("2.5");
- English clitics are split off as nltk does: "man's" -> "man", "'s"; "don't" -> "do", "n't";
  other inner apostrophes stay ("o'clock"); the typographic apostrophe counts as "'";
- punctuation is dropped (nltk keeps it as tokens; it carries no retrieval signal and the
  reference's caption files end most lines with ".").
"""
import json
import re
from collections import Counter
from pathlib import Path

from ..checks import count, json_file
from ..io import atomic_write

PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
# <mask> is what the reference's caption augmentation substitutes for dropped words.
SPECIALS = (PAD, START, END, UNK, MASK)

_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:-[^\W_]+)*(?:'[^\W_]+)*")
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")


def tokenize(text: str) -> list[str]:
    """Lowercased words and numbers of `text`, clitics split off, punctuation dropped."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    tokens = []
    for word in _TOKEN.findall(text.lower().replace("\u2019", "'")):
        if word.endswith("n't") and len(word) > 3:
            tokens += [word[:-3], "n't"]
            continue
        cut = word.rfind("'")
        if cut > 0 and word[cut:] in _CLITICS:
            tokens += [word[:cut], word[cut:]]
        else:
            tokens.append(word)
    return tokens


class Vocabulary:
    """Word <-> id map. Index 0 is <pad>; <start>, <end> and <unk> must be present."""

    def __init__(self, words):
        words = list(words)
        if not words or words[0] != PAD:
            raise ValueError(f"a vocabulary's first word (index 0) must be {PAD!r}, got "
                             f"{words[:1]}")
        bad = [w for w in words if not isinstance(w, str) or not w]
        if bad:
            raise ValueError(f"vocabulary words must be non-empty strings, got {bad[0]!r}")
        index = {}
        for i, word in enumerate(words):
            if word in index:
                raise ValueError(f"vocabulary word {word!r} appears twice (ids {index[word]} "
                                 f"and {i})")
            index[word] = i
        missing = [w for w in (START, END, UNK) if w not in index]
        if missing:
            raise ValueError(f"vocabulary lacks the special words {missing}")
        self.words = tuple(words)
        self.index = index
        self.pad_id, self.start_id = 0, index[START]
        self.end_id, self.unk_id = index[END], index[UNK]
        # Caption augmentation: <mask> (<unk> in a vocabulary without one) and the words a
        # random replacement is drawn from.
        self.mask_id = index.get(MASK, self.unk_id)
        self.word_ids = [i for i, w in enumerate(words) if w not in SPECIALS] or [self.unk_id]

    @classmethod
    def build(cls, captions, min_count: int = 1) -> "Vocabulary":
        """The specials, then every token seen at least `min_count` times in `captions`, most
        frequent first (ties alphabetical, so the same captions give the same ids)."""
        count("min_count", min_count)
        if isinstance(captions, str):
            raise TypeError("Vocabulary.build expects an iterable of captions, got one str")
        counts = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count),
                      key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(kept))

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word) -> bool:
        return word in self.index

    def encode(self, text: str) -> list[int]:
        """<start>, the ids of tokenize(text) (<unk> for unknown words), <end>."""
        ids = [self.index.get(w, self.unk_id) for w in tokenize(text)]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids) -> str:
        """The words of `ids` joined by spaces, without <pad>, <start> and <end>."""
        skip = (self.pad_id, self.start_id, self.end_id)
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.words):
                raise ValueError(f"id {i} is outside the vocabulary (size {len(self.words)})")
            if i not in skip:
                words.append(self.words[i])
        return " ".join(words)

    def save(self, path) -> None:
        # Written aside, then renamed: another rank may read the file while this one writes.
        text = json.dumps({"words": list(self.words)}, ensure_ascii=False)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path) -> "Vocabulary":
        """A vocabulary saved by `save`, or the reference code's JSON ({"word2idx", "idx2word",
        "idx"}) so its pretrained embedding tables keep their word ids."""
        path = Path(path)
        data = json_file(path, "vocabulary file")
        if isinstance(data, dict) and "words" in data:
            words = data["words"]
            if not isinstance(words, list):
                raise ValueError(f"vocabulary file {path}: 'words' must be a list")
        elif isinstance(data, dict) and "idx2word" in data:
            words = _reference_words(data["idx2word"], path)
        else:
            raise ValueError(f"vocabulary file {path} has neither a 'words' list nor the "
                             f"reference's 'idx2word' map")
        try:
            return cls(words)
        except ValueError as e:
            raise ValueError(f"vocabulary file {path}: {e}") from None


def _reference_words(idx2word, path):
    if not isinstance(idx2word, dict):
        raise ValueError(f"vocabulary file {path}: 'idx2word' must be an object")
    try:
        by_id = {int(k): w for k, w in idx2word.items()}
    except ValueError:
        raise ValueError(f"vocabulary file {path}: 'idx2word' keys must be integers") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"vocabulary file {path}: 'idx2word' ids must be 0..{len(by_id) - 1} "
                         f"without gaps")
    return [by_id[i] for i in range(len(by_id))]
