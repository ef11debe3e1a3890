"""A small registry of backends per op: what each can run on, how dispatch ranks them, and the
tolerances the tests hold each to (against the float64 reference)."""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    # Returns None when the backend can run on this device, else the reason it cannot.
    unavailable: Callable[[torch.device], Optional[str]]
    # Rank for backend="auto" per device type (lower first); absent = never chosen automatically.
    preference: dict = field(default_factory=dict)
    # Relative tolerance on gradients per input dtype (values are always compared at fp32 level).
    grad_rtol: dict = field(default_factory=dict)


_REGISTRY: dict = {}


def register(op: str, backend: Backend) -> None:
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def get(op: str, name: str) -> Backend:
    return _REGISTRY[op][name]


def available_backends(op: str = "smooth_chamfer", device="cpu") -> list:
    """Backends of `op` that this install can run on `device`, in auto-dispatch order first."""
    device = torch.device(device)
    runnable = [b for b in _REGISTRY[op].values() if b.unavailable(device) is None]
    rank = lambda b: b.preference.get(device.type, len(_REGISTRY[op]))  # noqa: E731
    return [b.name for b in sorted(runnable, key=rank)]


def resolve(op: str, name: str, device: torch.device, measured: Optional[str] = None) -> Backend:
    """The backend `name` (or, for "auto", `measured` when it can run here, else the preferred
    one); ValueError if it cannot run here."""
    table = _REGISTRY[op]
    if name == "auto" and measured in table and table[measured].unavailable(device) is None:
        return table[measured]
    if name == "auto":
        ranked = [b for b in table.values() if device.type in b.preference]
        for backend in sorted(ranked, key=lambda b: b.preference[device.type]):
            if backend.unavailable(device) is None:
                return backend
        raise ValueError(f"{op}: no backend can run on device {device}")
    if name not in table:
        raise ValueError(f"backend must be 'auto' or one of {sorted(table)}, got {name!r}")
    reason = table[name].unavailable(device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run {op} on {device}: {reason}")
    return table[name]
