"""Sharded search over torch.distributed: one SetIndex shard per rank, merged into the exact top-k.

Launch with torchrun (NCCL on GPUs, gloo on CPU) and call `init()` first. Every function here
that talks to other ranks is a collective: all ranks call it, in the same order. An error that one
rank meets (a missing shard file, a shard of another dim) is exchanged before any further
collective, so every rank raises the same ValueError instead of the healthy ranks waiting for the
failed one; a rank that dies outright makes the others raise at the collective timeout.
"""
import contextlib
import datetime
import glob
import math
import os
import re
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import finite_number
from .retrieval import SetIndex, _check_k, _crc

DEFAULT_TIMEOUT = 120.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Pads a rank's top-k when its shard holds fewer than k sets; sorts after every real id.
PAD_ID = torch.iinfo(torch.int64).max


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


def _agree(name: str, values: list):
    if any(v != values[0] for v in values[1:]):
        listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise ValueError(f"{name} differs across ranks ({listing})")
    return values[0]


def check_same(name: str, value):
    """Collective: returns `value` (a small picklable: a dim, a dtype, a shape) when every rank
    passes an equal one, else raises the same ValueError on every rank, naming ranks and values."""
    return _agree(name, gather_object(value))


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


def shard_path(directory, r: int, world: int) -> str:
    return os.path.join(os.fspath(directory), f"shard-{r}-of-{world}.safetensors")


def _missing_shard(directory, path: str, world: int) -> str:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return f"{directory}: no such directory"
    names = glob.glob(os.path.join(glob.escape(directory), "shard-*-of-*.safetensors"))
    worlds = sorted({int(m.group(1)) for m in
                     (re.search(r"-of-(\d+)\.safetensors$", n) for n in names) if m})
    if worlds and world not in worlds:
        return (f"{directory} holds the shards of {' or '.join(map(str, worlds))} ranks but this "
                f"run has {world}: relaunch with as many ranks as the index was saved with")
    return f"{path} is missing"


def merge_topk(scores: Tensor, ids: Tensor, k: int):
    """The exact top-k of the union of per-rank top-k lists, ties to the lower id.

    scores (W, Q, k') float32 and ids (W, Q, k') int64 hold each rank's first k' sets by (score
    descending, id ascending), padded with -inf and PAD_ID; returns (scores, ids), both (Q, k).
    """
    w, q, kk = scores.shape
    scores = scores.permute(1, 0, 2).reshape(q, w * kk)
    ids = ids.permute(1, 0, 2).reshape(q, w * kk)
    # Order by id, then a stable sort by score keeps equal scores in id order.
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    best = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, best), ids.gather(1, best)


def _require_init():
    if not dist.is_initialized():
        raise RuntimeError("ShardedSetIndex needs torch.distributed: call dive.distributed.init() "
                           "in a process launched by torchrun (in one process, use SetIndex)")


class ShardedSetIndex:
    """A gallery of sets with int ids split over the ranks: each rank holds one `SetIndex` shard.

    Every rank builds its own shard with `add` (local, no communication); ids must be unique
    across all shards, which `validate`, `search` and `save` check. All other methods, `len()`
    included, are collectives that every rank calls and that return the same result on every rank.

    What `search` guarantees: the result is the first k of the union of the shards ordered by
    score descending, then id ascending, with each score as the rank holding that set computed it.
    That is, scores and ids bit for bit, a single-process `SetIndex` holding the union added in
    ascending-id order (its position rule is then the id rule) whenever the op gives each
    (query, set) pair the same float32 score in the shard as in the whole gallery. The op may move
    a score by an ulp with the set's place in its block (the CPU epilogue's vector loop against
    its tail, GPU tiles and GEMM shapes), and then sets whose scores lie within that ulp may
    come in another order.
    """

    def __init__(self, dim: Optional[int] = None, set_size: Optional[int] = None, dtype=None, *,
                 temperature: float = 16.0, device=None):
        _require_init()
        self.shard = SetIndex(dim, set_size, dtype, temperature=temperature, device=device)
        self._checked = False  # whether all ranks agreed on this shard's dims and ids

    def add(self, sets: Tensor, ids, mask: Optional[Tensor] = None) -> None:
        """Adds (N, set_size, dim) sets with N new int ids to this rank's shard (local)."""
        self.shard.add(sets, ids, mask)
        self._checked = False

    def __len__(self) -> int:
        """Collective: the number of sets over all shards."""
        n = torch.tensor([len(self.shard)], dtype=torch.int64, device=collective_device())
        dist.all_reduce(n)
        return int(n.item())

    def _meta(self, **extra) -> dict:
        s = self.shard
        return {"dim": s.dim, "set_size": s.set_size,
                "dtype": None if s.dtype is None else str(s.dtype).replace("torch.", ""),
                "temperature": s.temperature, "size": len(s), "checked": self._checked, **extra}

    def _agree_meta(self, metas: list) -> dict:
        """The dims the shards agree on (None where no shard knows it yet) and the total size;
        raises the same ValueError on every rank when they disagree."""
        agreed = {}
        for name in ("dim", "set_size", "dtype", "temperature"):
            known = [m[name] for m in metas if m[name] is not None]
            if any(v != known[0] for v in known[1:]):
                listing = ", ".join(f"rank {r}: {m[name]!r}" for r, m in enumerate(metas))
                raise ValueError(f"the shards' {name} differs across ranks ({listing})")
            agreed[name] = known[0] if known else None
        agreed["size"] = sum(m["size"] for m in metas)
        if not all(m["checked"] for m in metas):
            self._check_ids()
        return agreed

    def _check_ids(self) -> None:
        all_ids = gather_object(self.shard.ids.cpu())
        owner = torch.cat([torch.full((len(ids),), r) for r, ids in enumerate(all_ids)])
        ids = torch.cat(all_ids)
        values, counts = ids.unique(return_counts=True)
        if (counts > 1).any():
            dup = values[counts > 1]
            ranks = owner[ids == dup[0]].tolist()
            raise ValueError(f"ids must be unique across shards: {len(dup)} on more than one "
                             f"rank, e.g. {dup[0].item()} on ranks {ranks}")
        self._checked = True

    def validate(self) -> None:
        """Collective: checks that the shards agree on dim, set size, dtype and temperature and
        that no id is on two ranks; raises the same ValueError on every rank otherwise."""
        self._agree_meta(gather_object(self._meta()))

    def _sort_by_id(self) -> None:
        # The merge cuts ties by id and SetIndex by position, so a shard in ascending-id order
        # gives a local top-k that is a prefix of the global order.
        ids = self.shard.ids
        if bool((ids[1:] > ids[:-1]).all()):
            return
        s = self.shard
        sets, mask = s._gallery()
        order = ids.argsort()
        shard = SetIndex(s.dim, s.set_size, s.dtype, temperature=s.temperature, device=s.device)
        at = order.to(sets.device)
        shard.add(sets[at], ids[order], None if mask is None else mask[at])
        self.shard = shard

    def search(self, query_sets: Tensor, k: int, *, query_mask: Optional[Tensor] = None):
        """Collective: the k best sets of the union for each query set.

        query_sets (Q, set_size', dim), the same on every rank (shape, dtype and a CRC32 of the
        bytes are checked); query_mask (Q, set_size') bool or None. Returns (scores (Q, k)
        float32, ids (Q, k) int64) on `collective_device()`, best first, the same on every rank;
        see the class docstring for how they compare with a single SetIndex.
        """
        error, fingerprint = None, None
        try:
            query_sets = torch.as_tensor(query_sets)
            qm = None if query_mask is None else torch.as_tensor(query_mask)
            fingerprint = (tuple(query_sets.shape), str(query_sets.dtype), _crc(query_sets),
                           None if qm is None else (tuple(qm.shape), _crc(qm)))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        metas = gather_object(self._meta(error=error, queries=fingerprint, k=k))
        failed = [(r, m["error"]) for r, m in enumerate(metas) if m["error"] is not None]
        if failed:
            raise ValueError("search: bad query_sets or query_mask on " + "; ".join(
                f"rank {r}: {message}" for r, message in failed))
        _agree("search's k", [m["k"] for m in metas])
        _agree("search's query_sets and query_mask (shape, dtype, CRC32)",
               [m["queries"] for m in metas])
        agreed = self._agree_meta(metas)
        if not agreed["size"]:
            raise ValueError("the index is empty on every rank")
        _check_k(k, agreed["size"])
        if query_sets.dim() != 3 or query_sets.shape[2] != agreed["dim"]:
            raise ValueError(f"query_sets must have shape (Q, set_size, {agreed['dim']}), got "
                             f"{tuple(query_sets.shape)}")
        nq = query_sets.shape[0]
        on = collective_device()
        scores = torch.full((nq, k), -math.inf, dtype=torch.float32, device=on)
        ids = torch.full((nq, k), PAD_ID, dtype=torch.int64, device=on)
        with fail_together("search"):
            if len(self.shard):
                self._sort_by_id()
                kk = min(k, len(self.shard))
                s, i = self.shard.search(query_sets, kk, query_mask=qm)
                scores[:, :kk], ids[:, :kk] = s, i
        all_scores = [torch.empty_like(scores) for _ in range(world_size())]
        all_ids = [torch.empty_like(ids) for _ in range(world_size())]
        dist.all_gather(all_scores, scores)
        dist.all_gather(all_ids, ids)
        return merge_topk(torch.stack(all_scores), torch.stack(all_ids), k)

    def save(self, directory) -> None:
        """Collective: validates, then writes this rank's shard (ascending ids) to
        `directory/shard-{rank}-of-{world}.safetensors` in SetIndex's format; every rank raises
        if any rank's write fails. Shard files of another world size there are left alone."""
        agreed = self._agree_meta(gather_object(self._meta()))
        with fail_together(f"saving the shards to {os.fspath(directory)}"):
            self._sort_by_id()
            if not len(self.shard):
                # An empty shard takes the others' dims so that it can be written and loaded.
                s = self.shard
                s.dim, s.set_size = agreed["dim"], agreed["set_size"]
                s.dtype = None if agreed["dtype"] is None else getattr(torch, agreed["dtype"])
            os.makedirs(directory, exist_ok=True)
            self.shard.save(shard_path(directory, rank(), world_size()))

    @classmethod
    def load(cls, directory, device=None) -> "ShardedSetIndex":
        """Collective: each rank reads its shard written by `save` with the same world size (to
        `device`, default `collective_device()`), then the shards are validated. A missing
        or corrupt file on any rank, or another world size, raises the same ValueError on every
        rank."""
        _require_init()
        r, world = rank(), world_size()
        with fail_together(f"loading the shards from {os.fspath(directory)}"):
            path = shard_path(directory, r, world)
            if not os.path.exists(path):
                raise ValueError(_missing_shard(directory, path, world))
            shard = SetIndex.load(path, collective_device() if device is None else device)
        index = cls(shard.dim, shard.set_size, shard.dtype, temperature=shard.temperature,
                    device=shard.device)
        index.shard = shard
        index.validate()
        return index
