"""What a training run and the model commands share: the device, the data splits, the caption
tokenizer saved in the run folder, and reading a checkpoint with errors that name the file."""
from pathlib import Path

import torch

from .config import Config
from .data import Vocabulary, karpathy_split, load_scan
from .models.text import load_bert_tokens

# Every file a run writes into its folder (dive.io.atomic_write's NAME.<pid>.tmp beside each only
# while it is written).
RUN_FILES = ("config.json", "vocab.json", "log.jsonl", "last.pt", "best.pt")


def clear_run(folder: Path) -> None:
    """Removes what an earlier run left in `folder` (a stale vocabulary, log, checkpoints, a
    temporary file of a killed write), and nothing else."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
        for tmp in folder.glob(f"{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def pick_device(name="auto") -> torch.device:
    """The device `name` names ("auto": CUDA when available, else the CPU); ValueError when this
    machine cannot use it, so a command fails before any work rather than at the first copy."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {name!r} is not a device: use auto, cpu, cuda or "
                             "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available to this torch "
                             f"({torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"device {str(device)!r} is not available: {exc}") from None
    return device


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def text_tokens(config: Config, run_dir: Path, captions=None, save: bool = True):
    """The caption tokenizer: for the bi-GRU a vocabulary built from `captions` (and written to
    the run folder when `save`), or, without captions, the one saved there; for BERT its own.
    A new run always builds its vocabulary, so a file left by another run is never reused."""
    if config.model.text_encoder == "bert":
        return load_bert_tokens(config.model.bert_path)
    path = Path(run_dir) / "vocab.json"
    if captions is None:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the run's vocabulary is saved beside "
                                    "its checkpoints")
        return Vocabulary.load(path)
    vocab = Vocabulary.build(captions)
    if save:
        vocab.save(path)
    return vocab


def load_split(data, name: str, image_root=None, image_size: int = 512):
    """A split of a SCAN folder (precomputed features), or of a Karpathy split file (raw
    images under `image_root`, for the CNN setting)."""
    path = Path(data)
    if path.suffix == ".json":
        if image_root is None:
            raise ValueError(f"{path} is a Karpathy split file: give --image-root, the folder "
                             "its image paths start from")
        return karpathy_split(path, image_root, name, image_size=image_size)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--data {path} is a file: give a SCAN folder or a Karpathy "
                                 "split .json")
    return load_scan(path, name)


def split_or_fallback(data, name: str, image_root=None, image_size: int = 512):
    """(split, its name): the dev split falls back to test when the data has none."""
    try:
        return load_split(data, name, image_root, image_size), name
    except FileNotFoundError:
        if name != "dev" or Path(data).suffix == ".json":
            raise
        return load_scan(data, "test"), "test"


def load_checkpoint(path, keys=("config", "model")) -> dict:
    """The state dict `train` wrote to `path`, with its config parsed (under "config" as a
    Config); ValueError naming the file when it is not one, is truncated, or lacks `keys`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the same: not a whole checkpoint
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"checkpoint {path} is not a dive checkpoint or is truncated "
                         f"({reason})") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is not a dive checkpoint: no {missing}")
    try:
        state["config"] = Config.from_dict(state["config"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"checkpoint {path} holds a bad config: {exc}") from None
    return state
