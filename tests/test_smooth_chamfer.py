"""Every smooth_chamfer backend against the float64 reference: values, gradients, masks, dtypes."""
import importlib

import pytest
import torch

from dive.ops import available_backends, smooth_chamfer, smooth_chamfer_ref
from dive.ops import registry
from asserts import assert_same_values
from sets import random_mask, unit_sets

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    pytest.param(dev, name, id=f"{dev}-{name}", marks=[pytest.mark.gpu] if dev == "cuda" else [])
    for dev in DEVICES
    for name in available_backends("smooth_chamfer", dev)
]
# (NX, NY, m, n, D): ones, primes, m != n, D = 1 and D not a multiple of 16, sizes that are not
# multiples of any tile, and several tiles each way (37 x 70 sets of 4). Marked quick (the GPU
# check's quick run; each Triton specialisation costs ~1.7 s to compile there): a tail in every
# dimension; the aligned K=4 specialisation of the benchmarks comes from the temperature test.
SHAPES = [(1, 1, 1, 1, 1), (3, 5, 4, 4, 64), (7, 13, 3, 5, 100),
          pytest.param((17, 11, 32, 7, 33), marks=pytest.mark.quick),
          (2, 19, 1, 32, 16), (5, 7, 4, 4, 1), (37, 70, 4, 4, 40)]
VALUE_TOL = 1e-4


def reference(x, y, grad, **kw):
    """Value and gradients of the float64 reference at the same (rounded) inputs."""
    xd = x.detach().double().requires_grad_()
    yd = y.detach().double().requires_grad_()
    out = smooth_chamfer_ref(xd, yd, **kw)
    out.backward(grad.double())
    return out.detach(), xd.grad, yd.grad


def check_against_reference(x, y, backend, seed, **kw):
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = smooth_chamfer(xr, yr, backend=backend, **kw)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], y.shape[0])
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, dx_ref, dy_ref = reference(x, y, grad, **kw)
    msg = f"backend={backend} dtype={x.dtype} shape={tuple(x.shape)}x{tuple(y.shape)} seed={seed}"
    assert torch.isfinite(out).all(), msg
    torch.testing.assert_close(out.double(), ref, rtol=VALUE_TOL, atol=VALUE_TOL, msg=msg)
    rtol = registry.get("smooth_chamfer", backend).grad_rtol[x.dtype]
    for got, want, name in ((xr.grad, dx_ref, "dx"), (yr.grad, dy_ref, "dy")):
        assert got.dtype == x.dtype and got.shape == want.shape, f"{name} {msg}"
        atol = rtol * want.abs().max().item() + 1e-7
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=f"{name} {msg}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_matches_reference(device, backend, dtype, shape, masked, seed):
    nx, ny, m, n, d = shape
    x, y = unit_sets(nx, m, d, dtype, device), unit_sets(ny, n, d, dtype, device)
    masks = {}
    if masked:
        masks = dict(x_mask=random_mask(nx, m, device), y_mask=random_mask(ny, n, device))
    check_against_reference(x, y, backend, seed, **masks)


@pytest.mark.quick
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 16.0, 100.0])
def test_temperatures_stay_finite_and_exact(device, backend, dtype, temperature, seed):
    x, y = unit_sets(6, 4, 48, dtype, device), unit_sets(9, 4, 48, dtype, device)
    check_against_reference(x, y, backend, seed, temperature=temperature)


@pytest.mark.quick
@pytest.mark.parametrize("device,backend", CASES)
def test_wide_spread_takes_the_exact_path(device, backend, seed):
    # Unnormalised sets at T=100: T * (max - min) far beyond what one shared max per pair keeps
    # in fp32, so every fast path must fall back to per-row/per-column maxima.
    x = unit_sets(5, 4, 32, torch.float32, device, normalize=False, scale=2.0)
    y = unit_sets(7, 3, 32, torch.float32, device, normalize=False, scale=2.0)
    masks = dict(x_mask=random_mask(5, 4, device), y_mask=random_mask(7, 3, device))
    check_against_reference(x, y, backend, seed, temperature=100.0, **masks)


@pytest.mark.quick
@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_inputs(device, backend, seed):
    x = unit_sets(4, 8, 40, torch.float32, device)[:, ::2, ::2]  # (4, 4, 20), strided inner dims
    y = unit_sets(6, 3, 20, torch.float32, device).transpose(0, 1)  # (3, 6, 20), strided sets
    assert not x.is_contiguous() and not y.is_contiguous()
    check_against_reference(x, y, backend, seed)


@pytest.mark.parametrize("device,backend", CASES)
def test_mask_equals_explicit_subsets(device, backend, seed):
    nx, ny, m, n, d = 4, 5, 6, 5, 24
    x, y = unit_sets(nx, m, d, torch.float32, device), unit_sets(ny, n, d, torch.float32, device)
    xm, ym = random_mask(nx, m, device), random_mask(ny, n, device)
    got = smooth_chamfer(x, y, x_mask=xm, y_mask=ym, backend=backend)
    for a in range(nx):
        for b in range(ny):
            alone = smooth_chamfer(x[a:a + 1, xm[a]], y[b:b + 1, ym[b]], backend=backend)
            torch.testing.assert_close(got[a, b], alone[0, 0], rtol=1e-5, atol=1e-5,
                                       msg=f"pair ({a}, {b}) backend={backend} seed={seed}")


@pytest.mark.parametrize("device,backend", CASES)
def test_large_sets_fall_back_to_the_exact_path(device, backend, seed):
    x = unit_sets(3, 33, 8, torch.float32, device)
    y = unit_sets(2, 40, 8, torch.float32, device)
    check_against_reference(x, y, backend, seed)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_elements_holding_nan_or_inf_change_nothing(device, backend, dtype, seed):
    # Padding may hold anything: masked elements never reach a value or a gradient, and their
    # own gradients are exactly zero. (The reference, plain autograd through an einsum, lets
    # 0 * NaN through; it is the spec for real elements only.)
    x, y = unit_sets(5, 4, 24, dtype, device), unit_sets(7, 3, 24, dtype, device)
    xm, ym = random_mask(5, 4, device), random_mask(7, 3, device)
    poisoned = []
    for sets, mask in ((x, xm), (y, ym)):
        bad = sets.clone()
        bad[~mask] = torch.tensor([float("nan"), float("inf")], dtype=dtype, device=device).repeat(
            bad.shape[-1] // 2)
        poisoned.append(bad.requires_grad_())
    clean = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    grad = torch.randn(5, 7, device=device)
    for a, b in (poisoned, clean):
        smooth_chamfer(a, b, x_mask=xm, y_mask=ym, backend=backend).backward(grad)
    msg = f"backend={backend} dtype={dtype} seed={seed}"
    for got, want, mask in zip(poisoned, clean, (xm, ym)):
        assert torch.isfinite(got.grad).all(), msg
        assert (got.grad[~mask] == 0).all(), msg
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0, msg=msg)


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_in_a_real_element_reaches_only_its_pairs_gradients(device, backend, seed):
    x, y = unit_sets(4, 3, 16, torch.float32, device), unit_sets(5, 2, 16, torch.float32, device)
    x[1, 2, 7] = float("nan")
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = smooth_chamfer(xr, yr, backend=backend)
    out.backward(torch.ones_like(out))
    msg = f"backend={backend} seed={seed}"
    # x set 1 touches every y set, so every dy is NaN; the other x sets' dx stay finite.
    assert xr.grad[1].isnan().all() and torch.isfinite(xr.grad[[0, 2, 3]]).all(), msg
    assert yr.grad.isnan().all(), msg


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] in ("triton", "cuda")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_in_several_weight_blocks(device, backend, dtype, monkeypatch, seed):
    # A budget of a few cells per buffer forces many (x sets, y sets) blocks of W: each output
    # row then sums GEMM results over several blocks, as at gallery sizes.
    op = importlib.import_module("dive.ops.smooth_chamfer")  # the module, not the function
    monkeypatch.setattr(op, "W_BLOCK_BYTES", 4 * 3 * 4 * 40)
    assert op._weight_blocks(11, 13, 3, 4, 40, op.W_BLOCK_BYTES) < (11, 13)
    x, y = unit_sets(11, 3, 40, dtype, device), unit_sets(13, 4, 40, dtype, device)
    check_against_reference(x, y, backend, seed, x_mask=random_mask(11, 3, device),
                            y_mask=random_mask(13, 4, device))


def test_float64_runs_the_reference_and_passes_gradcheck(seed):
    x = unit_sets(3, 4, 5, torch.float64, "cpu").requires_grad_()
    y = unit_sets(4, 3, 5, torch.float64, "cpu").requires_grad_()
    xm, ym = random_mask(3, 4, "cpu"), random_mask(4, 3, "cpu")
    fn = lambda a, b: smooth_chamfer(a, b, x_mask=xm, y_mask=ym)  # noqa: E731
    assert fn(x, y).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (x, y))


def test_reference_matches_the_definition(seed):
    # The reference against a direct transcription of docs/design.md §2.1 (no chunking, no shift).
    x, y = unit_sets(5, 3, 7, torch.float64, "cpu"), unit_sets(4, 2, 7, torch.float64, "cpu")
    t, den = 16.0, 2.0
    want = torch.empty(5, 4, dtype=torch.float64)
    for a in range(5):
        for b in range(4):
            c = x[a] @ y[b].T
            rows = torch.log(torch.exp(t * c).sum(1)).mean()
            cols = torch.log(torch.exp(t * c).sum(0)).mean()
            want[a, b] = (rows + cols) / (den * t)
    torch.testing.assert_close(smooth_chamfer_ref(x, y, temperature=t, denominator=den), want)


def test_gradients_reach_x_and_y_but_not_temperature():
    x = unit_sets(2, 4, 8, torch.float32, "cpu").requires_grad_()
    y = unit_sets(3, 4, 8, torch.float32, "cpu").requires_grad_()
    t = torch.tensor(16.0, requires_grad=True)
    smooth_chamfer(x, y, temperature=t).sum().backward()
    assert x.grad is not None and y.grad is not None and t.grad is None


@pytest.mark.parametrize("nx,ny", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs_give_empty_results(nx, ny):
    x = torch.randn(nx, 4, 8, requires_grad=True)
    y = torch.randn(ny, 4, 8, requires_grad=True)
    out = smooth_chamfer(x, y)
    assert out.shape == (nx, ny) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape and y.grad.shape == y.shape


def test_auto_dispatch_prefers_the_native_cpu_path():
    assert available_backends("smooth_chamfer", "cpu")[0] == "cpu"
    assert registry.resolve("smooth_chamfer", "auto", torch.device("cpu")).name == "cpu"


def test_torch_compile(seed):
    x = unit_sets(5, 4, 16, torch.float32, "cpu")
    y = unit_sets(7, 4, 16, torch.float32, "cpu")

    def loss(a, b):
        return (smooth_chamfer(a, b) * 2.0).logsumexp(1).mean()

    compiled = torch.compile(loss, fullgraph=True)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    eager, traced = loss(xa, ya), compiled(xb, yb)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(yb.grad, ya.grad)


# ----------------------------------------------------------------------------- bad input

def _sets(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_INPUTS = [
    (dict(x=_sets(4, 8)), "x must have shape"),
    (dict(y=_sets(2, 3, 4, 8)), "y must have shape"),
    (dict(x=[[1.0]]), "x must be a torch.Tensor"),
    (dict(y=_sets(3, 4, 9)), "same embedding size D"),
    (dict(y=_sets(3, 4, 8, dtype=torch.float16)), "same dtype"),
    (dict(x=torch.ones(2, 4, 8, dtype=torch.int64)), "x has dtype torch.int64"),
    (dict(x=_sets(2, 0, 8)), "x must have set_size >= 1"),
    (dict(x_mask=torch.ones(2, 5, dtype=torch.bool)), "x_mask must be a bool tensor of shape"),
    (dict(y_mask=torch.ones(3, 4)), "y_mask must be a bool tensor"),
    (dict(y_mask=torch.tensor([[True] * 4, [False] * 4, [True] * 4])), "y_mask: set 1 has no"),
    (dict(x_mask=torch.tensor([[False] * 4, [True] * 4])), "x_mask: set 0 has no"),
    (dict(temperature=0.0), "temperature must be a positive finite number"),
    (dict(temperature=-1.0), "temperature must be a positive finite number"),
    (dict(temperature=float("nan")), "temperature must be a positive finite number"),
    (dict(temperature=float("inf")), "temperature must be a positive finite number"),
    (dict(denominator=0.0), "denominator must be a positive finite number"),
    # Finite Python floats that float32 kernels would turn into inf or 0.
    (dict(temperature=1e39), "temperature must lie within float32"),
    (dict(temperature=1e-50), "temperature must lie within float32"),
    (dict(denominator=1e39), "denominator must lie within float32"),
    (dict(denominator=1e-50), "denominator must lie within float32"),
    (dict(temperature=1e-30, denominator=1e-30), r"temperature \* denominator must lie"),
    (dict(temperature=3e38, denominator=1e-3), r"temperature \* log2\(e\) must lie"),
    (dict(backend="fast"), "backend must be 'auto' or one of"),
    (dict(backend="cuda"), "backend 'cuda' cannot run smooth_chamfer on cpu"),
]


@pytest.mark.parametrize("backend", available_backends("smooth_chamfer", "cpu"))
@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(kwargs, message, backend):
    args = dict(x=_sets(2, 4, 8), y=_sets(3, 4, 8), backend=backend)
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=message):
        smooth_chamfer(x, y, **args)


def test_device_mismatch_is_named():
    x = torch.randn(2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        smooth_chamfer(x, torch.randn(3, 4, 8))


# ----------------------------------------------------------------------------- non-finite input


def masked_pair(device, dtype):
    """x (5, 4, 24), y (6, 3, 24) and masks with a masked element in some sets of each side."""
    x, y = unit_sets(5, 4, 24, dtype, device), unit_sets(6, 3, 24, dtype, device)
    xm = torch.ones(5, 4, dtype=torch.bool, device=device)
    ym = torch.ones(6, 3, dtype=torch.bool, device=device)
    xm[0, 3] = xm[2, 1:] = False
    ym[1, 0] = ym[4, 2] = False
    return x, y, xm, ym


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_non_finite_real_element_gives_nan_in_exactly_its_pairs(device, backend, dtype, side,
                                                                bad, seed):
    # One broken embedding must never rank as a plausible score: the reference (the spec) makes
    # every pair it touches NaN, and every backend gives the same, forward and backward.
    x, y, xm, ym = masked_pair(device, dtype)
    if side == "x":
        x[3, 2, 5] = bad
    else:
        y[2, 1, 7] = bad
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = smooth_chamfer(xr, yr, x_mask=xm, y_mask=ym, backend=backend)
    touched = torch.zeros(5, 6, dtype=torch.bool, device=device)
    if side == "x":
        touched[3, :] = True
    else:
        touched[:, 2] = True
    assert torch.equal(out.isnan(), touched), f"backend={backend} seed={seed}"
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, dx_ref, dy_ref = reference(x, y, grad, x_mask=xm, y_mask=ym)
    msg = f"backend={backend} dtype={dtype} bad={bad} seed={seed}"
    assert_same_values(out, ref, f"S {msg}", VALUE_TOL)
    assert (xr.grad[~xm] == 0).all() and (yr.grad[~ym] == 0).all(), msg
    rtol = registry.get("smooth_chamfer", backend).grad_rtol[dtype]
    if bad != bad:  # NaN: the gradient's NaN pattern is the reference's
        assert_same_values(xr.grad, dx_ref, f"dx {msg}", rtol)
        assert_same_values(yr.grad, dy_ref, f"dy {msg}", rtol)
    else:  # +-inf: only the sets that no touched pair reaches keep a defined gradient
        keep_x = ~touched.any(1)
        keep_y = ~touched.any(0)
        assert_same_values(xr.grad[keep_x], dx_ref[keep_x], f"dx {msg}", rtol)
        assert_same_values(yr.grad[keep_y], dy_ref[keep_y], f"dy {msg}", rtol)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30], ids=str)
def test_masked_elements_never_influence_anything(device, backend, dtype, poison, seed):
    # Padding holds whatever the caller's buffer held: results and gradients are those with
    # zeros there, and every masked element's gradient is exactly 0.
    x, y, xm, ym = masked_pair(device, dtype)
    x[~xm], y[~ym] = 0, 0
    runs = []
    for fill in (0.0, poison):
        xp, yp = x.clone(), y.clone()
        xp[~xm], yp[~ym] = fill, fill
        xp.requires_grad_(), yp.requires_grad_()
        out = smooth_chamfer(xp, yp, x_mask=xm, y_mask=ym, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view(out.shape))
        runs.append((out.detach(), xp.grad, yp.grad))
    msg = f"backend={backend} dtype={dtype} poison={poison} seed={seed}"
    (out0, dx0, dy0), (out1, dx1, dy1) = runs
    assert all(torch.isfinite(t).all() for t in (out1, dx1, dy1)), msg
    assert (dx1[~xm] == 0).all() and (dy1[~ym] == 0).all(), msg
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6, msg=msg)
    # Atomic adds (GPU backward kernels) may sum in another order from run to run, which can
    # move a 16-bit gradient by one ulp.
    ulp = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for got, want in ((dx1, dx0), (dy1, dy0)):
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * want.abs().max().item(),
                                   msg=msg)


# ----------------------------------------------------------------------------- torch.compile


def compiled(fn):
    # aot_eager traces like the default backend (dynamo, fake tensors, AOT autograd) without
    # its slow C++ code generation; fullgraph: a graph break is a failure.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend,compiler", [("cpu", "aot_eager"), ("torch", "inductor")])
def test_compiled_call_raises_the_eager_error_for_a_set_with_no_element(backend, compiler):
    # inductor once: the check must survive its dead-code elimination and fusion.
    x, y = unit_sets(2, 4, 8, torch.float32, "cpu"), unit_sets(3, 4, 8, torch.float32, "cpu")
    ym = torch.ones(3, 4, dtype=torch.bool)
    ym[1] = False
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, m: smooth_chamfer(a, b, y_mask=m, backend=backend),
                       fullgraph=True, backend=compiler)
    with pytest.raises(ValueError, match="y_mask: set 1 has no valid element"):
        fn(x, y, ym)


def test_compiled_call_raises_the_eager_errors_for_bad_arguments():
    x, y = unit_sets(2, 4, 8, torch.float32, "cpu"), unit_sets(3, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="same embedding size D"):
        compiled(lambda a, b: smooth_chamfer(a, b[..., :5]))(x, y)
    with pytest.raises(ValueError, match="temperature must lie within float32"):
        compiled(lambda a, b: smooth_chamfer(a, b, temperature=1e39))(x, y)
    # A tensor temperature cannot reach the float32 kernels from inside a graph: the error
    # says what to pass instead.
    with pytest.raises(ValueError, match="temperature is a tensor.*pass a Python float"):
        compiled(lambda a, b, t: smooth_chamfer(a, b, temperature=t))(x, y, torch.tensor(8.0))


@pytest.mark.parametrize("dtype,m", [(torch.float64, 4), (torch.float32, 33)],
                         ids=["float64", "set_size_33"])
def test_reference_fallbacks_compile(dtype, m, seed):
    x, y = unit_sets(3, m, 8, dtype, "cpu"), unit_sets(4, 3, 8, dtype, "cpu")
    xm = random_mask(3, m, "cpu")
    fn = lambda a, b, mask: smooth_chamfer(a, b, x_mask=mask)  # noqa: E731
    torch.testing.assert_close(compiled(fn)(x, y, xm), fn(x, y, xm))
    xm[2] = False
    with pytest.raises(ValueError, match="x_mask: set 2 has no valid element"):
        compiled(fn)(x, y, xm)
