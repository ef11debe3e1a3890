"""The Triton slot cross-attention kernels against the float64 reference (docs/design.md §2.3-2.4).

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py without CUDA), so the shapes are small
but odd: every tile and chunk has a ragged tail.
"""
import math

import pytest
import torch

from dive.ops import registry

slot_attention = pytest.importorskip("dive.kernels.slot_attention")

EPS = 1e-6
# Largest error allowed, as a fraction of the reference's largest magnitude: 16-bit ~3x the
# worst seen over 8 seeds, mostly A (forward) and A / r (dv) rounded to the input dtype for the
# tensor-core dots; fp32 the registry's gradient tolerance (2e-5 failed once in ~30 CI seeds).
TOL = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 4e-2}
# (B, H, K, N, d, dv, masked): K in {1, 3, 4, 32}, N in {1, 7, 37, 130}, d, dv in {1, 5, 64, 130}.
SHAPES = [
    (1, 1, 1, 1, 1, 1, False),
    (2, 1, 3, 7, 5, 130, True),
    (2, 2, 4, 37, 64, 64, True),
    (2, 1, 32, 130, 130, 5, True),
    (2, 1, 4, 130, 1, 64, False),
    (3, 1, 3, 37, 130, 1, True),
    (1, 1, 32, 7, 64, 130, False),
]


def reference(q, k, v, key_mask, scale, eps):
    """(out, r) of the reference backend: the spec (dive.ops.slot_attention_ref) in the inputs'
    float64, r = sum_n A + eps rounded to float32; masked tokens weigh exactly 0."""
    out, r = registry.get("slot_attention", "torch").forward(q, k, v, key_mask, scale, eps)
    return out, r.to(q.dtype)


def _key_mask(B, N):
    mask = torch.rand(B, N) < 0.6
    mask[0] = False
    mask[0, torch.randint(N, ())] = True  # a set with a single real token
    return mask


def _poisoned(fn):
    # Outputs and scratch the kernels allocate start as NaN: every element must be written.
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t
    return wrapper


def _close(got, want, dtype, what, floor=0.0):
    """Max error within TOL of the larger of want's magnitude and `floor`."""
    err = (got.double() - want).abs().max().item()
    size = max(want.abs().max().item(), floor, 1e-30)
    assert err <= TOL[dtype] * size, f"{what}: error {err:.3g} vs magnitude {size:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B,H,K,N,d,dv,masked", SHAPES,
                         ids=["B{}H{}K{}N{}d{}dv{}{}".format(*s[:6], "-mask" * s[6])
                              for s in SHAPES])
def test_matches_reference(seed, monkeypatch, dtype, B, H, K, N, d, dv, masked):
    scale = d ** -0.5
    q, k = torch.randn(B, H, K, d) * 2, torch.randn(B, H, N, d)
    v, do = torch.randn(B, H, N, dv), torch.randn(B, H, K, dv)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    key_mask = _key_mask(B, N) if masked else None

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, r64 = reference(q64, k64, v64, key_mask, scale, EPS)
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())

    if masked:
        # Padding may hold anything: the kernels must not read it into any sum.
        pad = ~key_mask[:, None, :, None]
        k, v = k.masked_fill(pad, math.nan), v.masked_fill(pad, math.inf)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", _poisoned(torch.empty))
        m.setattr(torch, "empty_like", _poisoned(torch.empty_like))
        out, r = slot_attention.forward(q, k, v, key_mask, scale, EPS)
        dq, dk, dv_ = slot_attention.backward(do, q, k, v, out, r, key_mask, scale, EPS)

    msg = f"seed {seed}"
    assert out.dtype == dtype and r.dtype == torch.float32
    assert (dq.dtype, dk.dtype, dv_.dtype) == (dtype,) * 3
    # r is a sum of probabilities in fp32 whatever the dtype; only the inputs' rounding differs.
    torch.testing.assert_close(r.double(), r64.detach(), rtol=1e-5, atol=1e-5, msg=msg)
    _close(out, out64.detach(), dtype, f"out, {msg}")
    # With few real tokens do.(v_n - out_i) cancels, so dq and dk can be far smaller than dv
    # while their rounding error scales with it: judge each against the problem's gradients.
    floor = 0.05 * max(g.abs().max().item() for g in (dq64, dk64, dv64))
    _close(dq, dq64, dtype, f"dq, {msg}", floor)
    _close(dk, dk64, dtype, f"dk, {msg}", floor)
    _close(dv_, dv64, dtype, f"dv, {msg}", floor)
    if masked:
        pad = ~key_mask[:, None, :, None]
        assert (dk.masked_select(pad) == 0).all() and (dv_.masked_select(pad) == 0).all(), msg


def test_many_heads_one_slot(seed):
    """B * H programs on a 1-D grid, K = 1: every token's whole weight goes to the one slot."""
    q, k, v = torch.randn(70, 3, 1, 16), torch.randn(70, 3, 5, 16), torch.randn(70, 3, 5, 16)
    out, r = slot_attention.forward(q, k, v, None, 0.25, EPS)
    torch.testing.assert_close(r, torch.full((70, 3, 1), 5 + EPS), msg=f"seed {seed}")
    torch.testing.assert_close(out, v.sum(2, keepdim=True) / (5 + EPS), msg=f"seed {seed}")
