"""Fused DivE slot cross-attention (docs/design.md §2.3-2.4) in Triton: forward and backward.

One program owns one (b, h) (the forward: one dv-chunk of it) and all of its K slots, padded
to KP >= 16 rows for `tl.dot` (padded rows are -inf in the slot softmax and never stored); the
N tokens stream through in tiles of BN. The slot softmax is per token, so each token tile is
complete on its own: the forward keeps only the unnormalised sum_n A_in v_n and r_i and divides
at the end, and nothing of size (B, H, K, N) reaches memory. d and dv are streamed in chunks of
BD / BDV so register use does not grow with them. The backward writes ds to an fp32 (B, H, K, N)
scratch so that dq can be summed over all tokens without atomics or keeping (KP, d) live.

Everything runs in log2 units: u = scale * log2(e) * q.k, so each score costs one exp2.
"""
import math

import torch
import triton
import triton.language as tl

from dive.kernels.launch import (TL_DTYPE, aot_signature, device_guard, dot,
                                 interpreter_upcast, next_pow2, precision)

# Tiles per (kernel, dot kind). BN = tokens per tile, BD = d-chunk of the score dots, BDV =
# dv-chunk. The forward accumulates a (KP, BDV) output block across the token loop, so when dv
# exceeds BDV it runs cdiv(dv, BDV) programs per (b, h), each recomputing the scores (their k
# reads should mostly hit L2). fp32 "ieee" dots run on FMA units, which hold a row of
# A and a column of B per thread across the whole K step, hence their smaller tiles. The 16-bit
# backward is not software-pipelined: two stages cost it 60-90 registers (255 at K=32) for
# d-loops of a few steps. Sized so nothing spills on sm_80/86/90 for K up to 32 with Triton 3.6
# and 3.8 (tests/test_triton_compile.py checks them).
TILES = {
    ("forward", "16bit"): dict(BN=32, BD=32, BDV=128, num_warps=4, num_stages=2),
    ("forward", "tf32"): dict(BN=32, BD=32, BDV=128, num_warps=4, num_stages=2),
    ("forward", "ieee"): dict(BN=16, BD=16, BDV=64, num_warps=4, num_stages=2),
    ("backward", "16bit"): dict(BN=32, BD=64, BDV=64, num_warps=4, num_stages=1),
    ("backward", "tf32"): dict(BN=32, BD=32, BDV=32, num_warps=4, num_stages=2),
    ("backward", "ieee"): dict(BN=16, BD=16, BDV=16, num_warps=4, num_stages=2),
}
# Every tile table this module ships, by name. Launches read TILES at call time; the GPU
# check times each table on the card by putting it in TILES' place (benchmarks/conftest.py).
SHIPPED_TILES = {"default": TILES}
# Lets ptxas use the whole register file rather than squeeze into fewer and spill.
_MAXNREG = 255


def config(kernel, dtype, K, d, dv, input_precision):
    """(constexprs, launch options) of `kernel` ("forward" or "backward") for K slots, d, dv."""
    kind = input_precision if dtype == torch.float32 else "16bit"
    tile = dict(TILES[(kernel, kind)])
    # tl.dot needs every dimension >= 16; small d or dv only shrink the chunk down to that.
    consts = dict(KP=max(16, next_pow2(K)), BN=tile.pop("BN"),
                  BD=min(tile.pop("BD"), max(16, next_pow2(d))),
                  BDV=min(tile.pop("BDV"), max(16, next_pow2(dv))),
                  PRECISION=input_precision, UPCAST=False)
    return consts, dict(tile, maxnreg=_MAXNREG)


@triton.jit
def _tokens(n0, N, mask_row, HAS_MASK: tl.constexpr, BN: tl.constexpr):
    """Indices of one token tile, whether each is in range, and whether it is a real token."""
    tok = n0 + tl.arange(0, BN)
    in_range = tok < N
    real = in_range
    if HAS_MASK:
        real = real & (tl.load(mask_row + tok, mask=in_range, other=0) != 0)
    return tok, in_range, real


@triton.jit
def _slot_softmax(q_row, k_row, tok, real, slot, slot_ok, D, scale_log2,
                  KP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A (KP, BN) of one token tile: softmax over slots per token, exactly 0 off real tokens."""
    s = tl.zeros((KP, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        c = d0 + tl.arange(0, BD)
        c_ok = c < D
        qt = tl.load(q_row + slot[:, None] * D + c[None, :],
                     mask=slot_ok[:, None] & c_ok[None, :], other=0.0)
        # Masked (not just out-of-range) tokens load as 0: padding may hold anything.
        kt = tl.load(k_row + tok[None, :] * D + c[:, None],
                     mask=real[None, :] & c_ok[:, None], other=0.0)
        s = dot(qt, kt, s, PRECISION, UPCAST)
    u = tl.where(slot_ok[:, None], s * scale_log2, -float("inf"))
    p = tl.exp2(u - tl.max(u, 0)[None, :])
    a = p * (1.0 / tl.sum(p, 0))[None, :]
    return tl.where(real[None, :], a, 0.0)


@triton.jit
def _forward_kernel(
    Q, Kt, V, MASK, OUT, R,
    H, K, N, D, DV,
    scale_log2, eps,
    HAS_MASK: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # 1-D grid of (b, h) x dv-chunks: no 65535 limit on B * H.
    chunks = tl.cdiv(DV, BDV)
    pid = tl.program_id(0)
    bh = (pid // chunks).to(tl.int64)
    chunk = pid % chunks
    q_row = Q + bh * K * D
    k_row = Kt + bh * N * D
    v_row = V + bh * N * DV
    mask_row = MASK + (bh // H) * N
    slot = tl.arange(0, KP)
    slot_ok = slot < K
    e = chunk * BDV + tl.arange(0, BDV)
    e_ok = e < DV

    acc = tl.zeros((KP, BDV), dtype=tl.float32)
    r = tl.zeros((KP,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        tok, in_range, real = _tokens(n0, N, mask_row, HAS_MASK, BN)
        a = _slot_softmax(q_row, k_row, tok, real, slot, slot_ok, D, scale_log2,
                          KP, BN, BD, PRECISION, UPCAST)
        r += tl.sum(a, 1)
        vt = tl.load(v_row + tok[:, None] * DV + e[None, :],
                     mask=real[:, None] & e_ok[None, :], other=0.0)
        acc = dot(a.to(V.dtype.element_ty), vt, acc, PRECISION, UPCAST)
    r += eps
    out = acc * (1.0 / r)[:, None]
    tl.store(OUT + bh * K * DV + slot[:, None] * DV + e[None, :],
             out.to(OUT.dtype.element_ty), mask=slot_ok[:, None] & e_ok[None, :])
    tl.store(R + bh * K + slot, r, mask=slot_ok & (chunk == 0))


@triton.jit
def _ds_dot(w, b, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """w^T @ b for fp32 w = ds or ds^T.

    For 16-bit b, w is scaled into [-1, 1] (clear of fp16 overflow and subnormals) and split as
    hi + lo in b's dtype: ~16 (bf16) / 22 (fp16) bits instead of 8 / 11. ds sums to 0 over
    slots, so dk = sum_i ds_in q_i cancels; under the interpreter the largest bf16 dq and dk
    errors were 0.8-1.0% with one term and 0.4-0.6% with two, for two more small dots a tile.
    """
    w = tl.trans(w)
    if SPLIT:
        big = tl.max(tl.abs(w))
        big = tl.where(big > 0.0, big, 1.0)
        w = w * (1.0 / big)
        hi = w.to(b.dtype)
        prod = dot(hi, b, None, PRECISION, UPCAST)
        prod = dot((w - hi.to(tl.float32)).to(b.dtype), b, prod, PRECISION, UPCAST) * big
    else:
        prod = dot(w, b, None, PRECISION, UPCAST)
    return prod


@triton.jit
def _do_v(do_row, v_row, tok, real, slot, slot_ok, DV, KP: tl.constexpr, BN: tl.constexpr,
          BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """do_i.v_n (KP, BN) of one token tile, 0 off real tokens."""
    dp = tl.zeros((KP, BN), dtype=tl.float32)
    for e0 in range(0, DV, BDV):
        e = e0 + tl.arange(0, BDV)
        e_ok = e < DV
        g = tl.load(do_row + slot[:, None] * DV + e[None, :],
                    mask=slot_ok[:, None] & e_ok[None, :], other=0.0)
        vt = tl.load(v_row + tok[None, :] * DV + e[:, None],
                     mask=real[None, :] & e_ok[:, None], other=0.0)
        dp = dot(g, vt, dp, PRECISION, UPCAST)
    return dp


@triton.jit
def _backward_kernel(
    DO, Q, Kt, V, OUT, R, MASK, DQ, DK, DV_OUT, DS,
    H, K, N, D, DV,
    scale, scale_log2,
    HAS_MASK: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program per (b, h), so dq needs no atomics. Token tiles are independent given r and
    # do_i.out_i: each recomputes A, writes its dv and dk rows and its ds block (fp32, to DS);
    # a last pass over tokens forms dq = ds k one d-chunk at a time from the DS blocks this
    # program wrote (a CTA barrier orders those global writes before the reads).
    bh = tl.program_id(0).to(tl.int64)
    q_row = Q + bh * K * D
    k_row = Kt + bh * N * D
    v_row = V + bh * N * DV
    do_row = DO + bh * K * DV
    ds_row = DS + bh * K * N
    mask_row = MASK + (bh // H) * N
    slot = tl.arange(0, KP)
    slot_ok = slot < K
    SIXTEEN_BIT: tl.constexpr = Q.dtype.element_ty != tl.float32
    inv_r = 1.0 / tl.load(R + bh * K + slot, mask=slot_ok, other=1.0)

    # dA_in = (do_i.v_n - do_i.out_i) / r_i cancels where out_i is close to v_n (few tokens,
    # small r_i). A 16-bit out puts ~2^-9 |do_i| |out_i| into do_i.out_i (measured: 13% of the
    # largest dq in bf16 with a one-token set), so 16-bit inputs form do_i.out_i as
    # sum_n A_in / r_i * do_i.v_n from this kernel's own fp32 terms, at the cost of one more
    # pass over k and v. An fp32 out is exact enough to read.
    do_out = tl.zeros((KP,), dtype=tl.float32)
    if SIXTEEN_BIT:
        for n0 in range(0, N, BN):
            tok, in_range, real = _tokens(n0, N, mask_row, HAS_MASK, BN)
            a = _slot_softmax(q_row, k_row, tok, real, slot, slot_ok, D, scale_log2,
                              KP, BN, BD, PRECISION, UPCAST)
            dp = _do_v(do_row, v_row, tok, real, slot, slot_ok, DV,
                       KP, BN, BDV, PRECISION, UPCAST)
            do_out += tl.sum(a * dp, 1)
        do_out = do_out * inv_r
    else:
        for e0 in range(0, DV, BDV):
            e = e0 + tl.arange(0, BDV)
            ke = slot[:, None] * DV + e[None, :]
            ke_ok = slot_ok[:, None] & (e < DV)[None, :]
            do_out += tl.sum(tl.load(do_row + ke, mask=ke_ok, other=0.0)
                             * tl.load(OUT + bh * K * DV + ke, mask=ke_ok, other=0.0), 1)

    for n0 in range(0, N, BN):
        tok, in_range, real = _tokens(n0, N, mask_row, HAS_MASK, BN)
        a = _slot_softmax(q_row, k_row, tok, real, slot, slot_ok, D, scale_log2,
                          KP, BN, BD, PRECISION, UPCAST)
        dp = _do_v(do_row, v_row, tok, real, slot, slot_ok, DV, KP, BN, BDV, PRECISION, UPCAST)
        da = (dp - do_out[:, None]) * inv_r[:, None]
        # Zero wherever A is (padded slots, masked tokens), so those dk and dv rows are exact 0.
        # A select, not a product: da is NaN on every token when q or do holds a NaN.
        ds = tl.where(real[None, :] & slot_ok[:, None],
                      a * (da - tl.sum(a * da, 0)[None, :]) * scale, 0.0)
        tl.store(ds_row + slot[:, None] * N + tok[None, :], ds,
                 mask=slot_ok[:, None] & in_range[None, :])
        # A / r lies in [0, 1] and does not cancel by construction: one term in the input dtype.
        a_r = tl.trans((a * inv_r[:, None]).to(DO.dtype.element_ty))
        for e0 in range(0, DV, BDV):
            e = e0 + tl.arange(0, BDV)
            e_ok = e < DV
            g = tl.load(do_row + slot[:, None] * DV + e[None, :],
                        mask=slot_ok[:, None] & e_ok[None, :], other=0.0)
            dv = tl.where(real[:, None], dot(a_r, g, None, PRECISION, UPCAST), 0.0)
            tl.store(DV_OUT + bh * N * DV + tok[:, None] * DV + e[None, :],
                     dv.to(DV_OUT.dtype.element_ty), mask=in_range[:, None] & e_ok[None, :])
        for d0 in range(0, D, BD):
            c = d0 + tl.arange(0, BD)
            c_ok = c < D
            qt = tl.load(q_row + slot[:, None] * D + c[None, :],
                         mask=slot_ok[:, None] & c_ok[None, :], other=0.0)
            # 0 * an inf or NaN in q is NaN: masked rows are selected to 0.
            dk = tl.where(real[:, None], _ds_dot(ds, qt, SIXTEEN_BIT, PRECISION, UPCAST), 0.0)
            tl.store(DK + bh * N * D + tok[:, None] * D + c[None, :],
                     dk.to(DK.dtype.element_ty), mask=in_range[:, None] & c_ok[None, :])

    tl.debug_barrier()
    for d0 in range(0, D, BD):
        c = d0 + tl.arange(0, BD)
        c_ok = c < D
        dq = tl.zeros((KP, BD), dtype=tl.float32)
        for n0 in range(0, N, BN):
            tok, in_range, real = _tokens(n0, N, mask_row, HAS_MASK, BN)
            ds_t = tl.load(ds_row + slot[None, :] * N + tok[:, None],
                           mask=slot_ok[None, :] & in_range[:, None], other=0.0)
            kt = tl.load(k_row + tok[:, None] * D + c[None, :],
                         mask=real[:, None] & c_ok[None, :], other=0.0)
            dq += _ds_dot(ds_t, kt, SIXTEEN_BIT, PRECISION, UPCAST)
        tl.store(DQ + bh * K * D + slot[:, None] * D + c[None, :],
                 dq.to(DQ.dtype.element_ty), mask=slot_ok[:, None] & c_ok[None, :])


KERNELS = {"forward": _forward_kernel, "backward": _backward_kernel}


def aot_spec(kernel, dtype, K, d, dv, input_precision="ieee"):
    """(signature, constexprs, attrs, options) for `triton.compile(ASTSource(...))` of `kernel`.

    Mirrors what a launch specialises to on contiguous inputs with a key mask and d, dv
    multiples of 16 (the paper's 512; N = 36 or so is not): pointers, D and DV get divisibility 16.
    """
    fn = KERNELS[kernel]
    consts, opts = config(kernel, dtype, K, d, dv, input_precision)
    consts["HAS_MASK"] = True
    aligned = {"D", "DV"}
    dt = TL_DTYPE[dtype]
    pointers = {"Q": dt, "Kt": dt, "V": dt, "DO": dt, "OUT": dt, "DQ": dt, "DK": dt,
                "DV_OUT": dt, "MASK": "u8", "R": "fp32", "DS": "fp32"}
    floats = ("scale", "scale_log2", "eps")
    signature, attrs = aot_signature(fn, consts, pointers, floats, aligned)
    return signature, consts, attrs, opts


def _mask_args(key_mask, like):
    # bool -> uint8 is a free reinterpretation; no mask: a never-read dummy.
    if key_mask is None:
        return like, False
    return key_mask.view(torch.uint8), True


def _launch_config(kernel, q, d, dv):
    consts, opts = config(kernel, q.dtype, q.shape[2], d, dv, precision(q.dtype))
    consts["UPCAST"] = interpreter_upcast(q)
    return consts, opts


def forward(q, k, v, key_mask, scale: float, eps: float):
    """(out (B, H, K, dv) in q.dtype, r (B, H, K) float32 = sum_n A_in + eps)."""
    B, H, K, d = q.shape
    N, dv = k.shape[2], v.shape[3]
    consts, opts = _launch_config("forward", q, d, dv)
    out = torch.empty((B, H, K, dv), dtype=q.dtype, device=q.device)
    r = torch.empty((B, H, K), dtype=torch.float32, device=q.device)
    mask, has_mask = _mask_args(key_mask, q)
    grid = (B * H * triton.cdiv(dv, consts["BDV"]),)
    with device_guard(q):
        _forward_kernel[grid](q, k, v, mask, out, r, H, K, N, d, dv,
                              scale * math.log2(math.e), eps,
                              HAS_MASK=has_mask, **consts, **opts)
    return out, r


def backward(do, q, k, v, out, r, key_mask, scale: float, eps: float):
    """(dq, dk, dv) of sum(do * out) in the inputs' dtypes; `eps` is already part of r."""
    B, H, K, d = q.shape
    N, dv = k.shape[2], v.shape[3]
    consts, opts = _launch_config("backward", q, d, dv)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv_ = torch.empty_like(v)
    ds = torch.empty((B, H, K, N), dtype=torch.float32, device=q.device)
    mask, has_mask = _mask_args(key_mask, q)
    with device_guard(q):
        _backward_kernel[(B * H,)](do, q, k, v, out, r, mask, dq, dk, dv_, ds,
                                   H, K, N, d, dv, scale, scale * math.log2(math.e),
                                   HAS_MASK=has_mask, **consts, **opts)
    return dq, dk, dv_
