"""dive.retrieval: the blocked similarity matrix against one op call, stable and streamed top-k
against a full stable sort, SetIndex search, save/load round trips and every bad input."""
import os
import struct

import pytest
import torch

from dive import retrieval
from dive.ops import smooth_chamfer
from dive.retrieval import SetIndex, similarity_matrix, stable_topk, topk
from sets import random_mask, unit_sets


def full_topk(scores, k):
    """The spec: the first k of a stable descending sort (ties to the lower index)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


@pytest.fixture
def small_blocks(monkeypatch):
    """A CPU block budget of a few KB, so every function here runs in many blocks."""
    monkeypatch.setattr(retrieval, "BLOCK_BYTES", 4096)


def test_similarity_matrix_equals_one_op_call(small_blocks, seed):
    x, y = unit_sets(37), unit_sets(300, k=4)
    xm, ym = random_mask(37, 3), random_mask(300, 4)
    want = smooth_chamfer(x, y, x_mask=xm, y_mask=ym, temperature=8.0)
    got = similarity_matrix(x, y, x_mask=xm, y_mask=ym, temperature=8.0, out_device="cpu",
                            progress=True)
    assert got.dtype == torch.float32 and got.shape == (37, 300)
    # Blocks change the GEMM shapes, hence possibly the last bit.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")


def test_similarity_matrix_single_block_and_dtype(seed):
    x, y = unit_sets(5), unit_sets(7)
    torch.testing.assert_close(similarity_matrix(x, y), smooth_chamfer(x, y), rtol=0, atol=0,
                               msg=f"seed={seed}")
    got = similarity_matrix(x, y, dtype="bfloat16")
    want = smooth_chamfer(x.bfloat16(), y.bfloat16())
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"seed={seed}")
    with pytest.raises(ValueError, match="dtype"):
        similarity_matrix(x, y, dtype=torch.int8)


@pytest.mark.parametrize("rows,cols,k", [(1, 1, 1), (5, 40, 1), (6, 40, 7), (9, 13, 13),
                                         (30, 200, 20)])
@pytest.mark.parametrize("levels", [None, 3], ids=["continuous", "tied"])
def test_stable_topk_is_a_stable_sort_prefix(rows, cols, k, levels, seed):
    scores = torch.randn(rows, cols)
    if levels:
        scores = (scores * levels).round()
    got, want = stable_topk(scores, k), full_topk(scores, k)
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"rows={rows} cols={cols} k={k} seed={seed}"


@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("block", [None, 1, 7, 1000])
def test_topk_equals_full_matrix_topk(k, block, small_blocks, seed):
    q, g = unit_sets(11), unit_sets(64, k=4)
    qm, gm = random_mask(11, 3), random_mask(64, 4)
    scores, index = topk(q, g, k, block=block, query_mask=qm, gallery_mask=gm)
    want_scores, want_index = full_topk(smooth_chamfer(q, g, x_mask=qm, y_mask=gm), k)
    msg = f"k={k} block={block} seed={seed}"
    assert torch.equal(index, want_index), msg
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5, msg=msg)


@pytest.mark.parametrize("block", [1, 3, 8, None])
def test_topk_ties_go_to_the_lower_gallery_index(monkeypatch, block, seed):
    # Scores from a few exact levels (quarters) whatever the blocking: massive exact ties.
    def quarters(x, y, **kw):
        return x[:, 0, :1] * 0 + (y[:, 0, 0] * 8).round()[None, :] / 4

    monkeypatch.setattr(retrieval, "smooth_chamfer", quarters)
    q, g = unit_sets(4), unit_sets(40)
    got = topk(q, g, 25, block=block)
    want = full_topk(quarters(q, g), 25)
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"block={block} seed={seed}"


def test_topk_streams_a_gallery_larger_than_the_memory_cap(monkeypatch, seed):
    cap = 16 << 10
    monkeypatch.setattr(retrieval, "BLOCK_BYTES", cap)
    q, g = unit_sets(40), unit_sets(2000)
    assert 40 * 2000 * 4 > 4 * cap  # the full matrix is far over the cap
    largest = []

    def recorded(*args, **kw):
        out = smooth_chamfer(*args, **kw)
        largest.append(out.numel() * 4)
        return out

    monkeypatch.setattr(retrieval, "smooth_chamfer", recorded)
    got = topk(q, g, 10)
    assert len(largest) > 1 and max(largest) <= cap, largest
    want = full_topk(smooth_chamfer(q, g), 10)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed={seed}"


@pytest.mark.parametrize("k", [0, 65, 2.0, True, None])
def test_topk_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        topk(unit_sets(2), unit_sets(64), k)


@pytest.mark.parametrize("block", [0, -3, 1.5, True])
def test_topk_bad_block(block):
    with pytest.raises(ValueError, match="block"):
        topk(unit_sets(2), unit_sets(6), 2, block=block)


# ----------------------------------------------------------------------------- SetIndex


def filled_index(dtype=torch.float32, masked=True):
    index = SetIndex(temperature=10.0)
    a, b = unit_sets(20, k=4), unit_sets(15, k=4)
    index.add(a, torch.arange(100, 120), mask=random_mask(20, 4) if masked else None)
    index.add(b.to(dtype), list(range(500, 515)))
    return index


def test_setindex_search_equals_topk(seed):
    index = filled_index()
    assert len(index) == 35 and index.dim == 16 and index.set_size == 4
    sets_all, gallery_mask = index._gallery()
    q = unit_sets(6)
    scores, ids = index.search(q, 5)
    want_s, want_i = topk(q, sets_all, 5, temperature=10.0, gallery_mask=gallery_mask)
    assert torch.equal(scores, want_s), f"seed={seed}"
    assert torch.equal(ids, index.ids[want_i]), f"seed={seed}"
    assert ids.dtype == torch.int64 and set(ids.flatten().tolist()) <= set(index.ids.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_setindex_save_load_round_trip(tmp_path, dtype, masked, seed):
    index = SetIndex(dtype=dtype, temperature=12.5)
    index.add(unit_sets(9, k=5), range(9), mask=random_mask(9, 5) if masked else None)
    index.add(unit_sets(4, k=5), [-7, 40, 41, 2**40])
    path = tmp_path / "index.safetensors"
    index.save(path)
    loaded = SetIndex.load(path)
    assert (loaded.dtype, loaded.set_size, loaded.dim, loaded.temperature, len(loaded)) == \
        (dtype, 5, 16, 12.5, 13)
    assert torch.equal(loaded.ids, index.ids)
    q = unit_sets(3, k=2)
    for a, b in zip(index.search(q, 6), loaded.search(q, 6)):
        assert torch.equal(a, b), f"dtype={dtype} seed={seed}"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_setindex_empty_save_load(tmp_path):
    SetIndex(dim=8, set_size=2, dtype="float16").save(tmp_path / "e.st")
    loaded = SetIndex.load(tmp_path / "e.st")
    assert (len(loaded), loaded.dim, loaded.set_size, loaded.dtype) == (0, 8, 2, torch.float16)
    with pytest.raises(ValueError, match="cannot be saved"):
        SetIndex().save(tmp_path / "f.st")


def test_setindex_bad_input_leaves_the_index_unchanged(seed):
    index = filled_index(masked=False)
    before = (len(index), index.ids.clone())
    cases = [
        (lambda: index.add(unit_sets(2, k=4, d=8), [1, 2]), "dim 8 but the index has dim 16"),
        (lambda: index.add(unit_sets(2, k=3), [1, 2]), "set size 3 but the index has set size 4"),
        (lambda: index.add(unit_sets(2, k=4), [1, 1]), "duplicates"),
        (lambda: index.add(unit_sets(2, k=4), [1, 105]), "105 is already in the index"),
        (lambda: index.add(unit_sets(2, k=4), [1]), "ids must be a 1-D sequence of 2"),
        (lambda: index.add(unit_sets(2, k=4), [1.0, 2.0]), "ids must be integers"),
        (lambda: index.add(torch.zeros(2, 4, 16, dtype=torch.int32), [1, 2]), "dtype"),
        (lambda: index.add(unit_sets(2, k=4)[0], [1, 2]), r"shape \(N, set_size, dim\)"),
        (lambda: index.add(unit_sets(2, k=4), [1, 2], mask=torch.ones(2, 3, dtype=torch.bool)),
         "mask must be a bool tensor of shape"),
        (lambda: index.add(unit_sets(2, k=4), [1, 2], mask=torch.ones(2, 4)), "mask must be a bool"),
        (lambda: index.add(unit_sets(2, k=4), [1, 2],
                           mask=torch.tensor([[True] * 4, [False] * 4])),
         "set 1 has no real element"),
        (lambda: index.search(unit_sets(2, k=4, d=8), 3), "query_sets must have shape"),
        (lambda: index.search(unit_sets(2), 36), "k must be"),
        (lambda: index.search(unit_sets(2), 0), "k must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert len(index) == before[0] and torch.equal(index.ids, before[1])
    for kwargs, message in (({"dtype": "int8"}, "dtype must be one of"),
                            ({"dtype": torch.complex64}, "dtype must be one of"),
                            ({"dim": 0}, "dim must be"), ({"set_size": 2.5}, "set_size must be"),
                            ({"temperature": 0}, "temperature"),
                            ({"temperature": "warm"}, "temperature .* got 'warm'")):
        with pytest.raises(ValueError, match=message):
            SetIndex(**kwargs)
    with pytest.raises(ValueError, match="empty"):
        SetIndex().search(unit_sets(1), 1)


def _raw_safetensors(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)


def test_setindex_load_rejects_bad_files(tmp_path):
    good = tmp_path / "good.st"
    filled_index().save(good)
    data = good.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]

    def write(name, blob):
        (tmp_path / name).write_bytes(blob)
        return tmp_path / name

    bad = {
        "truncated": (write("t.st", data[:len(data) * 2 // 3]), "not a readable"),
        "header only": (write("h.st", data[:8 + header_len]), "not a readable"),
        "empty": (write("e.st", b""), "not a readable"),
        "garbage": (write("g.st", os.urandom(200)), "not a readable"),
        "flipped payload byte": (
            write("c.st", data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]), "corrupt"),
    }
    meta = {"format": retrieval.INDEX_FORMAT, "dtype": "float32", "set_size": "2", "dim": "3",
            "temperature": "16.0"}
    plain = {"sets": torch.zeros(2, 2, 3), "ids": torch.arange(2)}

    def crafted(name, tensors, **changes):
        m = {**meta, **changes}
        m.update({f"crc32.{k}": retrieval._crc(t) for k, t in tensors.items()})
        _raw_safetensors(tmp_path / name, tensors, {k: v for k, v in m.items() if v is not None})
        return tmp_path / name

    bad.update({
        "not an index": (crafted("n.st", plain, format=None), "not a dive SetIndex"),
        "unknown dtype": (crafted("u.st", {"sets": torch.zeros(2, 2, 3, dtype=torch.int8),
                                           "ids": torch.arange(2)}, dtype="int8"),
                          "unknown dtype 'int8'"),
        "dtype mismatch": (crafted("m.st", plain, dtype="float16"), "metadata says float16"),
        "missing ids": (crafted("i.st", {"sets": torch.zeros(2, 2, 3)}), "expected tensors"),
        "duplicate ids": (crafted("d.st", {"sets": torch.zeros(2, 2, 3),
                                           "ids": torch.tensor([4, 4])}), "duplicates"),
        "set size mismatch": (crafted("s.st", plain, set_size="5"), "set size 2"),
        "missing metadata": (crafted("x.st", plain, dim=None), "lacks"),
    })
    _raw_safetensors(tmp_path / "k.st", plain, {**meta, "crc32.sets": "1", "crc32.ids": "2"})
    bad["wrong checksums"] = (tmp_path / "k.st", "corrupt")
    for name, (path, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            SetIndex.load(path)
    with pytest.raises(FileNotFoundError):
        SetIndex.load(tmp_path / "missing.st")
