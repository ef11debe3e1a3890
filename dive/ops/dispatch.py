"""backend="auto" on CUDA tensors: the faster of the Triton and CUDA C++ kernels, per card, op,
dtype and shape class, as measured by benchmarks/gpu_check.sh and kept in dispatch.json.

Keys are "<dtype>/<class>": dtype bf16, fp16, fp32 or tf32 (fp32 with torch's TF32 matmul switch
on); class "train" when a gradient is wanted, else "gallery" (inference over a gallery). A card
missing from the table (or a key missing for it) falls back to the registry's static order.
"""
import functools
import json
import re
from importlib import resources
from typing import Optional

import torch

from ._native_args import DTYPE_NAME

# Cards of one family (e.g. "NVIDIA H100 80GB HBM3" and "NVIDIA H100 PCIe") share measurements
# when the exact name is not in the table.
_FAMILY = re.compile(r"\b([A-Z]{1,2}\d{2,3}[A-Z]?|RTX \d{4}(?: Ti)?)\b")


@functools.lru_cache(maxsize=None)
def table() -> dict:
    with resources.files("dive.ops").joinpath("dispatch.json").open() as fh:
        return json.load(fh)["cards"]


def key(dtype: torch.dtype, wants_grad: bool) -> Optional[str]:
    name = DTYPE_NAME.get(dtype)
    if name is None:
        return None
    if name == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        name = "tf32"
    return f"{name}/{'train' if wants_grad else 'gallery'}"


def family(card: str) -> Optional[str]:
    found = _FAMILY.search(card)
    return found.group(1) if found else None


def lookup(cards: dict, card: str, op: str, entry: str) -> Optional[str]:
    """The measured backend for (card, op, entry), by exact card name, else by card family."""
    if card in cards and entry in cards[card].get(op, {}):
        return cards[card][op][entry]
    fam = family(card)
    for name, ops in cards.items():
        if fam is not None and family(name) == fam and entry in ops.get(op, {}):
            return ops[op][entry]
    return None


@functools.lru_cache(maxsize=None)
def _card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured(op: str, device: torch.device, dtype: torch.dtype, wants_grad: bool):
    """The measured backend name for this call, or None (then the static order decides)."""
    entry = key(dtype, wants_grad)
    if device.type != "cuda" or entry is None or torch.compiler.is_compiling():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return lookup(table(), _card_name(index), op, entry)
