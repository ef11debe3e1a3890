"""dive.eval.eccv.top_items: each query's first k items of a stable descending sort, from group
maxima, on odd shapes, heavy ties and both orientations."""
import pytest
import torch

from dive.eval.eccv import _Groups, top_items


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
def test_some_lines_with_a_larger_k_from_the_same_groups(seed, rows):
    sim = torch.randn(40, 300)
    sim[3, :] = 0.5  # a line of ties
    groups = _Groups(sim, 10, rows)
    n_lines = 40 if rows else 300
    lines = torch.randperm(n_lines)[:7]
    lines[0] = 3
    want = stable_top(sim, 25, rows)[lines]
    assert torch.equal(groups.top(25, lines), want), f"seed={seed}"
    assert torch.equal(groups.top(10), stable_top(sim, 10, rows)), f"seed={seed}"


def test_float32_and_strided_input(seed):
    sim = torch.randn(200, 120).T  # a transposed view
    assert torch.equal(top_items(sim, 10, True), stable_top(sim, 10, True))
    assert torch.equal(top_items(sim, 10, False), stable_top(sim, 10, False))
