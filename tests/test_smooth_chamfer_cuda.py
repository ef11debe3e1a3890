"""The fused CUDA smooth-Chamfer kernels called through their raw bindings (device pointers,
sizes, dtype code, stream; the backward through the gradient-weights binding and its two GEMMs)
against the float64 plain-PyTorch reference: values, gradients, masks, dtypes, tails of every
tile (set sizes, D, NX, NY), large temperatures, poisoned outputs, row strides and refused
sizes."""
import re

import pytest
import torch

from dive.ops._native_args import DTYPE_CODE as DTYPE_CODES
from dive.ops.smooth_chamfer import _cuda_backward, smooth_chamfer_ref
from sets import random_mask, unit_sets

pytestmark = [pytest.mark.gpu, pytest.mark.quick]  # no JIT: all of it is quick

DTYPES = list(DTYPE_CODES)
# The reference sees the same dtype-rounded inputs (in float64), so S only differs by fp32
# accumulation: one tolerance, relative to the largest reference magnitude. The gradients' GEMMs
# run in the input dtype (fp32 accumulation, W to ~16 bits) and round their results to it.
TOL = 2e-4
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (NX, NY, m, n, D): one element and one dimension; K = 4 with a D that fills the 16-bit step;
# odd set sizes with D tails of every loader; the largest set against a small one; one-element
# sets against 32 (the 64-row tile holds 64 and 2 sets); several tiles in both directions.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 5, 4, 4, 64),
    (7, 13, 3, 5, 100),
    (17, 11, 32, 7, 33),
    (2, 19, 1, 32, 16),
    (37, 70, 4, 4, 40),
    (70, 129, 2, 1, 7),
    (5, 3, 16, 16, 300),
    (13, 67, 4, 3, 264),  # 16-byte rows: 9 (16-bit) or 17 (fp32) pipeline steps, short last one
]
MASKS = ["none", "random", "single"]


@pytest.fixture(scope="module")
def ext():
    return pytest.importorskip("dive._C_cuda")


def make_sets(count, size, d, dtype):
    return unit_sets(count, size, d, dtype, "cuda")


def make_mask(kind, count, size):
    if kind == "none":
        return None
    if kind == "random":
        return random_mask(count, size, "cuda")
    mask = torch.zeros(count, size, dtype=torch.bool, device="cuda")
    mask[torch.arange(count), torch.randint(size, (count,))] = True
    return mask


def u8(mask):
    return 0 if mask is None else mask.to(torch.uint8).contiguous()


def ptr(t):
    return 0 if isinstance(t, int) else t.data_ptr()


def stream():
    return torch.cuda.current_stream().cuda_stream


def fused_forward(ext, x, y, xm, ym, t, den, pad=0, tf32=False):
    """S through the binding, written into a NaN-filled (NX, NY + pad) buffer (lds = NY + pad)."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    out = torch.full((nx, ny + pad), float("nan"), device="cuda")
    xmu, ymu = u8(xm), u8(ym)
    ext.smooth_chamfer_forward_fused(x.data_ptr(), y.data_ptr(), DTYPE_CODES[x.dtype], nx, ny, m,
                                     n, d, ptr(xmu), ptr(ymu), t, den, out.data_ptr(), ny + pad,
                                     stream(), tf32)
    return out


def fused_backward(ext, g, x, y, xm, ym, t, den):
    """(dx, dy) float32: the weights binding, then dx = W y and dy = W^T x."""
    return _cuda_backward(g, x, y, xm, ym, t, den)


def reference(g, x, y, xm, ym, t, den):
    x64 = x.double().requires_grad_()
    y64 = y.double().requires_grad_()
    s = smooth_chamfer_ref(x64, y64, temperature=t, denominator=den, x_mask=xm, y_mask=ym)
    dx, dy = torch.autograd.grad(s, (x64, y64), g.double())
    return s.detach(), dx, dy


def assert_close(got, want, what, seed, tol=TOL):
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed {seed})"
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS)
def test_matches_reference(ext, seed, dtype, shape, mask):
    nx, ny, m, n, d = shape
    x, y = make_sets(nx, m, d, dtype), make_sets(ny, n, d, dtype)
    xm, ym = make_mask(mask, nx, m), make_mask(mask, ny, n)
    g = torch.randn(nx, ny, device="cuda")
    want_s, want_dx, want_dy = reference(g, x, y, xm, ym, 16.0, 2.0)
    assert_close(fused_forward(ext, x, y, xm, ym, 16.0, 2.0), want_s, "S", seed)
    dx, dy = fused_backward(ext, g, x, y, xm, ym, 16.0, 2.0)
    assert_close(dx, want_dx, "dx", seed, GRAD_TOL[dtype])
    assert_close(dy, want_dy, "dy", seed, GRAD_TOL[dtype])
    if xm is not None:
        assert (dx[~xm] == 0).all() and (dy[~ym] == 0).all(), f"masked gradients (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(9, 21, 4, 4, 64), (6, 5, 32, 3, 48)],
                         ids=["k4", "k32x3"])
def test_temperature_100(ext, seed, dtype, shape):
    # Row sums under one shared max would underflow here; the per-row/column maxima must not.
    nx, ny, m, n, d = shape
    x, y = make_sets(nx, m, d, dtype), make_sets(ny, n, d, dtype)
    xm, ym = make_mask("random", nx, m), make_mask("random", ny, n)
    g = torch.randn(nx, ny, device="cuda")
    want_s, want_dx, want_dy = reference(g, x, y, xm, ym, 100.0, 2.0)
    assert_close(fused_forward(ext, x, y, xm, ym, 100.0, 2.0), want_s, "S", seed)
    dx, dy = fused_backward(ext, g, x, y, xm, ym, 100.0, 2.0)
    assert_close(dx, want_dx, "dx", seed, GRAD_TOL[dtype])
    assert_close(dy, want_dy, "dy", seed, GRAD_TOL[dtype])


# TF32 keeps 10 mantissa bits: each product of unit vectors' entries is off by at most 2**-10 of
# its magnitude, so a cosine by at most 2**-10, and S (1-Lipschitz in the cosines) as well.
TF32_ATOL = 2.0 ** -10 + 1e-5


@pytest.mark.parametrize("shape", [(7, 13, 3, 5, 100), (13, 67, 4, 3, 264), (5, 3, 16, 16, 300),
                                   (70, 129, 2, 1, 8)], ids=lambda s: "x".join(map(str, s)))
def test_tf32_forward(ext, seed, shape):
    # fp32 rows of a multiple of 16 bytes take the TF32 tensor-core pipeline when allowed.
    nx, ny, m, n, d = shape
    x, y = make_sets(nx, m, d, torch.float32), make_sets(ny, n, d, torch.float32)
    xm, ym = make_mask("random", nx, m), make_mask("random", ny, n)
    want = smooth_chamfer_ref(x.double(), y.double(), temperature=16.0, denominator=2.0,
                              x_mask=xm, y_mask=ym)
    got = fused_forward(ext, x, y, xm, ym, 16.0, 2.0, tf32=True)
    exact = fused_forward(ext, x, y, xm, ym, 16.0, 2.0)
    assert torch.isfinite(got).all(), f"non-finite values (seed {seed})"
    err = (got.double() - want).abs().max().item()
    assert err <= TF32_ATOL, f"TF32 S: max error {err:.3g} (seed {seed})"
    assert_close(exact, want, "exact fp32 S", seed)
    assert (got != exact).any(), f"tf32=True did not change the fp32 result (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_misaligned_rows_take_the_staged_loop(ext, seed, dtype):
    # Views one element into their storage are not 16-byte aligned: the forward must not use
    # cp.async on them, and both paths must agree with the reference.
    x, y = make_sets(9, 4, 64, dtype), make_sets(14, 4, 64, dtype)
    for xv, yv in ((x, y), (offset_copy(x), offset_copy(y))):
        want = smooth_chamfer_ref(xv.double(), yv.double(), temperature=16.0, denominator=2.0)
        assert_close(fused_forward(ext, xv, yv, None, None, 16.0, 2.0), want, "S", seed)
        if dtype == torch.float32:
            got = fused_forward(ext, xv, yv, None, None, 16.0, 2.0, tf32=True)
            assert (got.double() - want).abs().max().item() <= TF32_ATOL


def offset_copy(t):
    """t's values in a view that starts one element into its storage (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    flat[1:] = t.flatten()
    return flat[1:].view(t.shape)


def test_row_strides(ext, seed):
    # S written into a wider buffer leaves the padding columns alone; g read with its stride.
    x, y = make_sets(11, 4, 24, torch.float16), make_sets(9, 4, 24, torch.float16)
    out = fused_forward(ext, x, y, None, None, 16.0, 2.0, pad=5)
    g_wide = torch.randn(11, 14, device="cuda")
    g = g_wide[:, :9]
    want_s, want_dx, want_dy = reference(g, x, y, None, None, 16.0, 2.0)
    assert_close(out[:, :9], want_s, "S", seed)
    assert out[:, 9:].isnan().all()
    dx, dy = fused_backward(ext, g, x, y, None, None, 16.0, 2.0)
    assert_close(dx, want_dx, "dx", seed, GRAD_TOL[torch.float16])
    assert_close(dy, want_dy, "dy", seed, GRAD_TOL[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_weights_fill_only_real_cells(ext, seed, dtype):
    # W (NX*m, NY*n) written into NaN-filled buffers with a wider row stride: the padding
    # columns stay untouched, masked cells are exact zeros, hi + lo is finite.
    nx, ny, m, n, d, pad = 7, 5, 3, 4, 40, 3
    x, y = make_sets(nx, m, d, dtype), make_sets(ny, n, d, dtype)
    xm, ym = make_mask("random", nx, m), make_mask("random", ny, n)
    g = torch.randn(nx, ny, device="cuda")
    w_hi = torch.full((nx * m, ny * n + pad), float("nan"), dtype=dtype, device="cuda")
    w_lo = torch.full_like(w_hi, float("nan")) if dtype != torch.float32 else None
    xmu, ymu = u8(xm), u8(ym)
    ext.smooth_chamfer_backward_weights(x.data_ptr(), y.data_ptr(), DTYPE_CODES[dtype], nx, ny,
                                        m, n, d, ptr(xmu), ptr(ymu), 16.0, 2.0, g.data_ptr(),
                                        g.stride(0), w_hi.data_ptr(),
                                        0 if w_lo is None else w_lo.data_ptr(), w_hi.stride(0),
                                        stream())
    w = w_hi.float() + (0 if w_lo is None else w_lo.float())
    assert w[:, ny * n:].isnan().all(), f"padding written (seed {seed})"
    w = w[:, :ny * n]
    assert torch.isfinite(w).all(), f"non-finite weights (seed {seed})"
    real = xm.reshape(-1, 1) & ym.reshape(1, -1)
    assert (w[~real] == 0).all(), f"masked weights (seed {seed})"


def test_empty_side_zeroes_the_other_gradient(ext):
    x, y = make_sets(0, 4, 8, torch.float32), make_sets(3, 4, 8, torch.float32)
    g = torch.empty(0, 3, device="cuda")
    dx, dy = fused_backward(ext, g, x, y, None, None, 16.0, 2.0)
    assert dx.numel() == 0 and (dy == 0).all()


@pytest.mark.parametrize("m, n, dtype, message", [
    (33, 4, 0, "set sizes m = 33, n = 4; both must be in 1..32"),
    (4, 0, 0, "set sizes m = 4, n = 0"),
    (4, 4, 3, "dtype code 3 is not 0 (float32), 1 (float16) or 2 (bfloat16)"),
])
def test_refused_sizes(ext, m, n, dtype, message):
    x = torch.zeros(2, max(m, 1), 8, device="cuda")
    y = torch.zeros(2, max(n, 1), 8, device="cuda")
    s = torch.zeros(2, 2, device="cuda")
    with pytest.raises(RuntimeError, match=re.escape("smooth_chamfer forward_fused: " + message)):
        ext.smooth_chamfer_forward_fused(x.data_ptr(), y.data_ptr(), dtype, 2, 2, m, n, 8, 0, 0,
                                         16.0, 2.0, s.data_ptr(), 2, stream())
    with pytest.raises(RuntimeError, match="smooth_chamfer backward_weights: "):
        ext.smooth_chamfer_backward_weights(x.data_ptr(), y.data_ptr(), dtype, 2, 2, m, n, 8, 0,
                                            0, 16.0, 2.0, s.data_ptr(), 2, x.data_ptr(),
                                            y.data_ptr(), 2 * max(n, 1), stream())


# ----------------------------------------------------------------------------- non-finite input
# m = 1 puts a whole column's LSE on one cosine; 37 x 70 sets of 4 span several tiles.
NAN_SHAPES = [(7, 13, 3, 5, 100), (2, 19, 1, 32, 16), (37, 70, 4, 4, 40)]


def same_nan_and_close(got, want, what, seed, tol=TOL):
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs (seed {seed})"
    ok = ~want.isnan()
    if ok.any():
        assert_close(got[ok], want[ok], what, seed, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_non_finite_real_element_makes_exactly_its_pairs_nan(ext, seed, dtype, shape, bad):
    nx, ny, m, n, d = shape
    x, y = make_sets(nx, m, d, dtype), make_sets(ny, n, d, dtype)
    xm, ym = make_mask("random", nx, m), make_mask("random", ny, n)
    a = nx // 2
    x[a, int(xm[a].nonzero()[0, 0]), d // 2] = bad
    g = torch.randn(nx, ny, device="cuda")
    want, dx_want, dy_want = reference(g, x, y, xm, ym, 16.0, 2.0)
    assert want.isnan()[a].all() and want.isnan().sum() == ny  # the spec itself
    s = fused_forward(ext, x, y, xm, ym, 16.0, 2.0)
    same_nan_and_close(s, want, f"S bad={bad} {dtype}", seed)
    dx, dy = fused_backward(ext, g, x, y, xm, ym, 16.0, 2.0)
    assert (dx[~xm] == 0).all() and (dy[~ym] == 0).all(), f"masked gradient (seed {seed})"
    keep = torch.arange(nx, device="cuda") != a
    if bad != bad:
        same_nan_and_close(dx, dx_want, f"dx bad={bad} {dtype}", seed, GRAD_TOL[dtype])
        same_nan_and_close(dy, dy_want, f"dy bad={bad} {dtype}", seed, GRAD_TOL[dtype])
    else:  # +-inf: the other x sets' pairs are untouched
        same_nan_and_close(dx[keep], dx_want[keep], f"dx bad={bad} {dtype}", seed,
                           GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30], ids=str)
def test_poisoned_padding_changes_nothing(ext, seed, dtype, shape, poison):
    nx, ny, m, n, d = shape
    x, y = make_sets(nx, m, d, dtype), make_sets(ny, n, d, dtype)
    xm, ym = make_mask("random", nx, m), make_mask("random", ny, n)
    x[~xm], y[~ym] = 0, 0
    xp, yp = x.clone(), y.clone()
    xp[~xm], yp[~ym] = poison, poison
    g = torch.randn(nx, ny, device="cuda")
    s0 = fused_forward(ext, x, y, xm, ym, 16.0, 2.0)
    s1 = fused_forward(ext, xp, yp, xm, ym, 16.0, 2.0)
    assert torch.equal(s1, s0), f"S moved with poison {poison} (seed {seed})"
    dx0, dy0 = fused_backward(ext, g, x, y, xm, ym, 16.0, 2.0)
    dx1, dy1 = fused_backward(ext, g, xp, yp, xm, ym, 16.0, 2.0)
    assert (dx1[~xm] == 0).all() and (dy1[~ym] == 0).all(), f"masked gradient (seed {seed})"
    assert_close(dx1, dx0.double(), f"dx poison={poison}", seed)
    assert_close(dy1, dy0.double(), f"dy poison={poison}", seed)
