"""argparse types of the `dive` command: a bad value fails at parse time, before any work,
as `dive <command>: error: argument --flag: ...` under that command's usage."""
import argparse
import math

from .runs import pick_device


def positive_int(text: str) -> int:
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    return _int(text, 0)


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def positive_float(text: str) -> float:
    return _float(text, positive=True)


def nonnegative_float(text: str) -> float:
    return _float(text, positive=False)


def _float(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise argparse.ArgumentTypeError(f"must be {kind} finite number, got {text}")
    return value


def device(text: str):
    """auto, cpu, cuda or cuda:N as a torch.device this machine can use."""
    try:
        return pick_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
