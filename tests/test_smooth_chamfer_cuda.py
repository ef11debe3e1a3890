"""The fused CUDA smooth-Chamfer kernels called through their raw bindings (device pointers,
sizes, dtype code, stream; the backward through the gradient-weights binding and its two GEMMs)
against the float64 plain-PyTorch reference: values, gradients, masks, dtypes, tails of every
tile (set sizes, D, NX, NY), large temperatures, poisoned outputs, row strides and refused
sizes."""
import re

import pytest
import torch

from dive.ops.smooth_chamfer import _cuda_backward, smooth_chamfer_ref

pytestmark = pytest.mark.gpu

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
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
]
MASKS = ["none", "random", "single"]


@pytest.fixture(scope="module")
def ext():
    return pytest.importorskip("dive._C_cuda")


def make_sets(count, size, d, dtype):
    # Unit vectors, as the model's embeddings are, so T = 100 is a real case, not an overflow.
    v = torch.randn(count, size, d, device="cuda")
    return torch.nn.functional.normalize(v, dim=-1).to(dtype)


def make_mask(kind, count, size):
    if kind == "none":
        return None
    if kind == "random":
        mask = torch.rand(count, size, device="cuda") > 0.4
    else:
        mask = torch.zeros(count, size, dtype=torch.bool, device="cuda")
    mask[torch.arange(count), torch.randint(size, (count,))] = True
    return mask


def u8(mask):
    return 0 if mask is None else mask.to(torch.uint8).contiguous()


def ptr(t):
    return 0 if isinstance(t, int) else t.data_ptr()


def stream():
    return torch.cuda.current_stream().cuda_stream


def fused_forward(ext, x, y, xm, ym, t, den, pad=0):
    """S through the binding, written into a NaN-filled (NX, NY + pad) buffer (lds = NY + pad)."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    out = torch.full((nx, ny + pad), float("nan"), device="cuda")
    xmu, ymu = u8(xm), u8(ym)
    ext.smooth_chamfer_forward_fused(x.data_ptr(), y.data_ptr(), DTYPE_CODES[x.dtype], nx, ny, m,
                                     n, d, ptr(xmu), ptr(ymu), t, den, out.data_ptr(), ny + pad,
                                     stream())
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
