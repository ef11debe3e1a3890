"""Smooth-Chamfer set similarity: reference, checks, backends, autograd, dispatch.

S(a, b) = 1/(den*T) * [ mean_i LSE_j(T c_ij) + mean_j LSE_i(T c_ij) ],  c_ij = <x_a,i, y_b,j>
(with masks and the gradient: docs/design.md §2.1-2.2).
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _native
from ..checks import (bool_mask, checked_mask, float32_number, float_tensor, mask_rows_nonempty,
                      refuse)
from . import dispatch, registry
from ._native_args import DTYPE_CODE, needs, ptr, triton_unavailable, u8

OP = "smooth_chamfer"
MAX_FUSED_SET_SIZE = 32
# Bytes of the fp32 cosine block the CPU path (GEMM + native epilogue) works in.
CPU_BLOCK_BYTES = 8 << 20
REF_CHUNK_BYTES = 64 << 20
# Bytes of each bounded buffer of the GPU backward (gradient weights, GEMM operands, results).
W_BLOCK_BYTES = 32 << 20


# ----------------------------------------------------------------------------- reference (spec)


def smooth_chamfer_ref(x: Tensor, y: Tensor, *, temperature: float = 16.0,
                       denominator: float = 2.0, x_mask: Optional[Tensor] = None,
                       y_mask: Optional[Tensor] = None) -> Tensor:
    """The executable spec: plain PyTorch, max-shifted LSE, chunked over x so memory stays bounded.

    Computes in float64 for float64 inputs and in float32 otherwise; differentiable by autograd.
    Masked elements never reach a product (whatever they hold, their gradient is exactly 0); a
    non-finite cosine between real elements makes its pair NaN.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    nx, m, _ = x.shape
    ny, n, _ = y.shape
    xm = torch.ones(nx, m, dtype=torch.bool, device=x.device) if x_mask is None else x_mask
    ym = torch.ones(ny, n, dtype=torch.bool, device=y.device) if y_mask is None else y_mask
    xf = x.to(cdt).masked_fill(~xm[..., None], 0.0)
    yf = y.to(cdt).masked_fill(~ym[..., None], 0.0)
    per_x = max(1, ny * m * n * xf.element_size() * 4)
    chunk = max(1, REF_CHUNK_BYTES // per_x)
    t = float(temperature)
    parts = []
    for a0 in range(0, nx, chunk):
        xc, xmc = xf[a0:a0 + chunk], xm[a0:a0 + chunk]
        logits = t * torch.einsum("amd,bnd->abmn", xc, yf)
        valid = xmc[:, None, :, None] & ym[None, :, None, :]
        # logsumexp maps +inf to +inf and an all -inf row to -inf: plausible-looking scores
        # from broken embeddings. The spec is NaN (the gradient through logsumexp is NaN there).
        broken = (valid & ~torch.isfinite(logits)).any(3).any(2)
        logits = logits.masked_fill(~valid, float("-inf"))
        rows = torch.logsumexp(logits, dim=3).masked_fill(~xmc[:, None, :], 0.0)
        cols = torch.logsumexp(logits, dim=2).masked_fill(~ym[None, :, :], 0.0)
        row_mean = rows.sum(2) / xmc.sum(1, keepdim=True)
        col_mean = cols.sum(2) / ym.sum(1)[None, :]
        score = (row_mean + col_mean) / (denominator * t)
        parts.append(score + torch.where(broken, float("nan"), 0.0).to(cdt))
    if not parts:
        return xf.new_zeros(0, ny)
    return torch.cat(parts)


# ----------------------------------------------------------------------------- argument checks


def _check_set(name: str, t) -> None:
    float_tensor(name, t, "(N, set_size, D)")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{name} must have set_size >= 1 and D >= 1, got shape {tuple(t.shape)}")


def check_inputs(x, y, x_mask, y_mask, temperature, denominator):
    """Shape/dtype/device checks that need no data; returns (temperature, denominator)."""
    _check_set("x", x)
    _check_set("y", y)
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must have the same embedding size D, got {x.shape[2]} and "
                         f"{y.shape[2]}")
    bool_mask("x_mask", x_mask, x.shape[:2], x.device, "(NX, set_size)")
    bool_mask("y_mask", y_mask, y.shape[:2], y.device, "(NY, set_size)")
    t = float32_number("temperature", temperature, positive=True)
    den = float32_number("denominator", denominator, positive=True)
    # The kernels scale by T log2(e) and by 1 / (den T) in float32.
    float32_number("temperature * denominator", t * den)
    float32_number("temperature * log2(e)", t * 1.4426950408889634)
    return t, den


def check_masks_nonempty(x_mask, y_mask) -> None:
    """A set whose mask has no valid element is an error, not a NaN (needs the data)."""
    mask_rows_nonempty("x_mask", x_mask)
    mask_rows_nonempty("y_mask", y_mask)


# ----------------------------------------------------------------------------- blocked backends
# GEMM through torch into a bounded fp32 buffer, then a native epilogue per block: never the
# whole (NX*m x NY*n) grid. fp16/bf16 blocks are upcast so the cosines keep fp32 precision.


def _block_sets(nx, ny, m, n, budget):
    """(x sets, y sets) per block so that the fp32 cosine block fits in `budget` bytes."""
    cells = max(1, budget // 4)
    by = max(1, min(ny, 2048 // n))
    bx = max(1, min(nx, cells // (by * n * m)))
    return bx, by


def _zero_masked(rows, mask):
    """rows (sets*size, D) with the masked elements' rows zeroed (they may hold NaN or inf)."""
    return rows if mask is None else torch.where(mask.reshape(-1, 1), rows, 0)


def _zero_masked_grads(dx, dy, x_mask, y_mask):
    # A NaN or inf in a real element reaches the masked rows through the GEMMs (0 * NaN):
    # masked elements' gradients are exactly zero by definition.
    if x_mask is not None:
        dx.masked_fill_(~x_mask[:, :, None], 0.0)
    if y_mask is not None:
        dy.masked_fill_(~y_mask[:, :, None], 0.0)
    return dx, dy


def _blocks(x, y, x_mask, y_mask, budget):
    """Yields (x rows, y rows, x0, x1, y0, y1, xm_ptr, ym_ptr) per block, fp32, contiguous and
    0 on masked rows."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    x2, y2 = x.reshape(nx * m, d), y.reshape(ny * n, d)
    xm, ym = u8(x_mask), u8(y_mask)
    bx, by = _block_sets(nx, ny, m, n, budget)
    for y0 in range(0, ny, by):
        y1 = min(ny, y0 + by)
        yb = _zero_masked(y2[y0 * n:y1 * n].float(), None if y_mask is None else y_mask[y0:y1])
        for x0 in range(0, nx, bx):
            x1 = min(nx, x0 + bx)
            xb = _zero_masked(x2[x0 * m:x1 * m].float(),
                              None if x_mask is None else x_mask[x0:x1])
            yield (xb, yb, x0, x1, y0, y1, ptr(None if xm is None else xm[x0:x1]),
                   ptr(None if ym is None else ym[y0:y1]))


def _cpu_forward(x, y, x_mask, y_mask, t, den):
    epilogue, budget = _native.cpu_module(), CPU_BLOCK_BYTES
    nx, m, _ = x.shape
    ny, n, _ = y.shape
    out = torch.empty(nx, ny, dtype=torch.float32, device=x.device)
    bx, by = _block_sets(nx, ny, m, n, budget)
    buf = torch.empty(bx * m * by * n, dtype=torch.float32, device=x.device)
    for xb, yb, x0, x1, y0, y1, xm, ym in _blocks(x, y, x_mask, y_mask, budget):
        c = buf[:xb.shape[0] * yb.shape[0]].view(xb.shape[0], yb.shape[0])
        torch.mm(xb, yb.t(), out=c)
        epilogue.smooth_chamfer_forward_block(c.data_ptr(), c.stride(0), x1 - x0, y1 - y0, m, n,
                                              xm, ym, t, den, out[x0:x1, y0:y1].data_ptr(), ny)
    return out


def _cpu_backward(grad, x, y, x_mask, y_mask, t, den):
    epilogue, budget = _native.cpu_module(), CPU_BLOCK_BYTES
    nx, m, d = x.shape
    ny, n, _ = y.shape
    g = grad.float().contiguous()
    dx = torch.zeros(nx * m, d, dtype=torch.float32, device=x.device)
    dy = torch.zeros(ny * n, d, dtype=torch.float32, device=x.device)
    bx, by = _block_sets(nx, ny, m, n, budget)
    buf = torch.empty(bx * m * by * n, dtype=torch.float32, device=x.device)
    for xb, yb, x0, x1, y0, y1, xm, ym in _blocks(x, y, x_mask, y_mask, budget):
        w = buf[:xb.shape[0] * yb.shape[0]].view(xb.shape[0], yb.shape[0])
        torch.mm(xb, yb.t(), out=w)
        epilogue.smooth_chamfer_backward_block(w.data_ptr(), w.stride(0), x1 - x0, y1 - y0, m, n,
                                               xm, ym, t, den, g[x0:x1, y0:y1].data_ptr(), ny)
        dx[x0 * m:x1 * m].addmm_(w, yb)
        dy[y0 * n:y1 * n].addmm_(w.t(), xb)
    dx, dy = _zero_masked_grads(dx.view(nx, m, d), dy.view(ny, n, d), x_mask, y_mask)
    return dx.to(x.dtype), dy.to(y.dtype)


# ----------------------------------------------------------------------------- GPU backward
# A fused kernel writes the gradient weights W = g (P/m + Q/n) / den of a block of set pairs;
# dx = W Y and dy = W^T X are then two library GEMMs (cuBLAS on tensor cores): every output
# row has one owner, so nothing is added atomically and the result is deterministic.


def _weight_blocks(nx, ny, m, n, d, budget):
    """(x sets, y sets) per block: W (bx*m, by*n) and each block's (rows, D) and (cols, D)
    GEMM operands and results stay within `budget` bytes at 4 bytes an entry."""
    cells = max(1, budget // 4)
    rows_cap = max(1, cells // d)
    by = max(1, min(ny, rows_cap // n, cells // (n * m * min(max(nx, 1), 64))))
    bx = max(1, min(nx, rows_cap // m, cells // (by * n * m)))
    return bx, by


def _backward_by_weights(grad, x, y, x_mask, y_mask, t, den, weights):
    """(dx, dy) float32 from `weights(g, x, y, x_mask, y_mask, w_hi, w_lo, t, den)`, which fills
    W of the given sets: float32 for float32 inputs, else W = w_hi + w_lo in the input dtype.
    Extra memory is bounded by W_BLOCK_BYTES per buffer whatever NX and NY are."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    split = x.dtype != torch.float32
    g = grad.float().contiguous()  # autograd may hand an expanded (stride 0) gradient
    gscale = None
    if split:
        # W <= |g| / den per cell: dividing g by its largest magnitude keeps 16-bit W (and the
        # GEMMs' 16-bit results) clear of overflow and of fp16 underflow whatever g's scale.
        # A 0-d tensor throughout, so no device synchronisation.
        gmax = g.abs().amax()
        gscale = torch.where((gmax > 0) & torch.isfinite(gmax), gmax, torch.ones_like(gmax))
        g = g / gscale
    dx = torch.zeros(nx * m, d, dtype=torch.float32, device=x.device)
    dy = torch.zeros(ny * n, d, dtype=torch.float32, device=x.device)
    bx, by = _weight_blocks(nx, ny, m, n, d, W_BLOCK_BYTES)
    buf = torch.empty(2 if split else 1, bx * m * by * n, dtype=x.dtype, device=x.device)
    for x0 in range(0, nx, bx):
        x1 = min(nx, x0 + bx)
        xm = None if x_mask is None else x_mask[x0:x1]
        xb = _zero_masked(x[x0:x1].reshape(-1, d), xm)
        for y0 in range(0, ny, by):
            y1 = min(ny, y0 + by)
            ym = None if y_mask is None else y_mask[y0:y1]
            yb = _zero_masked(y[y0:y1].reshape(-1, d), ym)
            rows, cols = xb.shape[0], yb.shape[0]
            w = buf[:, :rows * cols].view(-1, rows, cols)
            weights(g[x0:x1, y0:y1], x[x0:x1], y[y0:y1], xm, ym, w[0], w[1] if split else None,
                    t, den)
            if split:
                # Each 16-bit GEMM accumulates in fp32 and rounds once; the sums are fp32.
                dx[x0 * m:x1 * m] += torch.mm(w[0], yb).float()
                dx[x0 * m:x1 * m] += torch.mm(w[1], yb).float()
                dy[y0 * n:y1 * n] += torch.mm(w[0].t(), xb).float()
                dy[y0 * n:y1 * n] += torch.mm(w[1].t(), xb).float()
            else:
                dx[x0 * m:x1 * m].addmm_(w[0], yb)
                dy[y0 * n:y1 * n].addmm_(w[0].t(), xb)
    dx, dy = dx.view(nx, m, d), dy.view(ny, n, d)
    if gscale is not None:
        dx.mul_(gscale)
        dy.mul_(gscale)
    return _zero_masked_grads(dx, dy, x_mask, y_mask)


def _cuda_forward(x, y, x_mask, y_mask, t, den):
    x, y = x.contiguous(), y.contiguous()
    (nx, m, d), (ny, n, _) = x.shape, y.shape
    xm, ym = u8(x_mask), u8(y_mask)  # locals: any copies stay alive through the launch
    out = torch.empty(nx, ny, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _native.cuda_module().smooth_chamfer_forward_fused(
            x.data_ptr(), y.data_ptr(), DTYPE_CODE[x.dtype], nx, ny, m, n, d, ptr(xm),
            ptr(ym), t, den, out.data_ptr(), ny, torch.cuda.current_stream(x.device).cuda_stream,
            x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    return out


def _cuda_weights(g, x, y, x_mask, y_mask, w_hi, w_lo, t, den):
    (nx, m, d), (ny, n, _) = x.shape, y.shape
    xm, ym = u8(x_mask), u8(y_mask)
    with torch.cuda.device(x.device):
        _native.cuda_module().smooth_chamfer_backward_weights(
            x.data_ptr(), y.data_ptr(), DTYPE_CODE[x.dtype], nx, ny, m, n, d, ptr(xm),
            ptr(ym), t, den, g.data_ptr(), g.stride(0), w_hi.data_ptr(), ptr(w_lo),
            w_hi.stride(0), torch.cuda.current_stream(x.device).cuda_stream)


def _cuda_backward(grad, x, y, x_mask, y_mask, t, den):
    return _backward_by_weights(grad, x.contiguous(), y.contiguous(), x_mask, y_mask, t, den,
                                _cuda_weights)


def _triton_forward(x, y, x_mask, y_mask, t, den):
    from ..kernels import smooth_chamfer as kernels  # imports triton: only when used
    return kernels.forward(x, y, x_mask, y_mask, t, den)


def _triton_backward(grad, x, y, x_mask, y_mask, t, den):
    from ..kernels import smooth_chamfer as kernels
    return _backward_by_weights(grad, x, y, x_mask, y_mask, t, den, kernels.weights)


def _torch_forward(x, y, x_mask, y_mask, t, den):
    return smooth_chamfer_ref(x, y, temperature=t, denominator=den, x_mask=x_mask, y_mask=y_mask)


def _torch_backward(grad, x, y, x_mask, y_mask, t, den):
    with torch.enable_grad():
        xr, yr = x.detach().requires_grad_(), y.detach().requires_grad_()
        out = _torch_forward(xr, yr, x_mask, y_mask, t, den)
        return torch.autograd.grad(out, (xr, yr), grad.to(out.dtype))


_FP32_GRADS = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
registry.register(OP, registry.Backend("torch", _torch_forward, _torch_backward, lambda d: None,
                                       {"cpu": 1, "cuda": 2}, _FP32_GRADS))
registry.register(OP, registry.Backend("cpu", _cpu_forward, _cpu_backward, needs("_C", "cpu"),
                                       {"cpu": 0}, _FP32_GRADS))
registry.register(OP, registry.Backend("triton", _triton_forward, _triton_backward,
                                       triton_unavailable, {"cuda": 0}, _FP32_GRADS))
registry.register(OP, registry.Backend("cuda", _cuda_forward, _cuda_backward,
                                       needs("_C_cuda", "cuda"), {"cuda": 1}, _FP32_GRADS))


# ----------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("dive::smooth_chamfer", mutates_args=())
def _smooth_chamfer_op(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor],
                       temperature: float, denominator: float, backend: str) -> Tensor:
    check_masks_nonempty(x_mask, y_mask)
    return registry.get(OP, backend).forward(x, y, x_mask, y_mask, temperature, denominator)


@_smooth_chamfer_op.register_fake
def _(x, y, x_mask, y_mask, temperature, denominator, backend):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dive::smooth_chamfer_backward", mutates_args=())
def _smooth_chamfer_backward_op(grad: Tensor, x: Tensor, y: Tensor, x_mask: Optional[Tensor],
                                y_mask: Optional[Tensor], temperature: float, denominator: float,
                                backend: str) -> tuple[Tensor, Tensor]:
    dx, dy = registry.get(OP, backend).backward(grad, x, y, x_mask, y_mask, temperature,
                                                denominator)
    return dx.to(x.dtype).contiguous(), dy.to(y.dtype).contiguous()


@_smooth_chamfer_backward_op.register_fake
def _(grad, x, y, x_mask, y_mask, temperature, denominator, backend):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(y.shape, dtype=y.dtype, device=y.device))


def _setup_context(ctx, inputs, output):
    x, y, x_mask, y_mask, temperature, denominator, backend = inputs
    ctx.save_for_backward(x, y, x_mask, y_mask)
    ctx.args = (temperature, denominator, backend)


def _backward(ctx, grad):
    x, y, x_mask, y_mask = ctx.saved_tensors
    dx, dy = _smooth_chamfer_backward_op(grad, x, y, x_mask, y_mask, *ctx.args)
    return dx, dy, None, None, None, None, None


_smooth_chamfer_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry point


def smooth_chamfer(x: Tensor, y: Tensor, *, temperature: float = 16.0, denominator: float = 2.0,
                   x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None,
                   backend: str = "auto") -> Tensor:
    """Smooth-Chamfer similarity of every set in x against every set in y.

    Args:
        x: (NX, m, D) sets, float32/float16/bfloat16 (float64 runs the reference), any strides.
        y: (NY, n, D) sets, same dtype and device as x.
        temperature: T > 0 (16 in the DivE paper), a Python float (or a one-element tensor
            outside torch.compile) within float32's range, as is denominator * T.
        denominator: the paper's `denominator` (2 averages the two directions).
        x_mask, y_mask: optional bool (NX, m) / (NY, n); True marks a real element. Every set
            needs at least one.
        backend: "auto", "cpu", "triton", "cuda" or "torch" (the reference).

    Returns:
        (NX, NY) float32 (float64 for float64 inputs), differentiable w.r.t. x and y. A NaN or
        inf in a real element makes every pair it touches NaN; masked elements may hold
        anything (NaN, inf, stale memory) and get a gradient of exactly 0.

    Precision: cosines are summed in fp32. For float32 CUDA tensors with
    `torch.backends.cuda.matmul.allow_tf32` on, the triton forward and the cuda forward (rows
    16-byte aligned) round the inputs to TF32 (10 mantissa bits) for the tensor cores, so S may
    differ from exact fp32 by up to 2**-10 * max|x_i| * max|y_j| (1e-3 for unit vectors);
    with it off, float32 cosines are exact fp32.
    """
    try:
        temperature, denominator = check_inputs(x, y, x_mask, y_mask, temperature, denominator)
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        chosen = registry.resolve(OP, backend, x.device,
                                  dispatch.measured(OP, x.device, x.dtype, wants_grad))
    except ValueError as error:
        return refuse(error, x, y)
    nx, m, _ = x.shape
    ny, n, _ = y.shape
    if nx == 0 or ny == 0:
        # Keeps the (empty) result attached to the graph so .backward() still works.
        zero = x.float().sum((1, 2))[:, None] * 0 + y.float().sum((1, 2))[None, :] * 0
        return zero.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    exact_only = x.dtype == torch.float64 or max(m, n) > MAX_FUSED_SET_SIZE
    if chosen.name == "torch" or exact_only:
        return smooth_chamfer_ref(x, y, temperature=temperature, denominator=denominator,
                                  x_mask=checked_mask("x_mask", x_mask),
                                  y_mask=checked_mask("y_mask", y_mask))
    return _smooth_chamfer_op(x, y, x_mask, y_mask, temperature, denominator, chosen.name)
