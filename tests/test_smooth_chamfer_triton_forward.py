"""The Triton forward's variants (kernels/smooth_chamfer.py) against the float64 reference: the
host-proved shared-max epilogue and the per-row/column one, dense and masked, every set-size
layout, masked garbage and NaN. Runs under the interpreter here (the plain exp2/log2 path; the
inline-asm path is compiled by tests/test_triton_forward_sass.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dive.ops import available_backends, smooth_chamfer, smooth_chamfer_ref

pytestmark = pytest.mark.skipif("triton" not in available_backends("smooth_chamfer", "cpu"),
                                reason="triton cannot run here")
TOL = 1e-4


def kernels():
    from dive.kernels import smooth_chamfer as module
    return module


def sets(n, k, d, scale=1.0, dtype=torch.float32):
    return (F.normalize(torch.randn(n, k, d), dim=-1) * scale).to(dtype)


def mask(n, k):
    m = torch.rand(n, k) > 0.4
    m[torch.arange(n), torch.randint(k, (n,))] = True
    return m


def check(x, y, seed, **kw):
    got = smooth_chamfer(x, y, backend="triton", **kw).double()
    want = smooth_chamfer_ref(x.double(), y.double(), **kw)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=f"seed={seed} {kw.keys()}")


def proved(x, y, x_mask=None, y_mask=None, temperature=16.0):
    return kernels()._no_underflow(x, y, x_mask, y_mask, temperature * math.log2(math.e))


@pytest.mark.parametrize("m,n", [(1, 2), (2, 1), (4, 4), (3, 8), (8, 3), (16, 5), (13, 16),
                                 (32, 2), (1, 32)])
@pytest.mark.parametrize("temperature", [16.0, 60.0], ids=["shared-max", "per-row-max"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_every_set_layout_matches_the_reference(m, n, temperature, masked, seed):
    # Set sizes 1..32 cover every element layout of the tile (`_spread`); 17 x 11 sets leave
    # partial tiles on both sides.
    x, y = sets(17, m, 24), sets(11, n, 24)
    kw = dict(x_mask=mask(17, m), y_mask=mask(11, n)) if masked else {}
    assert proved(x, y, temperature=temperature, **kw) == (temperature == 16.0)
    check(x, y, seed, temperature=temperature, **kw)


def test_the_proof_holds_for_unit_sets_and_nothing_else():
    x, y = sets(3, 4, 8), sets(5, 4, 8)
    assert proved(x, y, temperature=16.0) and proved(x, y, temperature=33.0)
    assert not proved(x, y, temperature=34.0)
    # The bound is 2 * T * log2(e) * max|x| * max|y| <= 96, not unit norm as such.
    assert proved(x * 2, y, temperature=16.0) and not proved(x * 3, y, temperature=16.0)
    assert proved(x.bfloat16(), y.bfloat16(), temperature=16.0)  # norms 1 +- 2^-8 still pass
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    assert not proved(bad, y)
    bad[1, 2, 3] = float("inf")
    assert not proved(bad, y)


@pytest.mark.parametrize("temperature", [16.0, 60.0], ids=["shared-max", "per-row-max"])
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e30])
def test_masked_elements_never_count(temperature, junk, seed):
    x, y = sets(6, 4, 16), sets(9, 3, 16)
    xm, ym = mask(6, 4), mask(9, 3)
    want = smooth_chamfer(x, y, x_mask=xm, y_mask=ym, temperature=temperature, backend="triton")
    xj, yj = x.clone(), y.clone()
    xj[~xm] = junk
    yj[~ym] = junk
    assert proved(xj, yj, xm, ym, temperature) == (temperature == 16.0)  # junk is not looked at
    got = smooth_chamfer(xj, yj, x_mask=xm, y_mask=ym, temperature=temperature, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"seed={seed}")
    check(x, y, seed, x_mask=xm, y_mask=ym, temperature=temperature)


@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_nan_reaches_exactly_the_pairs_it_touches(side, masked, seed):
    x, y = sets(5, 4, 16), sets(7, 4, 16)
    kw = dict(x_mask=torch.ones(5, 4, dtype=torch.bool), y_mask=torch.ones(7, 4, dtype=torch.bool)
              ) if masked else {}
    clean = smooth_chamfer(x, y, backend="triton", **kw)
    (x if side == "x" else y)[2, 1, 5] = float("nan")
    out = smooth_chamfer(x, y, backend="triton", **kw)
    hit = torch.zeros(5, 7, dtype=torch.bool)
    if side == "x":
        hit[2, :] = True
    else:
        hit[:, 2] = True
    assert out[hit].isnan().all(), f"seed={seed}"
    torch.testing.assert_close(out[~hit], clean[~hit], rtol=TOL, atol=TOL, msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_temperature_stays_finite(dtype, seed):
    x, y = sets(4, 4, 32, dtype=dtype), sets(6, 4, 32, dtype=dtype)
    got = smooth_chamfer(x, y, temperature=1e4, backend="triton")
    assert torch.isfinite(got).all()
    want = smooth_chamfer_ref(x.double(), y.double(), temperature=1e4)
    torch.testing.assert_close(got.double(), want, rtol=TOL, atol=TOL, msg=f"seed={seed}")
