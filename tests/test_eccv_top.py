"""dive.eval.eccv.top_lines / top_rows_and_columns: each line's first k items of a stable
descending sort, overall and within the line's group, on odd shapes, heavy ties, -inf entries
and both orientations; for the one-pass native selection (dive._C) and the group-maxima path
that other devices and dtypes take."""
import numpy as np
import pytest
import torch

from dive import _native
from dive.eval import eccv
from dive.eval.eccv import top_items, top_lines, top_rows_and_columns


@pytest.fixture(params=["native", "grouped"])
def backend(request, monkeypatch):
    """The native pass, or the fallback (dive._C hidden from the selection)."""
    if request.param == "grouped":
        monkeypatch.setattr(eccv._native, "cpu_module", lambda: None)
    else:
        assert _native.cpu_module() is not None
    return request.param


def stable_top(sim, k, rows):
    lines = sim if rows else sim.T
    return torch.sort(lines, dim=1, descending=True, stable=True).indices[:, :k]


def group_top(sim, row_group, col_group, k, rows):
    """Each line's first k items of its own group in a stable sort, -1 past those there are."""
    lines, line_group, item_group = (sim, row_group, col_group) if rows else \
        (sim.T, col_group, row_group)
    out = torch.full((len(lines), k), -1, dtype=torch.long)
    for q in range(len(lines)):
        items = (item_group == line_group[q]).nonzero().squeeze(1)
        order = torch.sort(lines[q, items], descending=True, stable=True).indices[:k]
        out[q, :len(order)] = items[order]
    return out


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (13, 97), (61, 250), (97, 13)])
@pytest.mark.parametrize("k", [1, 4, 10, 40])
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("levels", [0, 3], ids=["continuous", "tied"])
def test_top_items_is_the_stable_sort_prefix(seed, backend, shape, k, rows, levels):
    sim = torch.randn(*shape, dtype=torch.float64)
    if levels:  # a few distinct values: ties everywhere, across every cut
        sim = (sim * levels).round()
    k = min(k, shape[1] if rows else shape[0])
    assert torch.equal(top_items(sim, k, rows), stable_top(sim, k, rows)), f"seed={seed}"


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "columns"])
def test_each_line_its_own_k(seed, backend, rows):
    sim = torch.randn(40, 300)
    sim[3, :] = 0.5  # a line of ties
    sim[:, 7] = 0.5  # and a column of them
    n_lines, n_items = (40, 300) if rows else (300, 40)
    k = torch.randint(1, 26, (n_lines,))
    k[3] = 25
    got = top_lines(sim, k, rows)
    want = stable_top(sim, 25, rows)
    assert got.shape == (n_lines, 25)
    for q in range(n_lines):
        assert torch.equal(got[q, :k[q]], want[q, :k[q]]), f"seed={seed} line={q}"
        assert (got[q, k[q]:] == -1).all(), f"seed={seed} line={q}"


def test_float32_and_strided_input(seed, backend):
    sim = torch.randn(200, 120).T  # a transposed view
    assert torch.equal(top_items(sim, 10, True), stable_top(sim, 10, True))
    assert torch.equal(top_items(sim, 10, False), stable_top(sim, 10, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ties(seed, dtype):
    sim = torch.randn(61, 250).mul(3).round().to(dtype)  # torch's maxima, not numpy's
    for rows in (True, False):
        want = stable_top(sim.float(), 10, rows)
        assert torch.equal(top_items(sim, 10, rows), want), f"seed={seed} rows={rows}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minus_infinity_entries_still_rank(seed, backend, dtype):
    """Lines with fewer finite entries than k: the -inf ones follow, in index order."""
    sim = torch.randn(30, 41, dtype=dtype)
    sim[torch.rand(30, 41) < 0.8] = -torch.inf
    sim[5] = -torch.inf
    for rows in (True, False):
        k = 12
        assert torch.equal(top_items(sim, k, rows), stable_top(sim, k, rows)), \
            f"seed={seed} rows={rows}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("levels", [0, 2], ids=["continuous", "tied"])
def test_both_directions_in_one_pass_on_wide_matrices(seed, threads, levels):
    """Wide enough that the native pass splits the columns between threads and merges each
    row's lists (ties between stripes go to the earlier one)."""
    sim = torch.randn(23, 5003, dtype=torch.float64)
    if levels:
        sim = (sim * levels).round()
    row_k, col_k = torch.randint(1, 40, (23,)), torch.randint(1, 20, (5003,))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_rows, got_cols = top_rows_and_columns(sim, row_k, col_k)
    finally:
        torch.set_num_threads(before)
    for got, k, rows in ((got_rows, row_k, True), (got_cols, col_k, False)):
        want = stable_top(sim, int(k.max()), rows)
        keep = torch.arange(want.shape[1])[None, :] < k[:, None]
        assert torch.equal(got, torch.where(keep, want, -1)), f"seed={seed} rows={rows}"


@pytest.mark.parametrize("shape", [(1, 1), (13, 97), (61, 250), (40, 4500)])
@pytest.mark.parametrize("groups", [1, 3, 7])
@pytest.mark.parametrize("levels", [0, 3], ids=["continuous", "tied"])
def test_lists_within_groups(seed, backend, shape, groups, levels):
    """Each row's best columns of its own group and each column's best rows of its own, next
    to the lists over every item, with group ids that are not 0..G-1 and groups that some
    lines' group lacks entirely."""
    sim = torch.randn(*shape, dtype=torch.float64)
    if levels:
        sim = (sim * levels).round()
    ids = torch.randperm(100)[:groups + 1] - 50  # one id only columns have
    row_group = ids[torch.randint(0, groups, (shape[0],))]
    col_group = ids[torch.randint(0, groups + 1, (shape[1],))]
    k = 6
    row_k = torch.full((shape[0],), min(k, shape[1]))
    col_k = torch.full((shape[1],), min(k, shape[0]))
    got = top_rows_and_columns(sim, row_k, col_k, (row_group, col_group, k))
    assert len(got) == 4
    assert torch.equal(got[0], stable_top(sim, row_k[0], True)), f"seed={seed}"
    assert torch.equal(got[1], stable_top(sim, col_k[0], False)), f"seed={seed}"
    for top, rows in ((got[2], True), (got[3], False)):
        want = group_top(sim, row_group, col_group, k, rows)
        assert torch.equal(top, want), f"seed={seed} rows={rows}"


def test_many_groups_take_the_sub_matrix_route(seed):
    """More groups than the native pass keeps bars for: same lists, one group at a time."""
    sim = torch.randn(150, 300)
    n = eccv.MAX_NATIVE_GROUPS + 6
    row_group, col_group = torch.randint(0, n, (150,)), torch.randint(0, n, (300,))
    got = top_rows_and_columns(sim, None, None, (row_group, col_group, 3))
    assert got[0] is None and got[1] is None
    assert torch.equal(got[2], group_top(sim, row_group, col_group, 3, True)), f"seed={seed}"
    assert torch.equal(got[3], group_top(sim, row_group, col_group, 3, False)), f"seed={seed}"


def test_bad_k_is_refused():
    sim = torch.randn(4, 6)
    with pytest.raises(ValueError, match="k must be"):
        top_lines(sim, torch.tensor([1, 2, 3]), True)
    with pytest.raises(ValueError, match="k must be"):
        top_lines(sim, torch.tensor([1, 2, 0, 1]), True)
    with pytest.raises(ValueError, match="k must be"):
        top_lines(sim, torch.tensor([1, 2, 7, 1]), True)
    with pytest.raises(ValueError, match="k must be"):
        top_lines(sim, torch.tensor([1.0, 2, 3, 1]), True)


def test_bad_groups_are_refused():
    sim = torch.randn(4, 6)
    k = torch.full((4,), 2)
    with pytest.raises(ValueError, match="row_group must be"):
        top_rows_and_columns(sim, k, None, (torch.zeros(3, dtype=torch.long),
                                            torch.zeros(6, dtype=torch.long), 2))
    with pytest.raises(ValueError, match="col_group must be"):
        top_rows_and_columns(sim, k, None, (torch.zeros(4, dtype=torch.long),
                                            torch.zeros(6), 2))
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_rows_and_columns(sim, k, None, (torch.zeros(4, dtype=torch.long),
                                            torch.zeros(6, dtype=torch.long), 0))


def test_folds_refuse_an_image_split_between_folds():
    """The package's 1K folds are fifths of its caption list; an image whose captions straddle
    two of them has no single fold."""
    t2i = eccv._Positives(np.arange(10, 20), np.arange(11), np.array([1] * 6 + [2] * 4))
    with pytest.raises(ValueError, match="two 1K folds"):
        eccv._folds({"t2i": t2i}, np.arange(10, 20), eccv._Lookup(np.array([1, 2])),
                    eccv._Lookup(np.arange(10, 20)))
