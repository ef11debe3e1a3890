"""ShardedSetIndex: a gallery split over the ranks of torch.distributed, one SetIndex shard per
rank, searched into the exact top-k of the union and saved all or nothing.

Launch with torchrun (NCCL on GPUs, gloo on CPU) and call `dive.distributed.init()` first. Every
method but `add` is a collective: all ranks call it, in the same order; an error that one rank
meets is raised on every rank (see dive.distributed.fail_together).
"""
import glob
import math
import os
import re
import uuid
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import (agree, collective_device, fail_together, gather_object, rank,
                           world_size)
from .index import SetIndex, crc32, read_index, write_index
from .search import check_k

# Pads a rank's top-k when its shard holds fewer than k sets; sorts after every real id.
PAD_ID = torch.iinfo(torch.int64).max
# Metadata naming the save that wrote a shard: a directory holding shards of two saves is refused.
SAVE_TAG = "shards.save"


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
            fingerprint = (tuple(query_sets.shape), str(query_sets.dtype), crc32(query_sets),
                           None if qm is None else (tuple(qm.shape), crc32(qm)))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        metas = gather_object(self._meta(error=error, queries=fingerprint, k=k))
        failed = [(r, m["error"]) for r, m in enumerate(metas) if m["error"] is not None]
        if failed:
            raise ValueError("search: bad query_sets or query_mask on " + "; ".join(
                f"rank {r}: {message}" for r, message in failed))
        agree("search's k", [m["k"] for m in metas])
        agree("search's query_sets and query_mask (shape, dtype, CRC32)",
               [m["queries"] for m in metas])
        agreed = self._agree_meta(metas)
        if not agreed["size"]:
            raise ValueError("the index is empty on every rank")
        check_k(k, agreed["size"])
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
        """Collective, all or nothing: validates, then writes this rank's shard (ascending ids)
        to `directory/shard-{rank}-of-{world}.safetensors` in SetIndex's format. Every rank
        first writes its shard aside; only when all have, each puts its shard in place (the old
        one kept aside until every rank has). A failure on any rank raises on every rank and
        leaves the shards that were there; the shards of one save share a tag that `load`
        checks, so a set mixing two saves is refused. Shard files of another world size there
        are left alone."""
        agreed = self._agree_meta(gather_object(self._meta()))
        tag = gather_object(uuid.uuid4().hex)[0]  # rank 0's, on every rank
        where = os.fspath(directory)
        path = shard_path(directory, rank(), world_size())
        staged, kept = f"{path}.{tag}.tmp", f"{path}.{tag}.old"
        try:
            with fail_together(f"saving the shards to {where}"):
                self._sort_by_id()
                if not len(self.shard):
                    # An empty shard takes the others' dims so that it can be written and loaded.
                    s = self.shard
                    s.dim, s.set_size = agreed["dim"], agreed["set_size"]
                    s.dtype = None if agreed["dtype"] is None else getattr(torch, agreed["dtype"])
                os.makedirs(directory, exist_ok=True)
                tensors, meta = self.shard._file()
                meta.update({SAVE_TAG: tag, "shards.rank": str(rank()),
                             "shards.world": str(world_size())})
                write_index(staged, tensors, meta)
            _swap_in(staged, path, kept, f"putting the shards in place in {where}")
        finally:
            for leftover in (staged, kept):
                if os.path.exists(leftover):
                    os.remove(leftover)

    @classmethod
    def load(cls, directory, device=None) -> "ShardedSetIndex":
        """Collective: each rank reads its shard written by `save` with the same world size (to
        `device`, default `collective_device()`), then the shards are validated. A missing
        or corrupt file on any rank, another world size, or shards of different saves raise
        the same ValueError on every rank."""
        _require_init()
        r, world = rank(), world_size()
        where = os.fspath(directory)
        tag = None
        with fail_together(f"loading the shards from {where}"):
            path = shard_path(directory, r, world)
            if not os.path.exists(path):
                raise ValueError(_missing_shard(directory, path, world))
            tensors, meta = read_index(path)
            if meta.get("shards.rank", str(r)) != str(r) or \
                    meta.get("shards.world", str(world)) != str(world):
                raise ValueError(f"{path} holds shard {meta['shards.rank']} of "
                                 f"{meta['shards.world']}")
            tag = meta.get(SAVE_TAG)
            shard = SetIndex._from_file(path, tensors, meta,
                                        collective_device() if device is None else device)
        tags = gather_object(tag)
        if any(t != tags[0] for t in tags[1:]):
            listing = ", ".join(f"rank {r}: {t}" for r, t in enumerate(tags))
            raise ValueError(f"the shards in {where} come from different saves ({listing}): a "
                             "save failed part-way; save the index again")
        index = cls(shard.dim, shard.set_size, shard.dtype, temperature=shard.temperature,
                    device=shard.device)
        index.shard = shard
        index.validate()
        return index


def _swap_in(staged: str, path: str, kept: str, what: str) -> None:
    """Collective: puts `staged` at `path` on every rank, or on none. The old file waits at
    `kept` until every rank has swapped; if any rank failed, every rank puts its old file back
    (or removes its new one where there was none)."""
    had_old = moved_old = swapped = False
    try:
        with fail_together(what):
            had_old = os.path.exists(path)
            if had_old:
                os.replace(path, kept)
                moved_old = True
            os.replace(staged, path)
            swapped = True
    except Exception:
        if moved_old:
            os.replace(kept, path)
        elif swapped:
            os.remove(path)
        raise
