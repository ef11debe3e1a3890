"""Fused smooth-Chamfer similarity (docs/design.md §2.1-2.2) in Triton: forward and backward.

Both kernels work on one tile of (BM x-sets) x (BN y-sets). The x tile is loaded as BM*MP rows
(MP = next power of two >= m, padding rows masked; the backward puts element r % MP of set
r // MP in row r, the forward interleaves a set's elements as `_spread` says), the y tile likewise
as BN*NP rows, and one `tl.dot` loop over D gives every cosine of the tile in fp32. Each m x n
block of that accumulator belongs to exactly one (x set, y set) pair, so the log-sum-exps are
finished in registers and the (NX*m x NY*n) grid never reaches memory.

Everything runs in log2 units: u = T * log2(e) * c, so each cosine costs one exp2.

Forward epilogue (static counts in benchmarks/RESULTS.md): when the host proves that no row or
column sum can underflow under one shared max per block (`_no_underflow`: unit-norm sets and
T <= 33), `_safe_epilogue` spends one FFMA and one exp2 per cosine and needs no per-tile test;
otherwise `_exact_epilogue` uses a max per row and per column. On a GPU exp2/log2 are the
single-instruction MUFU approximations (`_exp2`, `_log2`, accuracy in their docstrings).

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
    ("forward", "16bit"): dict(ROWS=128, COLS=128, BK=64, num_warps=8, num_stages=3),
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
    if kernel == "forward" and mp * np_ > 256:
        # Few large sets per tile: a 128-row tile of 32 x 32 blocks spills on sm_80/86 under
        # Triton 3.6, and big sets gain nothing from it.
        tile["ROWS"] = min(tile["ROWS"], 64)
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
def _exp2(x, FAST: tl.constexpr):
    """2^x, results below 2^-126 flushed to 0 (as PTX's .ftz does) on both paths.

    FAST: one MUFU.EX2 (`ex2.approx.ftz.f32`, the instruction CUDA's exp2f uses: 2 ulp) in
    place of tl.exp2's denormal guards. The interpreter cannot run inline asm: it takes
    tl.exp2, so the tests there check the same arithmetic without the approximation."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.where(x < -126.0, 0.0, tl.exp2(x))


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2(x) of a normal float. FAST: one MUFU.LG2 (`lg2.approx.ftz.f32`, CUDA's __log2f:
    absolute error <= 2^-22 on [0.5, 2], 2 ulp elsewhere) in place of the accurate library
    log2 (~25 instructions). With the 2-ulp exp2 each LSE is off by < 2^-20 in log2 units,
    i.e. < 2e-8 in S at T = 16 (the error divides by T): far inside fp32 test tolerances."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _fwd_side(block, NSETS, SIZE, MASK, stride_ma, stride_mi, HAS_MASK: tl.constexpr,
              B: tl.constexpr, P: tl.constexpr, SB: tl.constexpr, SC: tl.constexpr):
    """One side of a forward tile: set, element and validity of its B*P rows in `_spread`
    order (SB, SC), and the validity (B, P) of each set's elements in set order."""
    SD: tl.constexpr = P // SB
    r = tl.arange(0, B * P)
    sets = (block * B + (r // (SB * SC * SD)) * SC + (r // SD) % SC).to(tl.int64)
    elem = (((r // (SC * SD)) % SB) * SD + r % SD).to(tl.int64)
    sets2 = (block * B + tl.arange(0, B)).to(tl.int64)[:, None]
    elem2 = tl.arange(0, P).to(tl.int64)[None, :]
    valid = (sets < NSETS) & (elem < SIZE)
    valid2 = (sets2 < NSETS) & (elem2 < SIZE)
    if HAS_MASK:
        keep = tl.load(MASK + sets * stride_ma + elem * stride_mi, mask=valid, other=0)
        valid = valid & (keep != 0)
        keep2 = tl.load(MASK + sets2 * stride_ma + elem2 * stride_mi, mask=valid2, other=0)
        valid2 = valid2 & (keep2 != 0)
    return sets, elem, valid, valid2


@triton.jit
def _blocks(acc, BM: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, NP: tl.constexpr,
            XB: tl.constexpr, XC: tl.constexpr, YB: tl.constexpr, YC: tl.constexpr):
    """The (BM*MP, BN*NP) accumulator of `_spread`-ordered rows and columns as
    (x set, x element, y set, y element): a relabelling of registers, no data movement."""
    XD: tl.constexpr = MP // XB
    YD: tl.constexpr = NP // YB
    t = tl.reshape(acc, (BM // XC, XB, XC, XD, BN // YC, YB, YC, YD))
    t = tl.permute(t, (0, 2, 1, 3, 4, 6, 5, 7))
    return tl.reshape(t, (BM, MP, BN, NP))


@triton.jit
def _safe_epilogue(c, x_ok2, y_ok2, row_ok, col_ok, inv_x, inv_y, scale,
                   DENSE: tl.constexpr, FAST: tl.constexpr):
    """sum_rows LSE / count + sum_columns LSE / count per pair, in log2 units, (BM, BN), of
    the cosine blocks c (BM, MP, BN, NP).

    One max per (x set, y set) block shifts both directions, so each cosine costs one FFMA and
    one exp2. The caller has proved (`_no_underflow`) that every valid row and column sum under
    that shared max keeps a term >= 2^-96, so no tile needs the per-row fallback. The max is
    taken on raw cosines (scale > 0), and LSE = shift + log2(sum) makes the result
    2 * shift + sum_rows log2(sum) / count + ...: invalid rows and columns get sum 1 (add 0).
    DENSE (no masks, m and n powers of two): every element of a set in range is real, and sets
    past NX or NY hold zero cosines that are never stored, so no validity select is needed.
    """
    if not DENSE:
        c = tl.where(x_ok2[:, :, None, None] & y_ok2[None, None, :, :], c, -float("inf"))
    shift = tl.max(tl.max(c, 3), 1) * scale
    if not DENSE:
        shift = tl.where(shift == -float("inf"), 0.0, shift)  # sets past NX or NY
    e = _exp2(c * scale - shift[:, None, :, None], FAST)
    row_sum = tl.sum(e, 3)
    col_sum = tl.sum(e, 1)
    if not DENSE:
        row_sum = tl.where(row_ok, row_sum, 1.0)
        col_sum = tl.where(col_ok, col_sum, 1.0)
    rows = tl.sum(_log2(row_sum, FAST), 1)
    cols = tl.sum(_log2(col_sum, FAST), 2)
    return 2.0 * shift + rows * inv_x[:, None] + cols * inv_y[None, :]


@triton.jit
def _exact_epilogue(c, x_ok2, y_ok2, row_ok, col_ok, inv_x, inv_y, scale,
                    DENSE: tl.constexpr, FAST: tl.constexpr):
    """`_safe_epilogue` for inputs without the host's proof (T * spread too wide, unnormalised
    or non-finite sets): one max per row and one per column, two exp2 per cosine. Every valid
    sum then holds a term 2^0 = 1, so it never underflows and no tile needs a second pass."""
    if not DENSE:
        c = tl.where(x_ok2[:, :, None, None] & y_ok2[None, None, :, :], c, -float("inf"))
    row_shift = tl.max(c, 3) * scale
    col_shift = tl.max(c, 1) * scale
    if not DENSE:
        row_shift = tl.where(row_ok, row_shift, 0.0)
        col_shift = tl.where(col_ok, col_shift, 0.0)
    row_sum = tl.sum(_exp2(c * scale - row_shift[:, :, :, None], FAST), 3)
    col_sum = tl.sum(_exp2(c * scale - col_shift[:, None, :, :], FAST), 1)
    if not DENSE:
        row_sum = tl.where(row_ok, row_sum, 1.0)
        col_sum = tl.where(col_ok, col_sum, 1.0)
    rows = tl.sum(row_shift + _log2(row_sum, FAST), 1)
    cols = tl.sum(col_shift + _log2(col_sum, FAST), 2)
    return rows * inv_x[:, None] + cols * inv_y[None, :]


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
    SAFE: tl.constexpr, DENSE: tl.constexpr, FAST: tl.constexpr,
    XB: tl.constexpr, XC: tl.constexpr, YB: tl.constexpr, YC: tl.constexpr,
):
    pid_x, pid_y = _tile_ids(NX, NY, BM, BN, GROUP)
    xs, xi, x_ok, x_ok2 = _fwd_side(pid_x, NX, M, XM, stride_xma, stride_xmi, HAS_XM, BM, MP,
                                    XB, XC)
    ys, yj, y_ok, y_ok2 = _fwd_side(pid_y, NY, N, YM, stride_yma, stride_ymj, HAS_YM, BN, NP,
                                    YB, YC)
    sx = pid_x * BM + tl.arange(0, BM)
    sy = pid_y * BN + tl.arange(0, BN)
    row_ok = x_ok2[:, :, None] & (sy < NY)[None, None, :]
    col_ok = (sx < NX)[:, None, None] & y_ok2[None, :, :]
    x_off = xs * stride_xa + xi * stride_xi
    y_off = ys * stride_ya + yj * stride_yj
    acc = _cosine_tile(X, Y, x_off, x_ok, y_off, y_ok, D, stride_xd, stride_yd,
                       BM * MP, BN * NP, BK, PRECISION, UPCAST)
    count_x = tl.maximum(tl.sum(x_ok2.to(tl.float32), 1), 1.0)
    count_y = tl.maximum(tl.sum(y_ok2.to(tl.float32), 1), 1.0)
    c = _blocks(acc, BM, MP, BN, NP, XB, XC, YB, YC)
    if SAFE:
        s = _safe_epilogue(c, x_ok2, y_ok2, row_ok, col_ok, 1.0 / count_x, 1.0 / count_y,
                           scale, DENSE, FAST)
    else:
        s = _exact_epilogue(c, x_ok2, y_ok2, row_ok, col_ok, 1.0 / count_x, 1.0 / count_y,
                            scale, DENSE, FAST)
    s = s * out_scale
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


def aot_spec(kernel, dtype, m, n, input_precision="ieee", safe=False, masked=True):
    """(signature, constexprs, attrs, options) for `triton.compile(ASTSource(...))` of `kernel`.

    Mirrors what a launch specialises to on contiguous inputs with masks and D % 16 == 0 (the
    common case): unit strides become constexpr 1, pointers and D-multiples get divisibility 16.
    The forward's defaults are its largest variant (with the exact fallback); `safe` and
    `masked` pick the others a GPU launch can take (see `forward`).
    """
    fn = KERNELS[kernel]
    consts, opts = config(kernel, dtype, m, n, input_precision)
    consts.update(HAS_XM=masked, HAS_YM=masked)
    if kernel == "forward":
        consts.update(_forward_consts(m, n, masked, masked, safe, fast=True))
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


# Largest T * log2(e) * (max - min cosine) the shared-max epilogue takes: every valid row and
# column sum then keeps a term >= 2^-96, a normal float (>= 2^-126) that neither the .ftz exp2
# nor the .ftz log2 flush; the margin covers the fp32 rounding of the cosines and the norms.
_SPREAD_LIMIT = 96.0


def _max_norm(t, mask):
    norms = torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)
    if mask is not None:
        norms = norms.masked_fill(~mask, 0.0)  # masked elements may hold anything
    return norms.amax()


def _no_underflow(x, y, x_mask, y_mask, scale):
    """Host-side proof that no valid row or column sum under one shared max per (x set, y set)
    block can fall below 2^-_SPREAD_LIMIT: cosines of one block lie within
    +-max|x_i| * max|y_j| (Cauchy-Schwarz), so T*log2(e) * spread <= 2 * scale * |x|max * |y|max.
    Unit-norm sets pass for T <= 33 (the paper's 16). False for NaN/inf in a real element, which
    then takes the exact path. One small reduction per side and one device sync."""
    bound = 2.0 * scale * _max_norm(x, x_mask) * _max_norm(y, y_mask)
    return bool(bound <= _SPREAD_LIMIT)


def _spread(p):
    """How the forward lays a set's p (a power of two) elements over tile rows or columns:
    (B, C) with D = p // B, row r = a*B*C*D + b*C*D + c*D + d holding element b*D + d of set
    a*C + c. For 2 <= p <= 16 element bit 0 goes to row bit 3 (B = 2): the tensor-core
    accumulator (wgmma and mma.sync alike) keeps rows r and r+8, and columns c and c+8, in the
    same thread, so a set's elements sit in one thread and at most p/4 neighbouring lanes
    instead of p/2 lanes, and the per-block reductions need fewer shuffles. Other p:
    consecutive rows (B = C = 1)."""
    if 2 <= p <= 16:
        return 2, 16 // p
    return 1, 1


def _forward_consts(m, n, has_xm, has_ym, safe, fast):
    """The forward's own constexprs beside `config`'s: epilogue variant and element layout."""
    (xb, xc), (yb, yc) = _spread(next_pow2(m)), _spread(next_pow2(n))
    return dict(SAFE=safe, DENSE=_dense(m, n, has_xm, has_ym), FAST=fast,
                XB=xb, XC=xc, YB=yb, YC=yc)


def _dense(m, n, has_xm, has_ym):
    # No masks and power-of-two set sizes: no padding element anywhere in a tile.
    return not has_xm and not has_ym and m == next_pow2(m) and n == next_pow2(n)


def forward(x, y, x_mask, y_mask, temperature: float, denominator: float) -> torch.Tensor:
    """S (NX, NY) float32 of x (NX, m, D) and y (NY, n, D); masks bool (NX, m) / (NY, n) or None."""
    nx, m, d = x.shape
    ny, n, _ = y.shape
    consts, opts = _launch_config("forward", x, m, n)
    scale = temperature * math.log2(math.e)
    consts.update(_forward_consts(m, n, x_mask is not None, y_mask is not None,
                                  safe=_no_underflow(x, y, x_mask, y_mask, scale),
                                  fast=x.is_cuda))  # the interpreter cannot run inline asm
    s = torch.empty((nx, ny), dtype=torch.float32, device=x.device)
    xm, sxma, sxmi, has_xm = _mask_args(x_mask, x)
    ym, syma, symj, has_ym = _mask_args(y_mask, y)
    with device_guard(x):
        _forward_kernel[_grid(consts, nx, ny)](
            x, y, xm, ym, s, nx, ny, m, n, d,
            *x.stride(), *y.stride(), sxma, sxmi, syma, symj, *s.stride(),
            scale, math.log(2.0) / (denominator * temperature),
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
