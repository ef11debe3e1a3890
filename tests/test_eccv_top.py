"""dive.eval.eccv.top_items: each query's first k items of a stable descending sort, from group
maxima, on odd shapes, heavy ties and both orientations."""
import pytest
import torch

from dive.eval.eccv import top_items, top_lines


def stable_top(sim, k, rows):
    lines = sim if rows else sim.T
    return torch.sort(lines, dim=1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (13, 97), (61, 250), (97, 13)])
@pytest.mark.parametrize("k", [1, 4, 10, 40])
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("levels", [0, 3], ids=["continuous", "tied"])
def test_top_items_is_the_stable_sort_prefix(seed, shape, k, rows, levels):
    sim = torch.randn(*shape, dtype=torch.float64)
    if levels:  # a few distinct values: ties everywhere, across every cut
        sim = (sim * levels).round()
    k = min(k, shape[1] if rows else shape[0])
    assert torch.equal(top_items(sim, k, rows), stable_top(sim, k, rows)), f"seed={seed}"


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "columns"])
def test_each_line_its_own_k(seed, rows):
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


def test_float32_and_strided_input(seed):
    sim = torch.randn(200, 120).T  # a transposed view
    assert torch.equal(top_items(sim, 10, True), stable_top(sim, 10, True))
    assert torch.equal(top_items(sim, 10, False), stable_top(sim, 10, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ties(seed, dtype):
    sim = torch.randn(61, 250).mul(3).round().to(dtype)  # torch's maxima, not numpy's
    for rows in (True, False):
        want = stable_top(sim.float(), 10, rows)
        assert torch.equal(top_items(sim, 10, rows), want), f"seed={seed} rows={rows}"
