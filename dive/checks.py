"""Checks of arguments shared across dive: each error names the argument or file."""
import json
import math
from pathlib import Path

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def finite_number(name: str, value, *, positive: bool = False) -> float:
    """`value` (a number or a one-element tensor) as a float; ValueError unless it is finite
    (and > 0 when `positive`)."""
    kind = "positive finite" if positive else "finite"
    try:
        number = float(value.detach() if isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a {kind} number, got {value!r}") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{name} must be a {kind} number, got {value!r}")
    return number


def count(name: str, value, minimum: int = 1) -> int:
    """`value` unchanged; ValueError unless it is an int (not a bool) >= minimum ("a positive
    int" when minimum is 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def float_tensor(name: str, t, layout: str) -> None:
    """ValueError unless `t` is a float32/16, bfloat16 or float64 tensor with as many dimensions
    as `layout` names, e.g. "(N, set_size, D)"."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected float32, float16, bfloat16 or "
                         "float64")


def json_file(path, what: str):
    """The parsed contents of the UTF-8 JSON file `path`; FileNotFoundError or ValueError that
    call it "`what` <path>"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid UTF-8 JSON: {e}") from None
