"""Comparisons the op tests share (tests/ is on pytest's pythonpath)."""
import torch


def assert_same_values(got, want, what, rtol):
    """NaN exactly where `want` has NaN, and close elsewhere (`rtol` of the largest value)."""
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), \
        f"{what}: NaN at {got.isnan().nonzero().tolist()}, expected at " \
        f"{want.isnan().nonzero().tolist()}"
    ok = ~want.isnan()
    atol = rtol * want[ok].abs().max().item() + 1e-7 if ok.any() else 0.0
    torch.testing.assert_close(got[ok], want[ok], rtol=rtol, atol=atol, msg=what)
