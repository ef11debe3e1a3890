"""dive.retrieval: the blocked similarity matrix against one op call, stable and streamed top-k
against a full stable sort, SetIndex search, save/load round trips and every bad input (NaN or
inf in a real element, masks, ids, devices, corrupt files)."""
import os
import struct

import numpy as np
import pytest
import torch

from dive import retrieval
from dive.ops import smooth_chamfer
from dive.retrieval import SetIndex, similarity_matrix, stable_topk, topk
from dive.retrieval import index as index_file
from dive.retrieval import search
from sets import random_mask, unit_sets




def full_topk(scores, k):
    """The spec: the first k of a stable descending sort (ties to the lower index)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


def assert_topk_close(got, scores, k, msg, tol=1e-5):
    """`got` (values, indices) is the top-k of the score matrix `scores` up to the op's freedom
    to move a score by an ulp with a set's place in its block: values to `tol`, each index's own
    score its value, and the index of the full stable sort wherever that score is more than
    2 * tol from its neighbours in the ranking (where it cannot have changed places)."""
    values, index = got
    want_values, want_index = full_topk(scores, k)
    torch.testing.assert_close(values, want_values, rtol=0, atol=tol, msg=msg)
    torch.testing.assert_close(scores.gather(1, index), values, rtol=0, atol=tol, msg=msg)
    assert (index.sort(1).values.diff(1) != 0).all(), f"an index twice in a row: {msg}"
    ranked = scores.sort(1, descending=True).values[:, :k + 1]
    inf = torch.full((len(scores), 1), torch.inf)
    above = torch.cat([inf, ranked[:, :k - 1]], 1) - ranked[:, :k]
    below = ranked[:, :k] - torch.cat([ranked[:, 1:], -inf], 1)[:, :k]
    apart = torch.minimum(above, below) > 2 * tol
    assert torch.equal(index[apart], want_index[apart]), msg


@pytest.fixture
def small_blocks(monkeypatch):
    """A CPU block budget of a few KB, so every function here runs in many blocks."""
    monkeypatch.setattr(search, "BLOCK_BYTES", 4096)


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
    got = topk(q, g, k, block=block, query_mask=qm, gallery_mask=gm)
    assert_topk_close(got, smooth_chamfer(q, g, x_mask=qm, y_mask=gm), k,
                      f"k={k} block={block} seed={seed}")


@pytest.mark.parametrize("block", [1, 3, 8, None])
def test_topk_ties_go_to_the_lower_gallery_index(monkeypatch, block, seed):
    # Scores from a few exact levels (quarters) whatever the blocking: massive exact ties.
    def quarters(x, y, **kw):
        return x[:, 0, :1] * 0 + (y[:, 0, 0] * 8).round()[None, :] / 4

    monkeypatch.setattr(search, "smooth_chamfer", quarters)
    q, g = unit_sets(4), unit_sets(40)
    got = topk(q, g, 25, block=block)
    want = full_topk(quarters(q, g), 25)
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"block={block} seed={seed}"


def test_topk_streams_a_gallery_larger_than_the_memory_cap(monkeypatch, seed):
    cap = 16 << 10
    monkeypatch.setattr(search, "BLOCK_BYTES", cap)
    q, g = unit_sets(40), unit_sets(2000)
    assert 40 * 2000 * 4 > 4 * cap  # the full matrix is far over the cap
    largest = []

    def recorded(*args, **kw):
        out = smooth_chamfer(*args, **kw)
        largest.append(out.numel() * 4)
        return out

    monkeypatch.setattr(search, "smooth_chamfer", recorded)
    got = topk(q, g, 10)
    assert len(largest) > 1 and max(largest) <= cap, largest
    # Other blockings than one op call over the whole gallery: a score may move by an ulp.
    assert_topk_close(got, smooth_chamfer(q, g), 10, f"seed={seed}")


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
        (lambda: index.add(unit_sets(2, k=4)[0], [1, 2]), r"sets must have shape \(N, set_size, D\)"),
        (lambda: index.add(unit_sets(2, k=4), [1, 2], mask=torch.ones(2, 3, dtype=torch.bool)),
         r"mask must be a bool tensor of shape \(N, set_size\) = \(2, 4\)"),
        (lambda: index.add(unit_sets(2, k=4), [1, 2], mask=torch.ones(2, 4)), "mask must be a bool"),
        (lambda: index.add(unit_sets(2, k=4), [1, 2], mask=torch.tensor([[True] * 4, [False] * 4])),
         "set 1 has no real element"),
        (lambda: index.search(unit_sets(2, k=4, d=8), 3), "query_sets must be float sets of shape"),
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
            write("c.st", data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]),
            r"tensor '\w+' is corrupt"),
    }
    meta = {"format": retrieval.INDEX_FORMAT, "dtype": "float32", "set_size": "2", "dim": "3",
            "temperature": "16.0"}
    plain = {"sets": torch.zeros(2, 2, 3), "ids": torch.arange(2)}

    def crafted(name, tensors, **changes):
        m = {**meta, **changes}
        index_file.write_index(tmp_path / name, tensors,
                               {k: v for k, v in m.items() if v is not None})
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
    bad["no header checksum"] = (tmp_path / "k.st", "no header checksum")
    meta_crc = index_file.read_index(crafted("w.st", plain))[1]["crc32.meta"]
    _raw_safetensors(tmp_path / "v.st", plain, {**meta, "crc32.sets": "1", "crc32.ids": "2",
                                                "crc32.meta": meta_crc})
    bad["wrong checksums"] = (tmp_path / "v.st", "header is corrupt")
    for name, (path, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            SetIndex.load(path)
    with pytest.raises(FileNotFoundError):
        SetIndex.load(tmp_path / "missing.st")


def test_assert_topk_close_catches_a_wrong_top_k():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.7]])
    assert_topk_close((torch.tensor([[0.9, 0.7]]), torch.tensor([[0, 3]])), scores, 2, "right")
    for values, index in (([[0.9, 0.7]], [[3, 0]]), ([[0.9, 0.5]], [[0, 1]]),
                          ([[0.9, 0.9]], [[0, 0]])):
        with pytest.raises(AssertionError):
            assert_topk_close((torch.tensor(values), torch.tensor(index)), scores, 2, "wrong")


def test_setindex_header_checksum_catches_a_flipped_digit(tmp_path):
    path = tmp_path / "index.st"
    filled_index().save(path)
    data = path.read_bytes()
    assert data.count(b'"temperature":"10.0"') == 1
    path.write_bytes(data.replace(b'"temperature":"10.0"', b'"temperature":"19.0"'))
    with pytest.raises(ValueError, match="header is corrupt"):
        SetIndex.load(path)


@pytest.mark.parametrize("ids", [[0, 2**63], [-2**63 - 1, 1], np.array([2**63, 1], np.uint64)],
                         ids=["above", "below", "uint64"])
def test_setindex_ids_outside_int64_are_an_error(ids):
    index = filled_index()
    before = index.ids.clone()
    with pytest.raises(ValueError, match="ids must .*int64"):
        index.add(unit_sets(2, k=4), ids)
    assert torch.equal(index.ids, before)
    index.add(unit_sets(2, k=4), np.array([7, 2**63 - 1], np.uint64))
    assert index.ids[-1].item() == 2**63 - 1


def test_non_float_queries_are_an_error():
    index = filled_index()
    ints = torch.ones(2, 4, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="query_sets must be float sets .*torch.int64"):
        index.search(ints, 3)
    with pytest.raises(ValueError, match="queries has dtype torch.int64"):
        topk(ints, unit_sets(5, k=4), 2)
    with pytest.raises(ValueError, match="gallery has dtype torch.int32"):
        topk(unit_sets(2), ints[:1].int(), 1)
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        similarity_matrix(ints, unit_sets(5))


def test_masks_are_checked_whole_before_blocking(small_blocks):
    q, g = unit_sets(11), unit_sets(64, k=4)
    # A mask longer than its sets was cut to fit each block.
    long_q, long_g = random_mask(14, 3), random_mask(70, 4)
    for kwargs, name in (({"query_mask": long_q}, "query_mask"),
                         ({"gallery_mask": long_g}, "gallery_mask")):
        with pytest.raises(ValueError, match=rf"{name} must be a bool tensor of shape \("):
            topk(q, g, 3, block=7, **kwargs)
    with pytest.raises(ValueError,
                       match=r"x_mask must be a bool tensor of shape \(N, set_size\) = \(37, 3\)"):
        similarity_matrix(unit_sets(37), unit_sets(300), x_mask=random_mask(40, 3))
    with pytest.raises(ValueError, match="gallery_mask must be a bool"):
        topk(q, g, 3, gallery_mask=torch.ones(64, 4))
    empty = random_mask(64, 4)
    empty[50] = False
    with pytest.raises(ValueError, match="gallery_mask: set 50 has no real element"):
        topk(q, g, 3, block=7, gallery_mask=empty)
    index = filled_index()
    with pytest.raises(ValueError,
                       match=r"query_mask must be a bool tensor of shape \(N, set_size\) = \(2, 3\)"):
        index.search(unit_sets(2), 3, query_mask=random_mask(5, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_setindex_on_an_unavailable_device_is_a_clear_error(tmp_path):
    for device in ("cuda", "cuda:3", "nonsense"):
        with pytest.raises(ValueError, match=f"device '{device}' is not available"):
            SetIndex(device=device)
    filled_index().save(tmp_path / "i.st")
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        SetIndex.load(tmp_path / "i.st", device="cuda")


def test_setindex_refuses_non_finite_sets_naming_the_rows(seed):
    index = filled_index()
    before = (len(index), index.ids.clone())
    bad = unit_sets(14, k=4)
    bad[2, 1, 3], bad[5, 0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"sets holds NaN or inf in 2 of its 14 sets "
                       r"\(rows 2, 5\)"):
        index.add(bad, range(1000, 1014))
    assert len(index) == before[0] and torch.equal(index.ids, before[1])
    many = unit_sets(30, k=4)
    many[::2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"in 15 of its 30 sets \(rows 0, 2, .*, 18, \.\.\.\)"):
        index.add(many, range(1000, 1030))
    q = unit_sets(3, k=2)
    q[1, 1, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"query_sets holds NaN or inf .*\(rows 1\)"):
        index.search(q, 2)


def test_padding_may_hold_anything(seed):
    # NaN, inf and huge values in masked-out elements are accepted and change nothing.
    clean, m = unit_sets(9, k=4), random_mask(9, 4)
    poisoned = clean.clone()
    poison = torch.tensor([float("nan"), float("inf"), -1e30])
    poisoned[~m] = poison[torch.arange(int((~m).sum())) % 3, None]
    q, qm = unit_sets(5), random_mask(5, 3)
    q_poisoned = q.clone()
    q_poisoned[~qm] = float("nan")
    a, b = SetIndex(), SetIndex()
    a.add(clean.masked_fill(~m[..., None], 0), range(9), m)
    b.add(poisoned, range(9), m)
    for got, want in zip(b.search(q_poisoned, 4, query_mask=qm), a.search(q, 4, query_mask=qm)):
        assert torch.equal(got, want), f"seed={seed}"


def test_topk_and_similarity_matrix_refuse_non_finite_sets(small_blocks):
    q, g = unit_sets(6), unit_sets(40, k=4)
    q[4, 2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"queries holds NaN or inf in 1 of its 6 sets \(rows 4\)"):
        topk(q, g, 3, block=5)
    q[4, 2, 7] = 0.0
    g[33, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"gallery holds NaN or inf .*\(rows 33\)"):
        topk(q, g, 3, block=5)
    with pytest.raises(ValueError, match=r"y holds NaN or inf .*\(rows 33\)"):
        similarity_matrix(q, g)
    with pytest.raises(ValueError, match=r"x holds NaN or inf .*\(rows 33\)"):
        similarity_matrix(g, q)
    gm = torch.ones(40, 4, dtype=torch.bool)
    gm[33, 0] = False  # the inf is padding now
    topk(q, g, 3, block=5, gallery_mask=gm)
    big = unit_sets(5)
    big[3] *= 1e7  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=r"x holds NaN or inf .*\(rows 3\)"):
        similarity_matrix(big, q, dtype="float16")
    index = SetIndex(dtype="float16")
    with pytest.raises(ValueError, match=r"sets holds NaN or inf .*\(rows 3\)"):
        index.add(big, range(5))
    assert len(index) == 0 and index.dim is None
