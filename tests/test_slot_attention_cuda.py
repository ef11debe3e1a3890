"""The CUDA slot cross-attention kernels called through their raw bindings (device pointers,
sizes, dtype code, stream) against a float64 plain-PyTorch reference: values, r, gradients,
masks, dtypes, tails of every tile, poisoned outputs and refused sizes."""
import pytest
import torch

from dive.ops import registry, slot_attention_ref
from dive.ops._native_args import DTYPE_CODE as DTYPE_CODES

pytestmark = [pytest.mark.gpu, pytest.mark.quick]  # no JIT: all of it is quick

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
EPS = 1e-8
# (B, H, K, N, d, dv): every K bucket and its edges (1, 3, 4, 5, 17, 32), N from one token to
# several tiles of 32 (7, 36, 37, 300), d and dv odd (scalar path), even (pair path), past one
# chunk per thread (130) and at the 512 limit.
SHAPES = [
    (2, 3, 1, 1, 1, 1),
    (2, 2, 3, 7, 5, 5),
    (4, 4, 4, 36, 512, 512),
    (1, 3, 5, 37, 64, 130),
    (2, 1, 17, 300, 130, 64),
    (1, 2, 32, 36, 512, 512),
    (3, 1, 32, 300, 5, 1),
    (1, 1, 4, 300, 64, 5),
    (2, 2, 17, 7, 1, 512),
    (1, 2, 32, 37, 130, 130),
]
MASKS = ["none", "random", "single"]


@pytest.fixture(scope="module")
def ext():
    return pytest.importorskip("dive._C_cuda")


def reference(q, k, v, mask, scale, eps=EPS):
    """(out, r) of the reference backend: the spec (dive.ops.slot_attention_ref) in the inputs'
    float64, r = sum_n A + eps rounded to float32; masked tokens weigh exactly 0. `mask` is the
    bindings' uint8 mask; the spec takes bool (~ on uint8 would be a bitwise not)."""
    mask = None if mask is None else mask.bool()
    out, r = registry.get("slot_attention", "torch").forward(q, k, v, mask, scale, eps)
    return out, r.to(q.dtype)


def make_mask(kind, B, N, device):
    if kind == "none":
        return None
    if kind == "random":
        mask = torch.rand(B, N, device=device) > 0.3
        mask[:, torch.randint(N, (1,)).item()] = True
    else:
        mask = torch.zeros(B, N, dtype=torch.bool, device=device)
        mask[torch.arange(B), torch.randint(N, (B,))] = True
    return mask.to(torch.uint8)


def make_inputs(B, H, K, N, d, dv, dtype):
    q = torch.randn(B, H, K, d, device="cuda").to(dtype)
    k = torch.randn(B, H, N, d, device="cuda").to(dtype)
    v = torch.randn(B, H, N, dv, device="cuda").to(dtype)
    return q, k, v


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def forward(ext, q, k, v, mask, scale, eps=EPS):
    B, H, K, d = q.shape
    N, dv = k.shape[2], v.shape[3]
    out = poisoned((B, H, K, dv), q.dtype)
    r = poisoned((B, H, K), torch.float32)
    ext.slot_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(),
                               0 if mask is None else mask.data_ptr(), out.data_ptr(),
                               r.data_ptr(), B, H, K, N, d, dv, scale, eps,
                               DTYPE_CODES[q.dtype], torch.cuda.current_stream().cuda_stream)
    return out, r


def backward(ext, do, q, k, v, out, r, mask, scale, eps=EPS):
    B, H, K, d = q.shape
    N, dv = k.shape[2], v.shape[3]
    dq, dk, dvv = poisoned(q.shape, q.dtype), poisoned(k.shape, k.dtype), poisoned(v.shape, v.dtype)
    ext.slot_attention_backward(do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                out.data_ptr(), r.data_ptr(),
                                0 if mask is None else mask.data_ptr(), dq.data_ptr(),
                                dk.data_ptr(), dvv.data_ptr(), B, H, K, N, d, dv, scale, eps,
                                DTYPE_CODES[q.dtype], torch.cuda.current_stream().cuda_stream)
    return dq, dk, dvv


def assert_close(got, want, tol, what, floor=0.0):
    """Max error within tol of the larger of want's magnitude and `floor`."""
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), floor, 1e-6)
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs magnitude {scale:.3g}"


def check(ext, shape, dtype, mask_kind, seed):
    B, H, K, N, d, dv = shape
    q, k, v = make_inputs(B, H, K, N, d, dv, dtype)
    mask = make_mask(mask_kind, B, N, "cuda")
    scale = d ** -0.5
    tol = TOL[dtype]
    why = f"seed {seed}, shape {shape}, {dtype}, mask {mask_kind}"

    out, r = forward(ext, q, k, v, mask, scale)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, want_r = reference(qd, kd, vd, mask, scale)
    assert_close(out, want_out.detach(), tol, f"out ({why})")
    assert_close(r, want_r.detach(), 1e-5, f"r ({why})")

    do = torch.randn_like(out)
    dq, dk, dvv = backward(ext, do, q, k, v, out, r, mask, scale)
    want_out.backward(do.double())
    # With few real tokens do.(v_n - out_i) cancels, so dq and dk can be far smaller than dv
    # while their rounding error scales with it: judge each against the problem's gradients,
    # as the CPU and Triton tests do.
    floor = 0.05 * max(g.abs().max().item() for g in (qd.grad, kd.grad, vd.grad))
    assert_close(dq, qd.grad, tol, f"dq ({why})", floor)
    assert_close(dk, kd.grad, tol, f"dk ({why})", floor)
    assert_close(dvv, vd.grad, tol, f"dv ({why})", floor)
    if mask is not None:
        masked = mask == 0
        assert (dk.permute(0, 2, 1, 3)[masked] == 0).all(), f"masked dk not zero ({why})"
        assert (dvv.permute(0, 2, 1, 3)[masked] == 0).all(), f"masked dv not zero ({why})"


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients(ext, shape, dtype, mask_kind, seed):
    check(ext, shape, dtype, mask_kind, seed)


def test_masked_tokens_holding_nan_are_never_read(ext, seed):
    B, H, K, N, d, dv = 2, 2, 4, 40, 64, 64
    q, k, v = make_inputs(B, H, K, N, d, dv, torch.float32)
    mask = make_mask("random", B, N, "cuda")
    pad = (mask == 0)[:, None, :, None].expand(B, H, N, 1)
    k, v = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    out, r = forward(ext, q, k, v, mask, 0.125)
    want_out, want_r = reference(q.double(), k.nan_to_num().double(), v.nan_to_num().double(),
                                 mask, 0.125)
    assert_close(out, want_out, 1e-4, f"out (seed {seed})")
    dq, dk, dvv = backward(ext, torch.randn_like(out), q, k, v, out, r, mask, 0.125)
    assert not torch.isnan(dq).any()
    assert (dk.permute(0, 2, 1, 3)[mask == 0] == 0).all()
    assert (dvv.permute(0, 2, 1, 3)[mask == 0] == 0).all()


def test_fully_masked_row_gives_zeros(ext):
    B, H, K, N, d, dv = 2, 1, 4, 9, 16, 16
    q, k, v = make_inputs(B, H, K, N, d, dv, torch.float32)
    mask = torch.ones(B, N, dtype=torch.uint8, device="cuda")
    mask[1] = 0
    out, r = forward(ext, q, k, v, mask, 0.25)
    # Exactly eps (the binding's float eps, as full_like rounds it): allclose's default atol
    # would accept r = 0.
    assert (out[1] == 0).all() and torch.equal(r[1], torch.full_like(r[1], EPS))
    dq, dk, dvv = backward(ext, torch.randn_like(out), q, k, v, out, r, mask, 0.25)
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dvv[1] == 0).all()


def test_misaligned_pointers_take_the_scalar_path(ext, seed):
    B, H, K, N, d, dv = 2, 2, 5, 37, 64, 64
    dtype = torch.float16
    # One element past a 16-byte boundary: even sizes, but no pair load is aligned.
    buffers = [torch.randn(n + 1, device="cuda").to(dtype) for n in (B * H * K * d,
                                                                      B * H * N * d,
                                                                      B * H * N * dv)]
    q = buffers[0][1:].view(B, H, K, d)
    k = buffers[1][1:].view(B, H, N, d)
    v = buffers[2][1:].view(B, H, N, dv)
    out, r = forward(ext, q, k, v, None, 0.125)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    want, _ = reference(qd, kd, vd, None, 0.125)
    assert_close(out, want.detach(), TOL[dtype], f"out (seed {seed})")
    do = torch.randn(B * H * K * dv + 1, device="cuda").to(dtype)[1:].view(B, H, K, dv)
    grads = backward(ext, do, q, k, v, out, r, None, 0.125)
    want.backward(do.double())
    floor = 0.05 * max(t.grad.abs().max().item() for t in (qd, kd, vd))
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, (qd, kd, vd)):
        assert_close(got, leaf.grad, TOL[dtype], f"{name} (seed {seed})", floor)


def test_runs_on_the_given_stream(ext, seed):
    B, H, K, N, d, dv = 8, 4, 4, 36, 512, 512
    q, k, v = make_inputs(B, H, K, N, d, dv, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, _ = forward(ext, q, k, v, None, d ** -0.5)
    torch.cuda.current_stream().wait_stream(stream)
    want, _ = reference(q.double(), k.double(), v.double(), None, d ** -0.5)
    assert_close(out, want, TOL[torch.bfloat16], f"out (seed {seed})")


def test_empty_sizes_launch_nothing(ext):
    q, k, v = make_inputs(2, 2, 4, 0, 8, 8, torch.float32)
    out, r = forward(ext, q, k, v, None, 1.0)
    assert torch.isnan(out).all() and torch.isnan(r).all()  # untouched: nothing to compute
    q, k, v = make_inputs(0, 2, 4, 5, 8, 8, torch.float32)
    out, r = forward(ext, q, k, v, None, 1.0)  # B = 0: no launch, and no launch error
    assert out.numel() == r.numel() == 0


@pytest.mark.parametrize("K, d, dv, dtype_code, words", [
    (33, 8, 8, 0, "K = 33"),
    (0, 8, 8, 0, "K = 0"),
    (4, 513, 8, 0, "d = 513"),
    (4, 8, 0, 0, "dv = 0"),
    (4, 8, 8, 3, "dtype code 3"),
])
def test_unsupported_sizes_are_refused(ext, K, d, dv, dtype_code, words):
    B, H, N = 2, 2, 5
    q = torch.zeros(B, H, max(K, 1), max(d, 1), device="cuda")
    kv = torch.zeros(B, H, N, max(d, dv, 1), device="cuda")
    out = torch.zeros(B, H, max(K, 1), max(dv, 1), device="cuda")
    r = torch.zeros(B, H, max(K, 1), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(RuntimeError, match=words):
        ext.slot_attention_forward(q.data_ptr(), kv.data_ptr(), kv.data_ptr(), 0, out.data_ptr(),
                                   r.data_ptr(), B, H, K, N, d, dv, 1.0, EPS, dtype_code, stream)
    with pytest.raises(RuntimeError, match=words):
        ext.slot_attention_backward(out.data_ptr(), q.data_ptr(), kv.data_ptr(), kv.data_ptr(),
                                    out.data_ptr(), r.data_ptr(), 0, q.data_ptr(),
                                    kv.data_ptr(), kv.data_ptr(), B, H, K, N, d, dv, 1.0, EPS,
                                    dtype_code, stream)


# ----------------------------------------------------------------------------- non-finite input


def ref_with_grads(q, k, v, mask, scale, do):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = slot_attention_ref(*leaves, key_mask=None if mask is None else mask.bool(), scale=scale,
                             eps=EPS)
    grads = torch.autograd.grad(out, leaves, do.double())
    return out.detach(), grads


def same_nan_and_close(got, want, tol, what):
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    ok = ~want.isnan()
    if ok.any():
        assert_close(got[ok], want[ok], tol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 2, 3, 7, 5, 5), (2, 2, 17, 37, 64, 130)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_a_real_element_gives_the_reference_nans(ext, seed, dtype, shape, where):
    B, H, K, N, d, dv = shape
    q, k, v = make_inputs(B, H, K, N, d, dv, dtype)
    mask = make_mask("random", B, N, "cuda")
    n = int(mask[1].nonzero()[0, 0])
    {"q": q, "k": k, "v": v}[where][1, 0, 0 if where == "q" else n, 0] = float("nan")
    scale = d ** -0.5
    do = torch.randn(B, H, K, dv, device="cuda").to(dtype)
    want, grads = ref_with_grads(q, k, v, mask, scale, do)
    why = f"seed {seed}, {where}=nan, {dtype}"
    out, r = forward(ext, q, k, v, mask, scale)
    same_nan_and_close(out, want, TOL[dtype], f"out {why}")
    got = backward(ext, do, q, k, v, out, r, mask, scale)
    hidden = (mask == 0)[:, None, :].expand(B, H, N)
    for g, w, name in zip(got, grads, ("dq", "dk", "dv")):
        if name != "dq":
            assert (g[hidden] == 0).all(), f"{name} on masked tokens, {why}"
        same_nan_and_close(g, w, TOL[dtype], f"{name} {why}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30], ids=str)
def test_poisoned_masked_tokens_change_nothing(ext, seed, dtype, poison):
    B, H, K, N, d, dv = 2, 2, 17, 37, 64, 130
    q, k, v = make_inputs(B, H, K, N, d, dv, dtype)
    mask = make_mask("random", B, N, "cuda")
    hidden = (mask == 0)[:, None, :].expand(B, H, N)
    k[hidden], v[hidden] = 0, 0
    kp, vp = k.clone(), v.clone()
    kp[hidden], vp[hidden] = poison, poison
    scale = d ** -0.5
    do = torch.randn(B, H, K, dv, device="cuda").to(dtype)
    out0, r0 = forward(ext, q, k, v, mask, scale)
    out1, r1 = forward(ext, q, kp, vp, mask, scale)
    assert torch.equal(out1, out0) and torch.equal(r1, r0), f"poison {poison} leaks, seed {seed}"
    for g0, g1, name in zip(backward(ext, do, q, k, v, out0, r0, mask, scale),
                            backward(ext, do, q, kp, vp, out1, r1, mask, scale),
                            ("dq", "dk", "dv")):
        # out.do is summed with atomics: the order of its terms may differ between runs.
        assert_close(g1, g0.double(), TOL[dtype], f"{name} poison={poison}, seed {seed}")
        if name != "dq":
            assert (g1[hidden] == 0).all(), f"{name} on masked tokens, seed {seed}"
