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
    if isinstance(value, Tensor) and torch.compiler.is_compiling():
        raise ValueError(f"{name} is a tensor, which torch.compile cannot read while it traces: "
                         f"pass a Python float (e.g. float({name}) outside the compiled code)")
    try:
        number = float(value.detach() if isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a {kind} number, got {value!r}") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{name} must be a {kind} number, got {value!r}")
    return number


# The largest float32 and the smallest positive normal one: kernels take their scalars as float32.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


def float32_number(name: str, value, *, positive: bool = False) -> float:
    """finite_number that also fits float32: ValueError when `value` overflows float32 or, being
    nonzero, underflows it (rounds to 0 or a subnormal), which would change the result silently."""
    number = finite_number(name, value, positive=positive)
    if abs(number) > FLOAT32_MAX or (number != 0 and abs(number) < FLOAT32_TINY):
        raise ValueError(f"{name} must lie within float32's normal range "
                         f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}] in magnitude, got {value!r}")
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


def bool_mask(name: str, mask, shape: tuple, device: torch.device, layout: str) -> None:
    """ValueError unless `mask` is None or a bool tensor of `shape` (named `layout`, e.g.
    "(N, set_size)") on `device`."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = real element), got dtype "
                         f"{mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be a bool tensor of shape {layout} = {tuple(shape)}, got "
                         f"{tuple(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but must be on {device} with its data")


def mask_rows_nonempty(name: str, mask, row: str = "set", element: str = "valid element") -> None:
    """ValueError naming the first `row` of the bool `mask` with no True (needs the data)."""
    if mask is not None and mask.numel() and not bool(mask.any(1).all()):
        bad = int((~mask.any(1)).nonzero()[0, 0])
        raise ValueError(f"{name}: {row} {bad} has no {element} (every {row} needs at least one "
                         "True)")


# torch.compile(fullgraph=True) cannot raise a Python exception while it traces (it reports an
# "Observed exception" graph break instead), and it skips data-dependent checks. These two ops
# carry a check into the compiled graph, so the compiled call raises the eager ValueError.


@torch.library.custom_op("dive::refuse", mutates_args=())
def _refuse(like: Tensor, message: str) -> Tensor:
    raise ValueError(message)


@_refuse.register_fake
def _(like, message):
    return like.new_empty((0,))


@torch.library.custom_op("dive::nonempty_rows", mutates_args=())
def _nonempty_rows(mask: Tensor, name: str, row: str, element: str) -> Tensor:
    mask_rows_nonempty(name, mask, row, element)
    return mask.clone()


@_nonempty_rows.register_fake
def _(mask, name, row, element):
    return torch.empty_like(mask)


def refuse(error: ValueError, *tensors):
    """Raises `error`; while torch.compile traces, returns instead a tensor whose computation
    raises it when the compiled graph runs (on the first tensor among `tensors`)."""
    like = next((t for t in tensors if isinstance(t, Tensor)), None)
    if like is None or not torch.compiler.is_compiling():
        raise error
    return _refuse(like, str(error))


def checked_mask(name: str, mask, row: str = "set", element: str = "valid element"):
    """`mask` after mask_rows_nonempty; while compiling, a copy made by an op that checks at
    run time (so use the returned mask for the computation that the check guards)."""
    if mask is None or not torch.compiler.is_compiling():
        mask_rows_nonempty(name, mask, row, element)
        return mask
    return _nonempty_rows(mask, name, row, element)


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
