"""Every slot_attention backend against the float64 reference: values, gradients, masks, dtypes."""
import subprocess
import sys

import pytest
import torch

from asserts import assert_same_values
from dive.ops import (available_backends, registry, slot_attention, slot_attention_ref,
                      slot_attention_weights)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    pytest.param(dev, name, id=f"{dev}-{name}", marks=[pytest.mark.gpu] if dev == "cuda" else [])
    for dev in DEVICES
    for name in available_backends("slot_attention", dev)
]
# (B, H, K, N, d, dv): ones, primes, K = 1 and 32, N = 1, d != dv, sizes off every tile.
# Marked quick (the GPU check's quick run; each Triton specialisation costs ~1.7 s to compile
# there): the most slots, with token and dv tails; K=4 comes from the sharp-attention test.
SHAPES = [(1, 1, 1, 1, 1, 1), (2, 3, 4, 36, 16, 16), (3, 1, 3, 7, 5, 9),
          pytest.param((1, 2, 32, 37, 64, 33), marks=pytest.mark.quick),
          (2, 1, 5, 130, 8, 12), (1, 1, 17, 1, 3, 3)]
# Outputs are rounded to the input dtype: relative to the largest output.
VALUE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(b, h, slots, n, d, dv, dtype, device):
    q = torch.randn(b, h, slots, d, device=device)
    k = torch.randn(b, h, n, d, device=device)
    v = torch.randn(b, h, n, dv, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(b, n, device):
    mask = torch.rand(b, n, device=device) > 0.4
    mask[torch.arange(b), torch.randint(n, (b,))] = True  # every row keeps one real token
    return mask


def reference(q, k, v, grad, **kw):
    """Value and gradients of the float64 reference at the same (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = slot_attention_ref(*leaves, **kw)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def check_against_reference(q, k, v, backend, seed, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = slot_attention(*leaves, backend=backend, **kw)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[3])
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, grads = reference(q, k, v, grad, **kw)
    msg = f"backend={backend} dtype={q.dtype} q={tuple(q.shape)} v={tuple(v.shape)} seed={seed}"
    assert torch.isfinite(out).all(), msg
    tol = VALUE_TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(),
                               msg=msg)
    rtol = registry.get("slot_attention", backend).grad_rtol[q.dtype]
    # dA = do.(v_n - out_i) / r_i cancels when a slot holds few tokens, so each gradient's error
    # scales with the largest gradient of the problem, not only with its own size.
    scale = max(g.abs().max().item() for g in grads)
    for leaf, want, name in zip(leaves, grads, ("dq", "dk", "dv")):
        got = leaf.grad
        assert got.dtype == q.dtype and got.shape == want.shape, f"{name} {msg}"
        atol = rtol * (want.abs().max().item() + 0.05 * scale) + 1e-7
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=f"{name} {msg}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_matches_reference(device, backend, dtype, shape, masked, seed):
    q, k, v = make_inputs(*shape, dtype, device)
    mask = make_mask(shape[0], shape[3], device) if masked else None
    check_against_reference(q, k, v, backend, seed, key_mask=mask)


@pytest.mark.quick
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
def test_sharp_attention_is_stable(device, backend, dtype, seed):
    # scale 100 on unit-norm vectors: scores span +-100, exp overflows unless max-shifted.
    q, k, v = make_inputs(2, 2, 4, 19, 24, 8, torch.float32, device)
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    check_against_reference(q.to(dtype), k.to(dtype), v.to(dtype), backend, seed, scale=100.0)


@pytest.mark.parametrize("device,backend", CASES)
def test_masked_tokens_weigh_exactly_zero(device, backend, seed):
    b, h, slots, n, d, dv = 3, 2, 4, 23, 16, 8
    q, k, v = make_inputs(b, h, slots, n, d, dv, torch.float32, device)
    mask = make_mask(b, n, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = slot_attention(*leaves, key_mask=mask, backend=backend)
    out.backward(torch.randn_like(out))
    hidden = ~mask[:, None, :]
    assert (leaves[1].grad.abs().sum(-1) * hidden == 0).all(), f"dk on masked tokens, seed={seed}"
    assert (leaves[2].grad.abs().sum(-1) * hidden == 0).all(), f"dv on masked tokens, seed={seed}"
    # Whatever sits in a masked token's k and v, the output does not move.
    k2, v2 = k.clone(), v.clone()
    k2[hidden.expand(b, h, n)] = 1e4
    v2[hidden.expand(b, h, n)] = -1e4
    again = slot_attention(q, k2, v2, key_mask=mask, backend=backend)
    assert torch.equal(again, out.detach()), f"masked token values leak, seed={seed}"


@pytest.mark.parametrize("device,backend", CASES)
def test_mask_equals_dropping_the_tokens(device, backend, seed):
    q, k, v = make_inputs(2, 3, 4, 30, 12, 10, torch.float32, device)
    keep = 17
    mask = torch.zeros(2, 30, dtype=torch.bool, device=device)
    mask[:, :keep] = True
    full = slot_attention(q, k, v, key_mask=mask, backend=backend)
    dropped = slot_attention(q, k[:, :, :keep], v[:, :, :keep], backend=backend)
    torch.testing.assert_close(full, dropped, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")


@pytest.mark.parametrize("backend", available_backends("slot_attention", "cpu"))
def test_noncontiguous_inputs(backend, seed):
    # The model layer hands over (B, N, H, d) projections permuted to (B, H, N, d).
    b, h, n, d = 2, 3, 9, 8
    q = torch.randn(b, 4, h, d).permute(0, 2, 1, 3)
    k = torch.randn(b, n, h, d).permute(0, 2, 1, 3)
    v = torch.randn(b, n, h, d).permute(0, 2, 1, 3)
    check_against_reference(q, k, v, backend, seed)
    mask = make_mask(b, n, "cpu").t().contiguous().t()  # the same mask, column-major
    check_against_reference(q, k, v, backend, seed, key_mask=mask)


def test_large_dims_run_on_cpu_backend(seed):
    # Beyond the fused kernels' 512 the CPU kernel still runs (it has no register tile).
    q, k, v = make_inputs(1, 1, 3, 5, 600, 520, torch.float32, "cpu")
    check_against_reference(q, k, v, "cpu", seed)


def test_float64_and_large_k_use_the_reference(seed):
    q, k, v = make_inputs(2, 1, 40, 6, 4, 4, torch.float64, "cpu")
    check = slot_attention(q, k, v, backend="cpu")
    torch.testing.assert_close(check, slot_attention_ref(q, k, v))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    check_against_reference(q32, k32, v32, "cpu", seed)


def test_empty_batch_keeps_graph():
    q = torch.randn(0, 2, 4, 8, requires_grad=True)
    k = torch.randn(0, 2, 5, 8, requires_grad=True)
    v = torch.randn(0, 2, 5, 3, requires_grad=True)
    out = slot_attention(q, k, v)
    assert out.shape == (0, 2, 4, 3)
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


def test_default_scale_is_inverse_sqrt_d(seed):
    q, k, v = make_inputs(1, 1, 4, 6, 16, 4, torch.float32, "cpu")
    torch.testing.assert_close(slot_attention(q, k, v), slot_attention(q, k, v, scale=0.25))
    assert not torch.allclose(slot_attention(q, k, v), slot_attention(q, k, v, scale=1.0))


def test_cpu_backend_under_cpu_autocast(seed):
    # Autocast reaches inside the custom op: bf16 GEMM results once corrupted the native
    # epilogue's fp32 buffers and aborted the process, hence the subprocess.
    code = """if True:
        import torch
        from dive.ops import slot_attention
        torch.manual_seed(%d)
        q = torch.randn(2, 3, 4, 8, requires_grad=True)
        k = torch.randn(2, 3, 11, 8, requires_grad=True)
        v = torch.randn(2, 3, 11, 5, requires_grad=True)
        want = slot_attention(q, k, v, backend="cpu")
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = slot_attention(q, k, v, backend="cpu")
            grads = torch.autograd.grad(got.sum(), (q, k, v))
        assert torch.equal(got, want), (got - want).abs().max()
        for a, b in zip(grads, want_grads):
            assert torch.equal(a, b), (a - b).abs().max()
    """ % seed
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_compiles_fullgraph(seed):
    q, k, v = make_inputs(2, 2, 4, 9, 8, 8, torch.float32, "cpu")
    mask = make_mask(2, 9, "cpu")
    fn = torch.compile(lambda a, b, c: slot_attention(a, b, c, key_mask=mask, backend="cpu"),
                       fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.sum().backward()
    ref, grads = reference(q, k, v, torch.ones_like(out), key_mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for leaf, want in zip(leaves, grads):
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def _call(**over):
    args = dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 6))
    args.update(over)
    kw = {name: args.pop(name) for name in list(args) if name not in ("q", "k", "v")}
    return slot_attention(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize("over,match", [
    (dict(q=torch.randn(2, 4, 8)), r"q must have shape \(B, H, K, d\)"),
    (dict(q=torch.randn(2, 3, 4, 8).int()), "q has dtype"),
    (dict(k=torch.randn(2, 3, 5, 8).half()), "same dtype"),
    (dict(k=torch.randn(2, 3, 5, 7)), "k must have shape"),
    (dict(k=torch.randn(2, 2, 5, 8)), "k must have shape"),
    (dict(v=torch.randn(2, 3, 4, 6)), "v must have shape"),
    (dict(q=torch.randn(2, 3, 0, 8)), "K, N, d, dv >= 1"),
    (dict(k=torch.randn(2, 3, 0, 8), v=torch.randn(2, 3, 0, 6)), "K, N, d, dv >= 1"),
    (dict(key_mask=torch.ones(2, 5)), "key_mask must be a bool"),
    (dict(key_mask=torch.ones(2, 4, dtype=torch.bool)),
     r"key_mask must be a bool tensor of shape \(B, N\)"),
    (dict(key_mask=torch.tensor([[True] * 5, [False] * 5])), "row 1 has no real token"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(scale="big"), "scale must be a finite number"),
    (dict(eps="small"), "eps must be a finite number"),
    # Finite Python floats that float32 kernels would turn into inf or 0.
    (dict(scale=1e39), "scale must lie within float32"),
    (dict(scale=-1e-50), "scale must lie within float32"),
    (dict(scale=3e38), r"scale \* log2\(e\) must lie"),
    (dict(eps=1e-50), "eps must lie within float32"),
    (dict(eps=-1.0), "eps must be finite and >= 0"),
    (dict(backend="gpu"), "backend must be 'auto' or one of"),
    (dict(backend="cuda"), "cannot run slot_attention on cpu"),
])
def test_bad_input_is_a_clear_error(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)
    if "v" in over or "backend" in over:
        return
    q, k = over.get("q", torch.randn(2, 3, 4, 8)), over.get("k", torch.randn(2, 3, 5, 8))
    kw = {name: over[name] for name in ("key_mask", "scale", "eps") if name in over}
    with pytest.raises(ValueError, match=match):
        slot_attention_weights(q, k, **kw)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fully_masked_row_is_an_error_on_every_path(backend):
    mask = torch.tensor([[True] * 5, [False] * 5])
    with pytest.raises(ValueError, match="row 1 has no real token"):
        _call(key_mask=mask, backend=backend)


def test_weights_are_what_the_output_averages(seed):
    q, k, v = make_inputs(2, 3, 4, 11, 8, 5, torch.float64, "cpu")
    mask = make_mask(2, 11, "cpu")
    weights = slot_attention_weights(q, k, key_mask=mask)
    assert (weights * ~mask[:, None, None, :] == 0).all()
    torch.testing.assert_close(weights.sum(3), torch.ones(2, 3, 4, dtype=torch.float64), atol=1e-6,
                               rtol=0)  # 1 - eps / r
    torch.testing.assert_close(weights @ v, slot_attention_ref(q, k, v, key_mask=mask))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backend_normaliser_is_the_slot_total(backend, seed):
    # r (kept for the backward) must be sum_n A_in + eps, the same for every backend.
    q, k, v = make_inputs(2, 2, 3, 9, 4, 4, torch.float32, "cpu")
    mask = make_mask(2, 9, "cpu")
    _, r = registry.get("slot_attention", backend).forward(q, k, v, mask, 0.5, 1e-3)
    q64, k64 = q.double(), k.double()
    attn = (torch.einsum("bhkd,bhnd->bhkn", q64, k64) * 0.5).softmax(2) * mask[:, None, None, :]
    torch.testing.assert_close(r.double(), attn.sum(3) + 1e-3, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
def test_non_finite_real_element_gives_what_the_reference_gives(device, backend, dtype, where,
                                                                 bad, seed):
    # NaN (or, from an inf in v, inf) in exactly the outputs the element reaches (q or k: its
    # whole (b, h); v: one column of it), forward and backward, on every backend.
    q, k, v = make_inputs(2, 2, 4, 9, 8, 6, dtype, device)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1, 6:] = False
    {"q": q, "k": k, "v": v}[where][1, 0, 2, 3] = bad
    k[1, 0, 0, 3] = 1.0  # an inf in q then scores +inf on a real token (not -inf everywhere)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = slot_attention(*leaves, key_mask=mask, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, grads = reference(q, k, v, grad, key_mask=mask)
    msg = f"backend={backend} dtype={dtype} {where}={bad} seed={seed}"
    bad_out = ~torch.isfinite(out)
    assert bad_out[1, 0].any() and not bad_out[0].any() and not bad_out[1, 1].any(), msg
    assert_same_values(out, ref, f"out {msg}", VALUE_TOL[dtype])
    hidden = ~mask[:, None, :]
    rtol = registry.get("slot_attention", backend).grad_rtol[dtype]
    for leaf, want, name in zip(leaves, grads, ("dq", "dk", "dv")):
        if name != "dq":
            assert (leaf.grad[hidden.expand(2, 2, 9)] == 0).all(), f"{name} {msg}"
        if bad != bad:
            assert_same_values(leaf.grad, want, f"{name} {msg}", rtol)
        else:  # inf: the (b, h) it sits in has no defined gradient; the others do
            assert_same_values(leaf.grad[0], want[0], f"{name} {msg}", rtol)
            assert_same_values(leaf.grad[1, 1], want[1, 1], f"{name} {msg}", rtol)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30], ids=str)
def test_masked_tokens_never_influence_anything(device, backend, dtype, poison, seed):
    q, k, v = make_inputs(3, 2, 4, 13, 8, 6, dtype, device)
    mask = make_mask(3, 13, device)
    hidden = (~mask[:, None, :]).expand(3, 2, 13)
    runs = []
    for fill in (0.0, poison):
        kp, vp = k.clone(), v.clone()
        kp[hidden], vp[hidden] = fill, fill
        leaves = [t.clone().requires_grad_() for t in (q, kp, vp)]
        out = slot_attention(*leaves, key_mask=mask, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view(out.shape).to(dtype))
        runs.append([out.detach()] + [t.grad for t in leaves])
    msg = f"backend={backend} dtype={dtype} poison={poison} seed={seed}"
    # The CUDA backward sums do.out with atomics, which can move a 16-bit gradient by one ulp.
    ulp = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for got, want, name in zip(runs[1], runs[0], ("out", "dq", "dk", "dv")):
        assert torch.isfinite(got).all(), f"{name} {msg}"
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * want.abs().max().item() + 1e-6,
                                   msg=f"{name} {msg}")
    assert (runs[1][2][hidden] == 0).all() and (runs[1][3][hidden] == 0).all(), msg


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("scale", [1e10, 1e30])
def test_huge_finite_scale_matches_the_reference(device, backend, scale, seed):
    # The slot softmax turns into an argmax; every backend must still pick the reference's.
    q, k, v = make_inputs(2, 2, 4, 11, 8, 8, torch.float32, device)
    out = slot_attention(q, k, v, scale=scale, backend=backend)
    ref = slot_attention_ref(q.double(), k.double(), v.double(), scale=scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5,
                               msg=f"backend={backend} scale={scale} seed={seed}")


# ----------------------------------------------------------------------------- torch.compile


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("slots", [4, 40], ids=["fused", "reference_K40"])
def test_compiled_call_raises_the_eager_errors(slots):
    q, k, v = make_inputs(2, 2, slots, 5, 8, 8, torch.float32, "cpu")
    mask = torch.tensor([[True] * 5, [False] * 5])
    with pytest.raises(ValueError, match="key_mask: row 1 has no real token"):
        compiled(lambda a, b, c, m: slot_attention(a, b, c, key_mask=m))(q, k, v, mask)
    with pytest.raises(ValueError, match="k must have shape"):
        compiled(lambda a, b, c: slot_attention(a, b[..., :3], c))(q, k, v)
    with pytest.raises(ValueError, match="scale is a tensor.*pass a Python float"):
        compiled(lambda a, b, c, s: slot_attention(a, b, c, scale=s))(q, k, v, torch.tensor(0.5))


@pytest.mark.parametrize("dtype,slots", [(torch.float64, 4), (torch.float32, 40)],
                         ids=["float64", "K40"])
def test_reference_fallbacks_compile_with_a_key_mask(dtype, slots, seed):
    q, k, v = make_inputs(2, 2, slots, 7, 8, 8, dtype, "cpu")
    mask = make_mask(2, 7, "cpu")
    fn = lambda a, b, c, m: slot_attention(a, b, c, key_mask=m)  # noqa: E731
    torch.testing.assert_close(compiled(fn)(q, k, v, mask), fn(q, k, v, mask))
