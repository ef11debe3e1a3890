"""Fused smooth-Chamfer similarity (docs/design.md §2.1-2.2) in Triton: forward and backward.

Both kernels work on one tile of (BM x-sets) x (BN y-sets). The x tile is loaded as BM*MP rows
(row r is element r % MP of set r // MP, MP = next power of two >= m, padding rows masked), the y
tile likewise as BN*NP rows, and one `tl.dot` loop over D gives every cosine of the tile in
fp32. Each m x n block of that accumulator belongs to exactly one (x set, y set) pair, so the
log-sum-exps are finished in registers and the (NX*m x NY*n) grid never reaches memory.

Everything runs in log2 units: u = T * log2(e) * c, so each cosine costs one exp2.

The backward kernel only writes the gradient weights W of a bounded block of set pairs;
dive.ops.smooth_chamfer turns them into dx = W Y and dy = W^T X with two library GEMMs.
"""
import math

import torch
import triton
import triton.language as tl

from dive.kernels.launch import (TL_DTYPE, aot_signature, device_guard, dot,
                                 interpreter_upcast, next_pow2, precision)

# A block's row or column sum under the shared max below this means T * (max - min) is too wide
# for one shift in fp32; the tile is then redone with one max per row and per column. 2^-100
# keeps the largest term of such a sum a normal float, so nothing is lost above it.
_TINY = tl.constexpr(2.0**-100)

# Tiles per (kernel, dot kind): ROWS x COLS cosines per program (x rows = BM * MP, y rows =
# BN * NP), BK = D-step of the cosine loop (either kernel's only loop). Sized so nothing
# spills on sm_80/86/90 for any set size (tests/test_triton_compile.py checks them). fp32 "ieee"
# dots run on FMA units, whose operand layout keeps a row of A and a column of B per thread
# across the whole K step, hence their smaller tiles and K steps.
TILES = {
    ("forward", "16bit"): dict(ROWS=64, COLS=128, BK=64, num_warps=8, num_stages=3),
    ("forward", "tf32"): dict(ROWS=64, COLS=128, BK=32, num_warps=8, num_stages=3),
    ("forward", "ieee"): dict(ROWS=64, COLS=64, BK=16, num_warps=8, num_stages=3),
    ("backward", "16bit"): dict(ROWS=64, COLS=64, BK=64, num_warps=8, num_stages=3),
    ("backward", "tf32"): dict(ROWS=64, COLS=64, BK=32, num_warps=8, num_stages=3),
    ("backward", "ieee"): dict(ROWS=64, COLS=64, BK=16, num_warps=8, num_stages=3),
}
# Every tile table this module ships, by name. Launches read TILES at call time; the GPU
# check times each table on the card by putting it in TILES' place (benchmarks/conftest.py).
SHIPPED_TILES = {"default": TILES}
# Lets ptxas use the whole register file: left to its occupancy heuristics it squeezes some of
# these kernels into 128 (or 64/80) registers and spills a few bytes.
_MAXNREG = 255
# x blocks that share a band of y blocks in launch order, so their y tiles are reused from L2.
_GROUP = 8


def config(kernel, dtype, m, n, input_precision):
    """(constexprs, launch options) of `kernel` ("forward" or "backward") for sets of m and n."""
    kind = input_precision if dtype == torch.float32 else "16bit"
    tile = dict(TILES[(kernel, kind)])
    mp, np_ = next_pow2(m), next_pow2(n)
    consts = dict(MP=mp, NP=np_, BM=tile.pop("ROWS") // mp, BN=tile.pop("COLS") // np_,
                  BK=tile.pop("BK"), GROUP=_GROUP, PRECISION=input_precision, UPCAST=False)
    return consts, dict(tile, maxnreg=_MAXNREG)


@triton.jit
def _tile_ids(NX, NY, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    # 1-D grid (no 65535 limit on the y count), grouped so neighbours share y tiles.
    pid = tl.program_id(0)
    tiles_x = tl.cdiv(NX, BM)
    per_group = GROUP * tl.cdiv(NY, BN)
    first_x = (pid // per_group) * GROUP
    group_size = tl.minimum(tiles_x - first_x, GROUP)
    return first_x + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _set_rows(block, NSETS, SIZE, MASK, stride_ma, stride_mi, HAS_MASK: tl.constexpr,
              B: tl.constexpr, P: tl.constexpr):
    """Set index, element index and validity of the B*P rows of one tile side."""
    r = tl.arange(0, B * P)
    sets = (block * B + r // P).to(tl.int64)
    elem = (r % P).to(tl.int64)
    valid = (sets < NSETS) & (elem < SIZE)
    if HAS_MASK:
        keep = tl.load(MASK + sets * stride_ma + elem * stride_mi, mask=valid, other=0)
        valid = valid & (keep != 0)
    return sets, elem, valid


@triton.jit
def _cosine_tile(X, Y, x_off, x_ok, y_off, y_ok, D, stride_xd, stride_yd,
                 ROWS: tl.constexpr, COLS: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < D
        k64 = k.to(tl.int64)
        # Masked (not just out-of-range) elements load as 0: padding may hold anything.
        xt = tl.load(X + x_off[:, None] + k64[None, :] * stride_xd,
                     mask=x_ok[:, None] & k_ok[None, :], other=0.0)
        yt = tl.load(Y + y_off[None, :] + k64[:, None] * stride_yd,
                     mask=y_ok[None, :] & k_ok[:, None], other=0.0)
        acc = dot(xt, yt, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _log2_cosines(acc, x_ok2, y_ok2, scale,
                  BM: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr):
    """The tile as (x set, x element, y set, y element) in log2 units, -inf where masked."""
    valid = x_ok2[:, :, None, None] & y_ok2[None, None, :, :]
    return tl.where(valid, tl.reshape(acc, (BM, MP, BN, NP)) * scale, -float("inf"))


@triton.jit
def _shared_max_exp(u, row_ok, col_ok):
    """exp2(u - block max) and its valid row (BM, MP, BN) and column (BM, BN, NP) sums.

    One max per (x set, y set) block, so each cosine costs one exp2 for both directions. Sums
    of invalid rows/columns are 1 (no log of 0); `exact` is False when a valid sum is so small
    (T * spread too wide for one fp32 shift) that the tile must use per-row/column maxima.
    """
    block_max = tl.max(tl.max(u, 3), 1)
    block_max = tl.where(block_max == -float("inf"), 0.0, block_max)  # sets past NX or NY
    e = tl.exp2(u - block_max[:, None, :, None])
    row_sum = tl.where(row_ok, tl.sum(e, 3), 1.0)
    col_sum = tl.where(col_ok, tl.sum(e, 1), 1.0)
    exact = tl.minimum(tl.min(row_sum), tl.min(col_sum)) >= _TINY
    return block_max, e, row_sum, col_sum, exact


@triton.jit
def _per_max_sums(u, row_ok, col_ok):
    """Shift and sum per row and per column: softmax = exp2(u - shift) / sum, never underflows."""
    row_shift = tl.where(row_ok, tl.max(u, 3), 0.0)
    col_shift = tl.where(col_ok, tl.max(u, 1), 0.0)
    row_sum = tl.where(row_ok, tl.sum(tl.exp2(u - row_shift[:, :, :, None]), 3), 1.0)
    col_sum = tl.where(col_ok, tl.sum(tl.exp2(u - col_shift[:, None, :, :]), 1), 1.0)
    return row_shift, row_sum, col_shift, col_sum


@triton.jit
def _tile(NX, NY, M, N, XM, YM, stride_xma, stride_xmi, stride_yma, stride_ymj,
          HAS_XM: tl.constexpr, HAS_YM: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """This program's tile, as both kernels see it: set index, element index and validity of
    its BM*MP x rows and BN*NP y rows, its set indices sx and sy, the per-set validity (BM, MP)
    and (BN, NP), and which (x row, y set) and (x set, y row) pairs are real."""
    pid_x, pid_y = _tile_ids(NX, NY, BM, BN, GROUP)
    xs, xi, x_ok = _set_rows(pid_x, NX, M, XM, stride_xma, stride_xmi, HAS_XM, BM, MP)
    ys, yj, y_ok = _set_rows(pid_y, NY, N, YM, stride_yma, stride_ymj, HAS_YM, BN, NP)
    sx = pid_x * BM + tl.arange(0, BM)
    sy = pid_y * BN + tl.arange(0, BN)
    x_ok2 = tl.reshape(x_ok, (BM, MP))
    y_ok2 = tl.reshape(y_ok, (BN, NP))
    row_ok = x_ok2[:, :, None] & (sy < NY)[None, None, :]
    col_ok = (sx < NX)[:, None, None] & y_ok2[None, :, :]
    return xs, xi, x_ok, ys, yj, y_ok, sx, sy, x_ok2, y_ok2, row_ok, col_ok


@triton.jit
def _forward_kernel(
    X, Y, XM, YM, S,
    NX, NY, M, N, D,
    stride_xa, stride_xi, stride_xd, stride_ya, stride_yj, stride_yd,
    stride_xma, stride_xmi, stride_yma, stride_ymj, stride_sa, stride_sb,
    scale, out_scale,
    HAS_XM: tl.constexpr, HAS_YM: tl.constexpr,
    MP: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    xs, xi, x_ok, ys, yj, y_ok, sx, sy, x_ok2, y_ok2, row_ok, col_ok = _tile(
        NX, NY, M, N, XM, YM, stride_xma, stride_xmi, stride_yma, stride_ymj,
        HAS_XM, HAS_YM, MP, NP, BM, BN, GROUP)
    x_off = xs * stride_xa + xi * stride_xi
    y_off = ys * stride_ya + yj * stride_yj
    acc = _cosine_tile(X, Y, x_off, x_ok, y_off, y_ok, D, stride_xd, stride_yd,
                       BM * MP, BN * NP, BK, PRECISION, UPCAST)
    u = _log2_cosines(acc, x_ok2, y_ok2, scale, BM, MP, BN, NP)
    block_max, e, row_sum, col_sum, exact = _shared_max_exp(u, row_ok, col_ok)
    if exact:
        row_lse = block_max[:, None, :] + tl.log2(row_sum)
        col_lse = block_max[:, :, None] + tl.log2(col_sum)
    else:
        # Recomputing the cosines here is cheaper than keeping u live through the branch,
        # which costs every tile ~50 registers per thread.
        acc = _cosine_tile(X, Y, x_off, x_ok, y_off, y_ok, D, stride_xd, stride_yd,
                           BM * MP, BN * NP, BK, PRECISION, UPCAST)
        u = _log2_cosines(acc, x_ok2, y_ok2, scale, BM, MP, BN, NP)
        row_shift, row_sum, col_shift, col_sum = _per_max_sums(u, row_ok, col_ok)
        row_lse = row_shift + tl.log2(row_sum)
        col_lse = col_shift + tl.log2(col_sum)
    row_lse = tl.where(row_ok, row_lse, 0.0)
    col_lse = tl.where(col_ok, col_lse, 0.0)
    count_x = tl.maximum(tl.sum(x_ok2.to(tl.float32), 1), 1.0)
    count_y = tl.maximum(tl.sum(y_ok2.to(tl.float32), 1), 1.0)
    s = (tl.sum(row_lse, 1) / count_x[:, None] + tl.sum(col_lse, 2) / count_y[None, :]) * out_scale
    out = S + sx.to(tl.int64)[:, None] * stride_sa + sy.to(tl.int64)[None, :] * stride_sb
    tl.store(out, s, mask=(sx < NX)[:, None] & (sy < NY)[None, :])


@triton.jit
def _weights_kernel(
    G, X, Y, XM, YM, W_HI, W_LO,
    NX, NY, M, N, D,
    stride_ga, stride_gb,
    stride_xa, stride_xi, stride_xd, stride_ya, stride_yj, stride_yd,
    stride_xma, stride_xmi, stride_yma, stride_ymj, stride_w,
    scale, inv_den,
    HAS_XM: tl.constexpr, HAS_YM: tl.constexpr,
    MP: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # The backward's only kernel: each tile recomputes its cosines (its blocks' LSEs are
    # complete inside it) and writes W = g * (P/m + Q/n) / den for its (x element, y element)
    # cells of the (NX*m, NY*n) block W; dx = W Y and dy = W^T X are then library GEMMs, so
    # every output row has one owner and nothing is added atomically. 16-bit inputs get
    # W = W_HI + W_LO, both in the input dtype: the GEMMs see W to ~16 (bf16) / 22 (fp16) bits
    # where a one-term bf16 W would cost up to 2^-8 of the summed |terms|, which cancellation
    # over many pairs turns into percent errors.
    ROWS: tl.constexpr = BM * MP
    COLS: tl.constexpr = BN * NP
    xs, xi, x_ok, ys, yj, y_ok, sx, sy, x_ok2, y_ok2, row_ok, col_ok = _tile(
        NX, NY, M, N, XM, YM, stride_xma, stride_xmi, stride_yma, stride_ymj,
        HAS_XM, HAS_YM, MP, NP, BM, BN, GROUP)
    x_off = xs * stride_xa + xi * stride_xi
    y_off = ys * stride_ya + yj * stride_yj
    acc = _cosine_tile(X, Y, x_off, x_ok, y_off, y_ok, D, stride_xd, stride_yd,
                       ROWS, COLS, BK, PRECISION, UPCAST)
    g = tl.load(G + sx.to(tl.int64)[:, None] * stride_ga + sy.to(tl.int64)[None, :] * stride_gb,
                mask=(sx < NX)[:, None] & (sy < NY)[None, :], other=0.0)
    count_x = tl.maximum(tl.sum(x_ok2.to(tl.float32), 1), 1.0)
    count_y = tl.maximum(tl.sum(y_ok2.to(tl.float32), 1), 1.0)
    g_row = (g * inv_den / count_x[:, None])[:, None, :, None]
    g_col = (g * inv_den / count_y[None, :])[:, None, :, None]

    u = _log2_cosines(acc, x_ok2, y_ok2, scale, BM, MP, BN, NP)
    block_max, e, row_sum, col_sum, exact = _shared_max_exp(u, row_ok, col_ok)
    # P and Q (<= 1) are formed before scaling by g, so no intermediate can overflow.
    if exact:
        w = (e * (1.0 / row_sum)[:, :, :, None]) * g_row \
            + (e * (1.0 / col_sum)[:, None, :, :]) * g_col
    else:
        # Recomputed rather than kept live through the branch, as in the forward.
        acc = _cosine_tile(X, Y, x_off, x_ok, y_off, y_ok, D, stride_xd, stride_yd,
                           ROWS, COLS, BK, PRECISION, UPCAST)
        u = _log2_cosines(acc, x_ok2, y_ok2, scale, BM, MP, BN, NP)
        row_shift, row_sum, col_shift, col_sum = _per_max_sums(u, row_ok, col_ok)
        w = (tl.exp2(u - row_shift[:, :, :, None]) * (1.0 / row_sum)[:, :, :, None]) * g_row \
            + (tl.exp2(u - col_shift[:, None, :, :]) * (1.0 / col_sum)[:, None, :, :]) * g_col
    # Masked cells are stored as exact zeros: a NaN or inf g must not reach them.
    w = tl.where(x_ok[:, None] & y_ok[None, :], tl.reshape(w, (ROWS, COLS)), 0.0)
    rows = (xs * M + xi)[:, None] * stride_w
    cols = (ys * N + yj)[None, :]
    real = ((xs < NX) & (xi < M))[:, None] & ((ys < NY) & (yj < N))[None, :]
    w_hi = w.to(W_HI.dtype.element_ty)
    tl.store(W_HI + rows + cols, w_hi, mask=real)
    if W_HI.dtype.element_ty != tl.float32:
        tl.store(W_LO + rows + cols, (w - w_hi.to(tl.float32)).to(W_LO.dtype.element_ty),
                 mask=real)


KERNELS = {"forward": _forward_kernel, "backward": _weights_kernel}


def aot_spec(kernel, dtype, m, n, input_precision="ieee"):
    """(signature, constexprs, attrs, options) for `triton.compile(ASTSource(...))` of `kernel`.

    Mirrors what a launch specialises to on contiguous inputs with masks and D % 16 == 0 (the
    common case): unit strides become constexpr 1, pointers and D-multiples get divisibility 16.
    """
    fn = KERNELS[kernel]
    consts, opts = config(kernel, dtype, m, n, input_precision)
    consts.update(HAS_XM=True, HAS_YM=True)
    unit = {"stride_xd", "stride_yd", "stride_xmi", "stride_ymj", "stride_sb", "stride_gb"}
    aligned = {"D", "stride_xa", "stride_xi", "stride_ya", "stride_yj", "stride_w"}
    pointers = {"X": TL_DTYPE[dtype], "Y": TL_DTYPE[dtype], "XM": "u8", "YM": "u8",
                "S": "fp32", "G": "fp32", "W_HI": TL_DTYPE[dtype], "W_LO": TL_DTYPE[dtype]}
    consts.update({name: 1 for name in fn.arg_names if name in unit})
    floats = ("scale", "out_scale", "inv_den")
    signature, attrs = aot_signature(fn, consts, pointers, floats, aligned)
    return signature, consts, attrs, opts


def _mask_args(mask, like):
    # bool -> uint8 is a free reinterpretation of any strides; no mask: a never-read dummy.
    if mask is None:
        return like, 0, 0, False
    return mask.view(torch.uint8), mask.stride(0), mask.stride(1), True


def _grid(consts, nx, ny):
    return (triton.cdiv(nx, consts["BM"]) * triton.cdiv(ny, consts["BN"]),)


def _launch_config(kernel, x, m, n):
    consts, opts = config(kernel, x.dtype, m, n, precision(x.dtype))
    consts["UPCAST"] = interpreter_upcast(x)
    return consts, opts


def forward(x, y, x_mask, y_mask, temperature: float, denominator: float) -> torch.Tensor:
    """S (NX, NY) float32 of x (NX, m, D) and y (NY, n, D); masks bool (NX, m) / (NY, n) or None."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    consts, opts = _launch_config("forward", x, m, n)
    s = torch.empty((nx, ny), dtype=torch.float32, device=x.device)
    xm, sxma, sxmi, has_xm = _mask_args(x_mask, x)
    ym, syma, symj, has_ym = _mask_args(y_mask, y)
    with device_guard(x):
        _forward_kernel[_grid(consts, nx, ny)](
            x, y, xm, ym, s, nx, ny, m, n, d,
            *x.stride(), *y.stride(), sxma, sxmi, syma, symj, *s.stride(),
            temperature * math.log2(math.e), math.log(2.0) / (denominator * temperature),
            HAS_XM=has_xm, HAS_YM=has_ym, **consts, **opts)
    return s


def weights(grad, x, y, x_mask, y_mask, w_hi, w_lo, temperature: float, denominator: float):
    """Writes the gradient weights W = grad * (P/m + Q/n) / den of x (NX, m, D) against
    y (NY, n, D) into w_hi (NX*m, NY*n), row stride w_hi.stride(0): float32 for float32 inputs
    (w_lo unused), else W = w_hi + w_lo in the input dtype (w_lo like w_hi). Masked cells get 0."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    consts, opts = _launch_config("backward", x, m, n)
    xm, sxma, sxmi, has_xm = _mask_args(x_mask, x)
    ym, syma, symj, has_ym = _mask_args(y_mask, y)
    with device_guard(x):
        _weights_kernel[_grid(consts, nx, ny)](
            grad, x, y, xm, ym, w_hi, w_lo, nx, ny, m, n, d, *grad.stride(),
            *x.stride(), *y.stride(), sxma, sxmi, syma, symj, w_hi.stride(0),
            temperature * math.log2(math.e), 1.0 / denominator,
            HAS_XM=has_xm, HAS_YM=has_ym, **consts, **opts)
