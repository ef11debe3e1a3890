"""DivE slot cross-attention: reference, checks, backends, autograd, dispatch.

Per (b, h): s = scale * q k^T (K x N); A = softmax over the slot axis (each token spreads itself
over the slots); r_i = sum_n A_in + eps; out_i = sum_n A_in v_n / r_i (each slot takes a weighted
mean of the tokens). Masked tokens get weight exactly 0. The math and the gradient:
docs/design.md §2.3-2.4.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _native
from ..checks import (bool_mask, checked_mask, float32_number, float_tensor, mask_rows_nonempty,
                      refuse)
from . import dispatch, registry
from ._native_args import DTYPE_CODE, needs, ptr, triton_unavailable, u8

OP = "slot_attention"
# The fused kernels keep a program's slots in registers and its feature rows in one tile.
MAX_FUSED_SLOTS = 32
MAX_FUSED_DIM = 512


# ----------------------------------------------------------------------------- reference (spec)


def slot_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Optional[Tensor] = None,
                       scale: Optional[float] = None, eps: float = 1e-7) -> Tensor:
    """The executable spec in plain PyTorch; differentiable by autograd.

    Computes in float64 for float64 inputs and in float32 otherwise; returns q's dtype.
    """
    attn = slot_attention_weights(q, k, key_mask=key_mask, scale=scale, eps=eps)
    return torch.einsum("bhkn,bhnd->bhkd", attn, _real_tokens(v.to(attn.dtype), key_mask)).to(
        q.dtype)


def _real_tokens(t, key_mask):
    """t (B, H, N, d) with masked tokens set to 0: a select, so padding may hold NaN or inf."""
    return t if key_mask is None else t.masked_fill(~key_mask[:, None, :, None], 0.0)


def slot_attention_weights(q: Tensor, k: Tensor, *, key_mask: Optional[Tensor] = None,
                           scale: Optional[float] = None, eps: float = 1e-7) -> Tensor:
    """The normalised weights A' (B, H, K, N) that slot_attention applies to v, for plots.

    Plain PyTorch in float32 (float64 for float64 inputs); each slot's row sums to ~1. Takes
    slot_attention's checks (no v).
    """
    scale, eps = check_query_key(q, k, key_mask, scale, eps)
    attn = _slot_softmax(q, k, checked_mask("key_mask", key_mask, "row", "real token"), scale)
    return attn / (attn.sum(dim=3, keepdim=True) + eps)


def _slot_softmax(q, k, key_mask, scale):
    """A: softmax of the scores over the slot axis, exactly 0 on masked tokens."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    k = _real_tokens(k.to(cdt), key_mask)
    attn = (torch.einsum("bhkd,bhnd->bhkn", q.to(cdt), k) * scale).softmax(dim=2)
    if key_mask is not None:
        attn = attn.masked_fill(~key_mask[:, None, None, :], 0.0)
    return attn


# ----------------------------------------------------------------------------- argument checks


def check_inputs(q, k, v, key_mask, scale, eps):
    """Shape/dtype/device checks that need no data; returns (scale, eps) as floats."""
    float_tensor("v", v, "(B, H, N, dv)")
    scale, eps = check_query_key(q, k, key_mask, scale, eps)
    if v.dtype != q.dtype:
        raise ValueError(f"q and v must have the same dtype, got {q.dtype} and {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"q and v must be on the same device, got {q.device} and {v.device}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape (B, H, N, dv) with (B, H, N) = {tuple(k.shape[:3])} "
                         f"from k, got {tuple(v.shape)}")
    if v.shape[3] == 0:
        raise ValueError(f"slot_attention needs K, N, d, dv >= 1, got v {tuple(v.shape)}")
    return scale, eps


def check_query_key(q, k, key_mask, scale, eps):
    """check_inputs without v (what slot_attention_weights takes)."""
    float_tensor("q", q, "(B, H, K, d)")
    float_tensor("k", k, "(B, H, N, d)")
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    b, h, slots, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k must have shape (B, H, N, d) = ({b}, {h}, N, {d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if slots == 0 or d == 0 or k.shape[2] == 0:
        raise ValueError(f"slot_attention needs K, N, d, dv >= 1, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    bool_mask("key_mask", key_mask, (b, k.shape[2]), q.device, "(B, N)")
    scale = float32_number("scale", d ** -0.5 if scale is None else scale)
    float32_number("scale * log2(e)", scale * 1.4426950408889634)  # the kernels' score unit
    eps = float32_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return scale, eps


# ----------------------------------------------------------------------------- backends
# Each forward returns (out in q's dtype, r float32 (B, H, K)); each backward (dq, dk, dv).


# CPU: the GEMMs run through torch (oneDNN/MKL); the native epilogue does the per-token slot
# softmax and normalisation in between. The (B, H, K, N) score block is K/d the size of k.
# Autocast stays on inside a custom op: it would hand the fp32 epilogue bf16 GEMM results.


@torch.autocast("cpu", enabled=False)
def _cpu_forward(q, k, v, key_mask, scale, eps):
    b, h, slots, _ = q.shape
    n = k.shape[2]
    qf, kf, vf = q.float(), _real_tokens(k.float(), key_mask), _real_tokens(v.float(), key_mask)
    weights = torch.matmul(qf, kf.transpose(2, 3)).contiguous()
    r = torch.empty(b, h, slots, dtype=torch.float32)
    mask = u8(key_mask)  # held in a local: a copy would be freed before the native call
    _native.cpu_module().slot_attention_forward_epilogue(
        weights.data_ptr(), ptr(mask), r.data_ptr(), b * h, h, slots, n, scale, eps)
    return torch.matmul(weights, vf).to(q.dtype), r


@torch.autocast("cpu", enabled=False)
def _cpu_backward(grad, q, k, v, out, r, key_mask, scale, eps):
    b, h, slots, _ = q.shape
    n = k.shape[2]
    gf, qf = grad.float(), q.float()
    kf, vf = _real_tokens(k.float(), key_mask), _real_tokens(v.float(), key_mask)
    ds = torch.matmul(qf, kf.transpose(2, 3)).contiguous()
    weights = torch.matmul(gf, vf.transpose(2, 3)).contiguous()
    r, mask = r.contiguous(), u8(key_mask)  # locals keep any copies alive through the call
    _native.cpu_module().slot_attention_backward_epilogue(
        ds.data_ptr(), weights.data_ptr(), r.data_ptr(), ptr(mask), b * h, h, slots, n, scale)
    # The weights are 0 on masked tokens, but 0 times an inf in q or do is NaN.
    return (torch.matmul(ds, kf), _real_tokens(torch.matmul(ds.transpose(2, 3), qf), key_mask),
            _real_tokens(torch.matmul(weights.transpose(2, 3), gf), key_mask))


def _contiguous(*tensors):
    return tuple(t.contiguous() for t in tensors)


# The fused kernels take contiguous tensors; the CPU path's GEMMs take any strides, which saves
# the model layer's (B, N, H, d) -> (B, H, N, d) copies there.


def _cuda_forward(q, k, v, key_mask, scale, eps):
    q, k, v = _contiguous(q, k, v)
    b, h, slots, d = q.shape
    n, dv = v.shape[2], v.shape[3]
    mask = u8(key_mask)
    out = torch.empty(b, h, slots, dv, dtype=q.dtype, device=q.device)
    r = torch.empty(b, h, slots, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _native.cuda_module().slot_attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), ptr(mask), out.data_ptr(), r.data_ptr(),
            b, h, slots, n, d, dv, scale, eps, DTYPE_CODE[q.dtype], stream)
    return out, r


def _cuda_backward(grad, q, k, v, out, r, key_mask, scale, eps):
    q, k, v, out = _contiguous(q, k, v, out)
    b, h, slots, d = q.shape
    n, dv = v.shape[2], v.shape[3]
    mask = u8(key_mask)
    grad = grad.to(q.dtype).contiguous()
    dq, dk, dvg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _native.cuda_module().slot_attention_backward(
            grad.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            r.data_ptr(), ptr(mask), dq.data_ptr(), dk.data_ptr(), dvg.data_ptr(), b, h, slots,
            n, d, dv, scale, eps, DTYPE_CODE[q.dtype], stream)
    return dq, dk, dvg


def _triton_forward(q, k, v, key_mask, scale, eps):
    from ..kernels import slot_attention as kernels  # imports triton: only when used
    mask = None if key_mask is None else key_mask.contiguous()
    return kernels.forward(*_contiguous(q, k, v), mask, scale, eps)


def _triton_backward(grad, q, k, v, out, r, key_mask, scale, eps):
    from ..kernels import slot_attention as kernels
    mask = None if key_mask is None else key_mask.contiguous()
    return kernels.backward(grad.to(q.dtype).contiguous(), *_contiguous(q, k, v, out), r, mask,
                            scale, eps)


def _torch_forward(q, k, v, key_mask, scale, eps):
    attn = _slot_softmax(q, k, key_mask, scale)
    r = attn.sum(3) + eps
    out = torch.einsum("bhkn,bhnd->bhkd", attn / r[..., None],
                       _real_tokens(v.to(attn.dtype), key_mask))
    return out.to(q.dtype), r.float()


def _torch_backward(grad, q, k, v, out, r, key_mask, scale, eps):
    with torch.enable_grad():
        qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
        res = slot_attention_ref(qr, kr, vr, key_mask=key_mask, scale=scale, eps=eps)
        return torch.autograd.grad(res, (qr, kr, vr), grad.to(res.dtype))


def _cuda_unavailable(device):
    reason = needs("_C_cuda", "cuda")(device)
    if reason is None and not hasattr(_native.cuda_module(), "slot_attention_forward"):
        return "dive._C_cuda was built without the slot-attention kernels"
    return reason


_GRADS = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
registry.register(OP, registry.Backend("torch", _torch_forward, _torch_backward, lambda d: None,
                                       {"cpu": 1, "cuda": 2}, _GRADS))
registry.register(OP, registry.Backend("cpu", _cpu_forward, _cpu_backward, needs("_C", "cpu"),
                                       {"cpu": 0}, _GRADS))
registry.register(OP, registry.Backend("triton", _triton_forward, _triton_backward,
                                       triton_unavailable, {"cuda": 0}, _GRADS))
registry.register(OP, registry.Backend("cuda", _cuda_forward, _cuda_backward, _cuda_unavailable,
                                       {"cuda": 1}, _GRADS))


# ----------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("dive::slot_attention", mutates_args=())
def _slot_attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
                       eps: float, backend: str) -> tuple[Tensor, Tensor]:
    mask_rows_nonempty("key_mask", key_mask, "row", "real token")
    out, r = registry.get(OP, backend).forward(q, k, v, key_mask, scale, eps)
    return out.to(q.dtype).contiguous(), r.float().contiguous()


@_slot_attention_op.register_fake
def _(q, k, v, key_mask, scale, eps, backend):
    b, h, slots, _ = q.shape
    return (q.new_empty((b, h, slots, v.shape[3])),
            q.new_empty((b, h, slots), dtype=torch.float32))


@torch.library.custom_op("dive::slot_attention_backward", mutates_args=())
def _slot_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                r: Tensor, key_mask: Optional[Tensor], scale: float, eps: float,
                                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grads = registry.get(OP, backend).backward(grad, q, k, v, out, r, key_mask, scale, eps)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


@_slot_attention_backward_op.register_fake
def _(grad, q, k, v, out, r, key_mask, scale, eps, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, scale, eps, backend = inputs
    out, r = output
    ctx.mark_non_differentiable(r)
    ctx.save_for_backward(q, k, v, out, r, key_mask)
    ctx.args = (scale, eps, backend)


def _backward(ctx, grad, _grad_r):
    q, k, v, out, r, key_mask = ctx.saved_tensors
    scale, eps, backend = ctx.args
    dq, dk, dv = _slot_attention_backward_op(grad, q, k, v, out, r, key_mask, scale, eps, backend)
    return dq, dk, dv, None, None, None, None


_slot_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry point


def slot_attention(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, eps: float = 1e-7,
                   backend: str = "auto") -> Tensor:
    """DivE slot cross-attention: slots compete for tokens, then average the tokens they won.

    Args:
        q: (B, H, K, d) slot queries, float32/float16/bfloat16 (float64 runs the reference).
        k: (B, H, N, d) token keys; v: (B, H, N, dv) token values; same dtype and device as q.
        key_mask: optional bool (B, N), True marks a real token; every row needs at least one.
            Masked tokens get weight exactly 0 and a gradient of exactly 0, whatever they hold.
        scale: multiplies q.k (default d ** -0.5); a Python float within float32's range.
        eps: added to each slot's total weight before it divides (1e-7 in the paper).
        backend: "auto", "cpu", "triton", "cuda" or "torch" (the reference).

    Returns:
        (B, H, K, dv) in q's dtype, differentiable w.r.t. q, k and v.
    """
    try:
        scale, eps = check_inputs(q, k, v, key_mask, scale, eps)
        wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                  or v.requires_grad)
        chosen = registry.resolve(OP, backend, q.device,
                                  dispatch.measured(OP, q.device, q.dtype, wants_grad))
    except ValueError as error:
        return refuse(error, q, k, v)
    slots, d, dv = q.shape[2], q.shape[3], v.shape[3]
    if q.shape[0] * q.shape[1] == 0:
        # Keeps the (empty) result attached to the graph so .backward() still works.
        return (q.sum(3, keepdim=True) * 0 + v.sum((2, 3))[..., None, None] * 0).expand(
            *q.shape[:3], dv)
    too_big = chosen.name != "cpu" and max(d, dv) > MAX_FUSED_DIM
    if (chosen.name == "torch" or q.dtype == torch.float64 or slots > MAX_FUSED_SLOTS
            or too_big):
        return slot_attention_ref(q, k, v, key_mask=key_mask, scale=scale, eps=eps)
    return _slot_attention_op(q, k, v, key_mask, scale, eps, chosen.name)[0]
