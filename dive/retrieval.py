"""Full-gallery retrieval on smooth-Chamfer: the whole score matrix, exact streamed top-k, and a
saved index of sets.

Ties rank by position: among equal scores the lower gallery index comes first, the order of a
stable descending sort. Every function here (and dive.eval) follows that rule.
"""
import os
import zlib
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from .checks import bool_mask, finite_number, mask_rows_nonempty
from .ops import smooth_chamfer

# The most bytes one block of scores takes on CPU; on CUDA a block takes up to a quarter of the
# free device memory. The op's own workspace is bounded separately (dive.ops.smooth_chamfer).
BLOCK_BYTES = 64 << 20
SET_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
INDEX_FORMAT = "dive.SetIndex/1"


def __getattr__(name):
    # dive.distributed imports this module, so the sharded index is re-exported on first use.
    if name == "ShardedSetIndex":
        from .distributed import ShardedSetIndex
        return ShardedSetIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def block_budget(device: torch.device) -> int:
    """Bytes one block of float32 scores may take on `device`."""
    free = _free_bytes(device) // 4
    return free if device.type == "cuda" else min(BLOCK_BYTES, free)


def _dtype(name, dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = SET_DTYPES.get(dtype, dtype)
    if dtype not in SET_DTYPES.values():
        raise ValueError(f"{name} must be one of {sorted(SET_DTYPES)}, got {dtype!r}")
    return dtype


def similarity_matrix(x: Tensor, y: Tensor, *, temperature: float = 16.0,
                      denominator: float = 2.0, x_mask: Optional[Tensor] = None,
                      y_mask: Optional[Tensor] = None, out_device=None, dtype=None,
                      backend: str = "auto", progress: bool = False) -> Tensor:
    """The whole (NX, NY) smooth-Chamfer matrix, computed on x's device in blocks of x rows.

    Blocks are sized to the free memory of that device (see `block_budget`), so the matrix can
    go to `out_device` (e.g. "cpu" from a GPU) without ever being whole on the device; the op
    never forms the (NX*m x NY*n) cosine grid. `dtype` casts the sets first (e.g. torch.bfloat16
    on a GPU); the matrix is float32.
    """
    dtype = _dtype("dtype", dtype)
    if dtype is not None:
        x, y = x.to(dtype), y.to(dtype)
    device = x.device
    out_device = device if out_device is None else torch.device(out_device)
    if out_device.type == "cuda" and out_device.index is None:
        out_device = torch.device("cuda", torch.cuda.current_device())
    kw = dict(temperature=temperature, denominator=denominator, y_mask=y_mask, backend=backend)
    nx, ny = x.shape[0], y.shape[0]
    rows = max(1, block_budget(device) // max(1, 4 * ny))
    if rows >= nx and out_device == device:
        return smooth_chamfer(x, y, x_mask=x_mask, **kw)
    if out_device.type == "cuda" and 4 * nx * ny > _free_bytes(out_device):
        raise ValueError(f"the ({nx}, {ny}) float32 matrix does not fit in the free memory of "
                         f"{out_device}: pass out_device='cpu'")
    pin = device.type == "cuda" and out_device.type == "cpu"
    out = torch.empty(nx, ny, dtype=torch.float32, device=out_device, pin_memory=pin)
    for a0 in tqdm(range(0, nx, rows), desc="similarity", unit="block", disable=not progress,
                   leave=False):
        a1 = min(nx, a0 + rows)
        block = smooth_chamfer(x[a0:a1], y, x_mask=None if x_mask is None else x_mask[a0:a1],
                               **kw)
        out[a0:a1].copy_(block, non_blocking=pin)
    if pin:
        torch.cuda.synchronize(device)
    return out


def stable_topk(scores: Tensor, k: int):
    """Top-k of each row of a 2-D score matrix, best first, ties to the lower column.

    Exactly the first k columns of a stable descending sort, at the cost of one torch.topk:
    topk(k + 1) tells which rows have ties across the cut, and only those rows are redone.
    Returns (values, column indices), both (rows, k).
    """
    n = scores.shape[1]
    vals, idx = scores.topk(min(k + 1, n), dim=1)
    straddle = vals[:, k] == vals[:, k - 1] if n > k else None
    vals, idx = vals[:, :k], idx[:, :k]
    if straddle is not None and straddle.any():
        # topk picks among the items tied with the k-th value arbitrarily: take the lowest columns.
        rows = straddle.nonzero().squeeze(1)
        sub, kth = scores[rows], vals[rows, k - 1:]
        need = k - (sub > kth).sum(1, keepdim=True)
        tied = sub == kth
        take = (sub > kth) | (tied & (tied.cumsum(1) <= need))
        idx[rows] = take.nonzero()[:, 1].view(len(rows), k)
        vals[rows] = sub.gather(1, idx[rows])
    idx, order = idx.sort(1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def _check_k(k, n):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int between 1 and the gallery size {n}, got {k!r}")


def topk(queries: Tensor, gallery: Tensor, k: int, *, temperature: float = 16.0,
         denominator: float = 2.0, query_mask: Optional[Tensor] = None,
         gallery_mask: Optional[Tensor] = None, block: Optional[int] = None,
         backend: str = "auto"):
    """Exact top-k gallery sets for each query set, streamed over blocks of the gallery.

    Only a (queries x block) slab of scores exists at a time, merged into the running top-k, so
    a gallery whose full score matrix would not fit in memory works. `block`: gallery sets per
    step (default: sized to the free memory, see `block_budget`).
    Returns (scores (Q, k) float32, gallery indices (Q, k) int64), best first.
    """
    nq, ng = queries.shape[0], gallery.shape[0]
    _check_k(k, ng)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int or None, got {block!r}")
    # A slab of scores and its concatenation with the running top-k take at most the budget.
    budget = block_budget(queries.device) // 8
    q_rows = max(1, min(nq, budget // (k + min(ng, 1024))))
    g_step = block or max(1, budget // q_rows - k)
    kw = dict(temperature=temperature, denominator=denominator, backend=backend)
    scores = torch.empty(nq, k, dtype=torch.float32, device=queries.device)
    index = torch.empty(nq, k, dtype=torch.int64, device=queries.device)
    for q0 in range(0, nq, q_rows):
        q1 = min(nq, q0 + q_rows)
        qm = None if query_mask is None else query_mask[q0:q1]
        best = best_idx = None
        for g0 in range(0, ng, g_step):
            g1 = min(ng, g0 + g_step)
            s = smooth_chamfer(queries[q0:q1], gallery[g0:g1], x_mask=qm,
                               y_mask=None if gallery_mask is None else gallery_mask[g0:g1], **kw)
            kept = 0 if best is None else best.shape[1]
            if kept:
                # The running top-k holds lower indices than this block and keeps ties in index
                # order, so position order is index order among equal scores.
                s = torch.cat([best, s], 1)
            best, pos = stable_topk(s, min(k, s.shape[1]))
            from_block = pos - kept + g0
            best_idx = from_block if not kept else torch.where(
                pos < kept, best_idx.gather(1, pos.clamp(max=kept - 1)), from_block)
        scores[q0:q1], index[q0:q1] = best, best_idx
    return scores, index


def _as_ids(ids, n) -> Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"ids must be a 1-D sequence of {n} ints (one per set), got shape "
                         f"{tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.to(torch.int64).cpu()
    values, counts = ids.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids has duplicates, e.g. {values[counts > 1][0].item()}")
    return ids


def _crc(t: Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return str(zlib.crc32(memoryview(data)))


class SetIndex:
    """A gallery of sets with int ids, searched by exact smooth-Chamfer top-k.

    dim, set_size and dtype are fixed by the constructor or by the first `add`; later sets are
    cast to the index dtype and moved to its device. A mask (True = real element) allows sets
    smaller than set_size.
    """

    def __init__(self, dim: Optional[int] = None, set_size: Optional[int] = None, dtype=None, *,
                 temperature: float = 16.0, device=None):
        for name, value in (("dim", dim), ("set_size", set_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        value = finite_number("temperature", temperature, positive=True)
        self.dim, self.set_size, self.temperature = dim, set_size, value
        self.dtype = _dtype("dtype", dtype)
        self.device = None if device is None else torch.device(device)
        self.ids = torch.zeros(0, dtype=torch.int64)  # in the order added, on CPU
        # Sets and masks per add (mask None = all real), joined on the next search or save.
        self._sets, self._masks = [], []

    def __len__(self) -> int:
        return len(self.ids)

    def _gallery(self):
        if len(self._sets) > 1:
            masks = None
            if any(m is not None for m in self._masks):
                masks = torch.cat([torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
                                   if m is None else m for s, m in zip(self._sets, self._masks)])
            self._sets, self._masks = [torch.cat(self._sets)], [masks]
        return self._sets[0], self._masks[0]

    def add(self, sets: Tensor, ids, mask: Optional[Tensor] = None) -> None:
        """Adds (N, set_size, dim) sets with N new distinct int ids; nothing is added on error."""
        sets = torch.as_tensor(sets)
        if sets.dim() != 3:
            raise ValueError(f"sets must have shape (N, set_size, dim), got {tuple(sets.shape)}")
        if sets.dtype not in SET_DTYPES.values():
            raise ValueError(f"sets has dtype {sets.dtype}; supported: {sorted(SET_DTYPES)}")
        n, k, d = sets.shape
        if self.dim is not None and d != self.dim:
            raise ValueError(f"sets have dim {d} but the index has dim {self.dim}")
        if self.set_size is not None and k != self.set_size:
            raise ValueError(f"sets have set size {k} but the index has set size "
                             f"{self.set_size}")
        ids = _as_ids(ids, n)
        known = torch.isin(ids, self.ids)
        if known.any():
            raise ValueError(f"ids: {ids[known][0].item()} is already in the index")
        if mask is not None:
            mask = torch.as_tensor(mask)
            bool_mask("mask", mask, (n, k), None, "(N, set_size)")
            mask_rows_nonempty("mask", mask, element="real element")
        if n == 0:
            return
        self.dim, self.set_size = d, k
        self.dtype = self.dtype or sets.dtype
        self.device = self.device or sets.device
        self._sets.append(sets.to(self.device, self.dtype))
        self._masks.append(None if mask is None else mask.to(self.device))
        self.ids = torch.cat([self.ids, ids])

    def search(self, query_sets: Tensor, k: int, *, query_mask: Optional[Tensor] = None):
        """The k best sets for each query set: (scores (Q, k) float32, ids (Q, k) int64)."""
        if not len(self):
            raise ValueError("the index is empty")
        query_sets = torch.as_tensor(query_sets)
        if query_sets.dim() != 3 or query_sets.shape[2] != self.dim:
            raise ValueError(f"query_sets must have shape (Q, set_size, {self.dim}), got "
                             f"{tuple(query_sets.shape)}")
        sets, mask = self._gallery()
        qm = None if query_mask is None else torch.as_tensor(query_mask).to(self.device)
        scores, index = topk(query_sets.to(self.device, self.dtype), sets, k,
                             temperature=self.temperature, query_mask=qm, gallery_mask=mask)
        return scores, self.ids.to(index.device)[index]

    def save(self, path) -> None:
        """Writes a safetensors file (written aside, then renamed: never a half-written index)."""
        from safetensors.torch import save_file
        if self.dim is None or self.set_size is None or self.dtype is None:
            raise ValueError("an index with no sets and no dim/set_size/dtype cannot be saved")
        if len(self):
            sets, mask = self._gallery()
        else:
            sets, mask = torch.zeros(0, self.set_size, self.dim, dtype=self.dtype), None
        tensors = {"sets": sets.cpu().contiguous(), "ids": self.ids.contiguous()}
        if mask is not None:
            tensors["mask"] = mask.cpu().contiguous()
        name = next(key for key, value in SET_DTYPES.items() if value == self.dtype)
        meta = {"format": INDEX_FORMAT, "dtype": name, "set_size": str(self.set_size),
                "dim": str(self.dim), "temperature": repr(self.temperature),
                **{f"crc32.{key}": _crc(t) for key, t in tensors.items()}}
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path, device=None) -> "SetIndex":
        """Reads an index written by `save`; ValueError (and no index) if the file is not one."""
        from safetensors import SafetensorError, safe_open
        path = os.fspath(path)
        try:
            with safe_open(path, "pt") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a dive SetIndex file (format "
                             f"{meta.get('format')!r}, expected {INDEX_FORMAT!r})")
        if meta.get("dtype") not in SET_DTYPES:
            raise ValueError(f"{path}: unknown dtype {meta.get('dtype')!r}; supported: "
                             f"{sorted(SET_DTYPES)}")
        if not {"sets", "ids"} <= set(tensors) <= {"sets", "ids", "mask"}:
            raise ValueError(f"{path}: expected tensors sets, ids and optionally mask, found "
                             f"{sorted(tensors)}")
        for key, t in tensors.items():
            if meta.get(f"crc32.{key}") != _crc(t):
                raise ValueError(f"{path}: tensor {key!r} is corrupt (checksum mismatch)")
        sets = tensors["sets"]
        missing = {"set_size", "dim", "temperature"} - set(meta)
        if missing:
            raise ValueError(f"{path}: metadata lacks {sorted(missing)}")
        try:
            if sets.dtype != SET_DTYPES[meta["dtype"]]:
                raise ValueError(f"sets are {sets.dtype} but the metadata says {meta['dtype']}")
            index = cls(int(meta["dim"]), int(meta["set_size"]), sets.dtype,
                        temperature=float(meta["temperature"]),
                        device=device if device is not None else "cpu")
            index.add(sets, tensors["ids"], tensors.get("mask"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return index
