"""Process-group helpers over torch.distributed: joining the group torchrun describes, this
rank's place in it, small-object exchange, errors raised together on every rank, and a split of
n items or a gather of rows over the ranks.

Launch with torchrun (NCCL on GPUs, gloo on CPU) and call `init()` first. Every function here
that talks to other ranks is a collective: all ranks call it, in the same order. An error that one
rank meets (a missing file, a shard of another dim) is exchanged before any further collective,
so every rank raises the same ValueError instead of the healthy ranks waiting for the failed one;
a rank that dies outright makes the others raise at the collective timeout.
"""
import contextlib
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import finite_number

DEFAULT_TIMEOUT = 120.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init(backend: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
    """Joins the process group that torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT; returns (rank, world size).

    backend: "nccl" (the default where CUDA is available; rank r then uses GPU LOCAL_RANK) or
    "gloo". timeout: seconds a collective waits for the other ranks before it raises. A process
    that is already initialised is left as it is.
    """
    if dist.is_initialized():
        return rank(), world_size()
    seconds = finite_number("timeout (seconds)", timeout, positive=True)
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f"dive.distributed.init: the environment lacks {', '.join(missing)}, "
                           "which torchrun sets: launch with `torchrun --nproc-per-node=N ...`, "
                           "or run without the distributed option (a plain SetIndex)")
    try:
        r, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be ints, got "
                         f"{[os.environ[n] for n in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]}"
                         ) from None
    if world < 1 or not 0 <= r < world or local < 0:
        raise ValueError(f"need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got "
                         f"RANK={r} WORLD_SIZE={world} LOCAL_RANK={local}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this machine has "
                             f"{torch.cuda.device_count()} CUDA devices")
        # NCCL collectives and all_gather_object run on the current device.
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return r, world


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def collective_device() -> torch.device:
    """Where tensors for collectives live: this rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_object(value) -> list:
    """Collective: every rank's small picklable `value`, in rank order ([value] without a process
    group)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def agree(name: str, values: list):
    if any(v != values[0] for v in values[1:]):
        listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise ValueError(f"{name} differs across ranks ({listing})")
    return values[0]


def check_same(name: str, value):
    """Collective: returns `value` (a small picklable: a dim, a dtype, a shape) when every rank
    passes an equal one, else raises the same ValueError on every rank, naming ranks and values."""
    return agree(name, gather_object(value))


@contextlib.contextmanager
def fail_together(what: str):
    """Collective: runs the block, then tells every rank whether any rank's block raised.

    If one did, every rank raises the same ValueError naming each failed rank and its error (the
    failed rank chains its own exception), so no healthy rank goes on into a collective that the
    failed ones will not join::

        with fail_together("loading the shards"):
            shard = SetIndex.load(path)

    Without a process group it is a plain block: the error propagates as it is.
    """
    if not dist.is_initialized():
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:
        error = exc
    report = gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, message) for r, message in enumerate(report) if message is not None]
    if failed:
        listing = "; ".join(f"rank {r}: {message}" for r, message in failed)
        raise ValueError(f"{what} failed on {len(failed)} of {len(report)} ranks: "
                         f"{listing}") from error


def shard_range(n: int) -> range:
    """This rank's contiguous share of n items (the first n % W ranks take one more)."""
    r, world = rank(), world_size()
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def gather_rows(t: Tensor) -> Tensor:
    """Collective: every rank's `t` concatenated along dim 0 in rank order, without gradient;
    the ranks may hold different numbers of rows, and a rank with none may pass a 1-D empty
    tensor. Returned on `t`'s device; `t` itself without a process group of several ranks."""
    if world_size() == 1:
        return t
    shapes = gather_object(tuple(t.shape))
    if t.numel() == 0:
        t = t.reshape(0, *max(shapes, key=len)[1:])
    sizes = [s[0] if len(s) == t.dim() else 0 for s in shapes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]), device=collective_device())
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)
