"""Checks of scalar arguments shared across dive: each names the argument in its ValueError."""
import math

from torch import Tensor


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
