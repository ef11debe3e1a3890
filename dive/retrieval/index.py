"""SetIndex: a gallery of sets with int ids, searched by exact top-k, saved as one checked file."""
import json
import os
import zlib
from typing import Optional

import torch
from torch import Tensor

from ..checks import finite_number
from ..io import atomic_write
from .search import SET_DTYPES, _dtype, check_mask, check_sets, checked_gallery_topk

INDEX_FORMAT = "dive.SetIndex/1"
# The header's checksum: every other metadata entry and each tensor's dtype and shape.
META_CRC = "crc32.meta"


def _as_ids(ids, n) -> Tensor:
    try:
        ids = torch.as_tensor(ids)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"ids must be a 1-D sequence of {n} ints in the int64 range ({exc})"
                         ) from None
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"ids must be a 1-D sequence of {n} ints (one per set), got shape "
                         f"{tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    as_int64 = ids.to(torch.int64).cpu()
    if ids.dtype == torch.uint64 and bool((as_int64 < 0).any()):
        # uint64 values past the int64 range wrap to negatives when cast.
        raise ValueError(f"ids must lie in the int64 range, got "
                         f"{ids[as_int64 < 0][0].item()}")
    ids = as_int64
    values, counts = ids.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids has duplicates, e.g. {values[counts > 1][0].item()}")
    return ids


def _device(device) -> Optional[torch.device]:
    """`device` as a torch.device that this process can allocate on; ValueError otherwise."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except (RuntimeError, TypeError, AssertionError) as exc:
        # AssertionError: "Torch not compiled with CUDA enabled".
        raise ValueError(f"device {str(device)!r} is not available here ({exc}); pass "
                         "device='cpu' or None") from None
    return parsed


def crc32(t: Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return str(zlib.crc32(memoryview(data)))


def _meta_crc(meta: dict, tensors: dict) -> str:
    header = {"meta": {k: v for k, v in meta.items() if k != META_CRC},
              "tensors": {k: [str(t.dtype), list(t.shape)] for k, t in tensors.items()}}
    return str(zlib.crc32(json.dumps(header, sort_keys=True).encode()))


def write_index(path, tensors: dict, meta: dict) -> None:
    """Writes `tensors` and `meta` (str -> str) as safetensors with the checksums that
    `read_index` checks: one per tensor and one over the metadata."""
    from safetensors.torch import save_file
    meta = {**meta, **{f"crc32.{key}": crc32(t) for key, t in tensors.items()}}
    meta[META_CRC] = _meta_crc(meta, tensors)
    save_file(tensors, os.fspath(path), metadata=meta)


def read_index(path):
    """(tensors, metadata) of a file written by `write_index`; ValueError naming the file if it
    is unreadable or any checksum fails."""
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
    if META_CRC not in meta:
        raise ValueError(f"{path}: no header checksum ({META_CRC}): written by an older dive? "
                         "Load it with that version and save it again")
    if meta[META_CRC] != _meta_crc(meta, tensors):
        raise ValueError(f"{path}: the header is corrupt (metadata checksum mismatch)")
    for key, t in tensors.items():
        if meta.get(f"crc32.{key}") != crc32(t):
            raise ValueError(f"{path}: tensor {key!r} is corrupt (checksum mismatch)")
    return tensors, meta


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
        self.device = _device(device)
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
        """Adds (N, set_size, dim) sets with N new distinct int ids; nothing is added on error.
        NaN or inf in a real element is a ValueError naming the sets; masked-out elements are
        stored as zeros."""
        sets = check_sets("sets", torch.as_tensor(sets), finite=False)
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
        mask = check_mask("mask", None if mask is None else torch.as_tensor(mask), sets)
        device, dtype = self.device or sets.device, self.dtype or sets.dtype
        if mask is not None:
            # Padding holds whatever the caller's buffer held: it never enters the index.
            sets = sets.masked_fill(~mask[..., None], 0)
        # Cast and moved before any state changes: a failed move leaves the index as it was,
        # and the check sees what is stored (a cast to float16 can overflow to inf).
        sets = check_sets("sets", sets.to(device, dtype))
        mask = None if mask is None else mask.to(device)
        if n == 0:
            return
        self.dim, self.set_size, self.dtype, self.device = d, k, dtype, device
        self._sets.append(sets)
        self._masks.append(mask)
        self.ids = torch.cat([self.ids, ids])

    def search(self, query_sets: Tensor, k: int, *, query_mask: Optional[Tensor] = None):
        """The k best sets for each query set: (scores (Q, k) float32, ids (Q, k) int64).
        Float query sets only (cast to the index dtype); NaN or inf in a real element is a
        ValueError naming the query sets."""
        if not len(self):
            raise ValueError("the index is empty")
        query_sets = torch.as_tensor(query_sets)
        if query_sets.dim() != 3 or query_sets.shape[2] != self.dim \
                or query_sets.dtype not in SET_DTYPES.values():
            raise ValueError(f"query_sets must be float sets of shape (Q, set_size, "
                             f"{self.dim}), got {query_sets.dtype} {tuple(query_sets.shape)}")
        qm = check_mask("query_mask", None if query_mask is None else
                        torch.as_tensor(query_mask), query_sets)
        check_sets("query_sets", query_sets, qm)
        if qm is not None:
            query_sets = query_sets.masked_fill(~qm[..., None], 0)  # padding is never read
        query_sets = query_sets.to(self.device, self.dtype)
        qm = None if qm is None else qm.to(self.device)
        sets, mask = self._gallery()
        scores, index = checked_gallery_topk(query_sets, sets, k, temperature=self.temperature,
                                             query_mask=qm, gallery_mask=mask)
        return scores, self.ids.to(index.device)[index]

    def _file(self):
        """(tensors, metadata) of the file that `save` writes."""
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
                "dim": str(self.dim), "temperature": repr(self.temperature)}
        return tensors, meta

    def save(self, path) -> None:
        """Writes a safetensors file (written aside, then renamed: never a half-written index)
        with a checksum over each tensor and one over the metadata."""
        tensors, meta = self._file()
        atomic_write(path, lambda tmp: write_index(tmp, tensors, meta))

    @classmethod
    def load(cls, path, device=None) -> "SetIndex":
        """Reads an index written by `save`; ValueError (and no index) if the file is not one."""
        return cls._from_file(path, *read_index(path), device)

    @classmethod
    def _from_file(cls, path, tensors: dict, meta: dict, device) -> "SetIndex":
        path = os.fspath(path)
        if meta.get("dtype") not in SET_DTYPES:
            raise ValueError(f"{path}: unknown dtype {meta.get('dtype')!r}; supported: "
                             f"{sorted(SET_DTYPES)}")
        if not {"sets", "ids"} <= set(tensors) <= {"sets", "ids", "mask"}:
            raise ValueError(f"{path}: expected tensors sets, ids and optionally mask, found "
                             f"{sorted(tensors)}")
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
