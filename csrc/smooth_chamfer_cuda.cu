// Fused CUDA smooth-Chamfer similarity, forward and backward (math: docs/design.md §2.1-2.2).
//
// One block of 256 threads owns a tile of 64 x rows by 64 y rows: BM = 64 / MP x sets against
// BN = 64 / NP y sets (MP, NP = next powers of two >= m, n; padding rows are invalid). A 64 x 64
// fp32 cosine tile is the largest that leaves the epilogue's shared buffers under the 48 KB a
// block gets without opt-in (41 KB in all with the forward's three pipeline stages: two blocks
// per SM even on an RTX 3090), and 64 is a multiple of every padded set size, so no set
// straddles two tiles. Blocks walk the tiles with a grid-stride loop over a 1-D index, grouped
// so that neighbouring blocks share y tiles in L2: no grid-dimension limit whatever NX and NY
// are.
//
// Cosines: fp16/bf16 on tensor cores (mma.sync m16n8k16, fp32 accumulation; 8 warps of 32 x 16),
// fp32 on a register-blocked SIMT loop (4 x 4 outputs per thread). D is streamed in steps of
// BK through one shared stage that the next step's global loads (held in registers) refill;
// invalid rows and the D tail are zero-filled in shared memory. The forward instead streams
// 16-byte aligned rows through a 3-stage cp.async pipeline read by ldmatrix (one barrier per
// step), fp16/bf16 on m16n8k16 and fp32, when the caller allows TF32, on m16n8k8 TF32; other
// rows (D * itemsize not a multiple of 16, misaligned bases) keep the register-staged loop.
//
// Epilogue, on the cosine tile in shared memory, in log2 units (u = T log2(e) c): the row pass
// (one thread per x row and y set) and the column pass (one per y column and x set) each use
// their own max, the exact form of smooth_chamfer_common.h, so no sum can underflow and no
// fallback pass is needed. That costs two exp2 per cosine instead of the Triton kernel's one
// (its shared per-pair max), which is noise next to the D multiply-adds of each cosine; the
// row/column split keeps every set size load-balanced over the block.
//
// The backward kernel recomputes the cosines and the row LSEs, turns the tile into
// W = g_ab (P / m + Q / n) / den in place (the column pass) and stores it into a (NX*m, NY*n)
// block of gradient weights: float32 for float32 inputs, else W = hi + lo in the input dtype
// (~16/22 bits where one 16-bit term would lose up to 2^-8 of the summed |terms|). The caller
// then forms dx = W y and dy = W^T x with two library GEMMs on tensor cores, so every output row
// has one owner: no atomics, deterministic results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "cuda_common.cuh"
#include "set_size.h"
#include "smooth_chamfer_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the fused smooth-Chamfer kernels use sm_80 tensor-core instructions"
#endif

namespace dive {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 64;           // x rows and y rows per tile
constexpr int kLd = kTile + 1;      // odd row stride: the column pass reads down columns
constexpr int kBk16 = 32;           // D step of the tensor-core loop (halves)
constexpr int kLd16 = kBk16 / 2 + 4;  // words per staged row: conflict-free fragment loads
constexpr int kBk32 = 16;           // D step of the SIMT loop
constexpr int kLd32 = kTile + 4;    // keeps float4 reads aligned
constexpr int64_t kGroup = 8;       // x tiles that share a band of y tiles in launch order
constexpr int kStages = 3;          // cp.async pipeline depth of the forward's main loop
constexpr int kStepBytes = 64;      // bytes of each tile row per pipeline step (4 x 16-byte chunks)

struct Stage16 {
  uint32_t x[kTile][kLd16];  // half/bfloat16 pairs, row-major (row = tile row)
  uint32_t y[kTile][kLd16];
};

struct Stage32 {
  float x[kBk32][kLd32];  // k-major, so a thread reads 4 rows of one k as a float4
  float y[kBk32][kLd32];
};

// One pipeline step of the forward: 64 bytes of each of the 64 x and 64 y rows (32 halves or 16
// floats), as 16-byte chunks. Chunk q of row r sits at slot q ^ ((r >> 1) & 3): the 8 rows one
// ldmatrix phase reads then cover all 32 banks (a plain 64-byte stride would be 4-way conflicted).
struct PipeStage {
  uint4 x[kTile][kStepBytes / 16];
  uint4 y[kTile][kStepBytes / 16];
};

struct __align__(16) Smem {
  float c[kTile][kLd];  // cosines; then column LSEs (forward) or W (backward)
  union {
    Stage16 s16;
    Stage32 s32;
    float rows[kTile * kTile];  // row LSE of (y set bs, tile row r) at bs * 64 + r
    PipeStage pipe[kStages];  // forward main loop only
  } u;
  uint8_t xok[kTile];  // tile row is a real, unmasked element of a set inside NX
  uint8_t yok[kTile];
};

template <typename T>
struct Args {
  const T* x;
  const T* y;
  const uint8_t* xm;
  const uint8_t* ym;
  int64_t nx, ny;
  int d, m, n, lmp, lnp;  // lmp, lnp: log2 of the padded set sizes MP, NP
  float scale2;           // T log2(e): cosine -> log2 units
  float out_scale;        // ln(2) / (den T): summed log2 LSEs -> S
  float inv_den;
  float* s;
  int64_t lds;
  const float* g;
  int64_t ldg;
  void* w_hi;  // gradient weights: float for float inputs, else T (with w_lo)
  void* w_lo;
  int64_t ldw;
  bool vec;   // d and both base pointers allow 16-byte loads
  bool tf32;  // fp32 forward may round operands to TF32 for the tensor cores
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_bits(unsigned short b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(b);
  } else {
    return __ushort_as_bfloat16(b);
  }
}

struct TileIds {
  int64_t tx, ty;
};

// Groups of kGroup x tiles sweep the y tiles together, so a y tile is read by neighbouring
// blocks while it is still in L2 (the Triton kernel's launch order).
__device__ __forceinline__ TileIds tile_ids(int64_t tile, int64_t tiles_x, int64_t tiles_y) {
  const int64_t per_group = kGroup * tiles_y;
  const int64_t first_x = tile / per_group * kGroup;
  const int64_t size = min(tiles_x - first_x, kGroup);
  const int64_t in_group = tile % per_group;
  return {first_x + in_group % size, in_group / size};
}

__device__ __forceinline__ bool row_ok(const uint8_t* mask, int64_t set, int elem, int size,
                                       int64_t nsets) {
  if (set >= nsets || elem >= size) return false;
  return !mask || mask[set * size + elem];
}

// Global offset (elements) of tile row r of one side: set set0 + r / P, element r % P.
__device__ __forceinline__ int64_t row_offset(int64_t set0, int r, int lp, int size) {
  return (set0 + (r >> lp)) * size + (r & ((1 << lp) - 1));
}

template <typename T>
__device__ __forceinline__ void mark_rows(Smem& sm, const Args<T>& p, int64_t tx, int64_t ty) {
  const int t = threadIdx.x;
  if (t < kTile) {
    sm.xok[t] = row_ok(p.xm, tx * (kTile >> p.lmp) + (t >> p.lmp), t & ((1 << p.lmp) - 1), p.m,
                       p.nx);
  } else if (t < 2 * kTile) {
    const int r = t - kTile;
    sm.yok[r] = row_ok(p.ym, ty * (kTile >> p.lnp) + (r >> p.lnp), r & ((1 << p.lnp) - 1), p.n,
                       p.ny);
  }
}

// 8 consecutive 16-bit values from element col of a row (null: invalid row), zero past d.
__device__ __forceinline__ uint4 load8_bits(const uint16_t* row, int col, int d, bool vec) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (!row || col >= d) return v;
  if (vec) return *reinterpret_cast<const uint4*>(row + col);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int q = 0; q < 8; ++q)
    if (col + q < d) w[q / 2] |= static_cast<uint32_t>(row[col + q]) << (16 * (q % 2));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float4 load4_float(const float* row, int col, int d, bool vec) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!row || col >= d) return v;
  if (vec) return *reinterpret_cast<const float4*>(row + col);
  float* e = &v.x;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (col + q < d) e[q] = row[col + q];
  return v;
}

template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Cosines of the tile into sm.c on tensor cores. Thread t stages 8 values of row t / 4; warp w
// computes rows 32 (w / 4) .. +31 by columns 16 (w % 4) .. +15 as 2 x 2 m16n8 fragments.
template <typename T>
__device__ __forceinline__ void cosines_mma(Smem& sm, const Args<T>& p, int64_t tx, int64_t ty) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int wm = (warp >> 2) * 32, wn = (warp & 3) * 16;
  const int r = tid >> 2, col = (tid & 3) * 8;
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(p.x);
  const uint16_t* yb = reinterpret_cast<const uint16_t*>(p.y);
  const uint16_t* xrow =
      sm.xok[r] ? xb + row_offset(tx * (kTile >> p.lmp), r, p.lmp, p.m) * p.d : nullptr;
  const uint16_t* yrow =
      sm.yok[r] ? yb + row_offset(ty * (kTile >> p.lnp), r, p.lnp, p.n) * p.d : nullptr;

  float acc[2][2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  uint4 xv = load8_bits(xrow, col, p.d, p.vec);
  uint4 yv = load8_bits(yrow, col, p.d, p.vec);
  for (int k0 = 0; k0 < p.d; k0 += kBk16) {
    *reinterpret_cast<uint4*>(&sm.u.s16.x[r][col / 2]) = xv;
    *reinterpret_cast<uint4*>(&sm.u.s16.y[r][col / 2]) = yv;
    __syncthreads();
    if (k0 + kBk16 < p.d) {
      xv = load8_bits(xrow, k0 + kBk16 + col, p.d, p.vec);
      yv = load8_bits(yrow, k0 + kBk16 + col, p.d, p.vec);
    }
#pragma unroll
    for (int kw = 0; kw < kBk16 / 2; kw += 8) {
      uint32_t a[2][4], b[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int rb = wm + i * 16 + g;
        a[i][0] = sm.u.s16.x[rb][kw + t4];
        a[i][1] = sm.u.s16.x[rb + 8][kw + t4];
        a[i][2] = sm.u.s16.x[rb][kw + 4 + t4];
        a[i][3] = sm.u.s16.x[rb + 8][kw + 4 + t4];
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int cb = wn + j * 8 + g;
        b[j][0] = sm.u.s16.y[cb][kw + t4];
        b[j][1] = sm.u.s16.y[cb][kw + 4 + t4];
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          mma16816<std::is_same_v<T, __nv_bfloat16>>(acc[i][j], a[i], b[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int rr = wm + i * 16 + g, cc = wn + j * 8 + t4 * 2;
      sm.c[rr][cc] = acc[i][j][0];
      sm.c[rr][cc + 1] = acc[i][j][1];
      sm.c[rr + 8][cc] = acc[i][j][2];
      sm.c[rr + 8][cc + 1] = acc[i][j][3];
    }
}

// Cosines of the tile into sm.c on FMA units. Thread t stages 4 values of row t % 64 and
// computes rows 4 (t / 16) .. +3 by columns 4 (t % 16) .. +3.
__device__ __forceinline__ void cosines_simt(Smem& sm, const Args<float>& p, int64_t tx,
                                             int64_t ty) {
  const int tid = threadIdx.x;
  const int r = tid & (kTile - 1), kq = (tid >> 6) * 4;
  const int ry = (tid >> 4) * 4, cx = (tid & 15) * 4;
  const float* xrow =
      sm.xok[r] ? p.x + row_offset(tx * (kTile >> p.lmp), r, p.lmp, p.m) * p.d : nullptr;
  const float* yrow =
      sm.yok[r] ? p.y + row_offset(ty * (kTile >> p.lnp), r, p.lnp, p.n) * p.d : nullptr;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  float4 xv = load4_float(xrow, kq, p.d, p.vec);
  float4 yv = load4_float(yrow, kq, p.d, p.vec);
  for (int k0 = 0; k0 < p.d; k0 += kBk32) {
    sm.u.s32.x[kq][r] = xv.x;
    sm.u.s32.x[kq + 1][r] = xv.y;
    sm.u.s32.x[kq + 2][r] = xv.z;
    sm.u.s32.x[kq + 3][r] = xv.w;
    sm.u.s32.y[kq][r] = yv.x;
    sm.u.s32.y[kq + 1][r] = yv.y;
    sm.u.s32.y[kq + 2][r] = yv.z;
    sm.u.s32.y[kq + 3][r] = yv.w;
    __syncthreads();
    if (k0 + kBk32 < p.d) {
      xv = load4_float(xrow, k0 + kBk32 + kq, p.d, p.vec);
      yv = load4_float(yrow, k0 + kBk32 + kq, p.d, p.vec);
    }
#pragma unroll
    for (int k = 0; k < kBk32; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&sm.u.s32.x[k][ry]);
      const float4 b = *reinterpret_cast<const float4*>(&sm.u.s32.y[k][cx]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sm.c[ry + i][cx + j] = acc[i][j];
}

// Cosine tile into sm.c; returns after a barrier, with the staging buffers free.
template <typename T>
__device__ __forceinline__ void cosine_tile(Smem& sm, const Args<T>& p, int64_t tx, int64_t ty) {
  if constexpr (std::is_same_v<T, float>) {
    cosines_simt(sm, p, tx, ty);
  } else {
    cosines_mma(sm, p, tx, ty);
  }
  __syncthreads();
}

// max that keeps a NaN (fmaxf drops it, and a NaN cosine must make its pair NaN).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// ---- Forward main loop: cp.async pipeline, ldmatrix, mma.sync (sm_80 instructions only) ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; bytes past src_bytes (0 or 16 here) are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// fp32 bits -> TF32 rounded to nearest (ties away), as cuBLAS rounds for TF32 GEMMs.
__device__ __forceinline__ uint32_t to_tf32(uint32_t bits) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(__uint_as_float(bits)));
  return out;
}

__device__ __forceinline__ void mma1688_tf32(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Shared slot of 16-byte chunk q of tile row r (see PipeStage).
__device__ __forceinline__ int swizzle(int r, int q) { return q ^ ((r >> 1) & 3); }

// Cosines of the tile into sm.c on tensor cores, for inputs whose rows are 16-byte aligned
// (p.vec). D streams through kStages shared stages of 64 bytes per row: thread t copies chunk
// t % 4 of x row t / 4 and of y row t / 4 per step with cp.async (invalid rows and chunks past D
// are zero-filled by a source size of 0), one barrier per step. A step is two k16 (fp16/bf16) or
// two k8 (TF32) slices: warps 0-3 take the first, warps 4-7 the second (K split), each warp a
// 32 x 32 quarter of the tile as 2 x 4 m16n8 fragments fed by four ldmatrix.x4 per slice (a
// 32 x 16 warp tile would read 1.5x the shared bytes per mma). The two halves are summed in sm.c
// at the end. A chunk of 4 fp32 words has the layout of an 8 x 8 b16 matrix, so the TF32 path
// uses the same ldmatrix addresses.
template <typename T>
__device__ __forceinline__ void cosines_pipelined(Smem& sm, const Args<T>& p, int64_t tx,
                                                  int64_t ty) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int kk = warp >> 2;  // which slice of each step
  const int wm = ((warp >> 1) & 1) * 32, wn = (warp & 1) * 32;
  const int r = tid >> 2, q = tid & 3;
  const char* xb = reinterpret_cast<const char*>(p.x);
  const char* yb = reinterpret_cast<const char*>(p.y);
  const int64_t row_bytes = static_cast<int64_t>(p.d) * sizeof(T);
  const char* xrow =
      sm.xok[r] ? xb + row_offset(tx * (kTile >> p.lmp), r, p.lmp, p.m) * row_bytes : nullptr;
  const char* yrow =
      sm.yok[r] ? yb + row_offset(ty * (kTile >> p.lnp), r, p.lnp, p.n) * row_bytes : nullptr;
  const int steps = static_cast<int>((row_bytes + kStepBytes - 1) / kStepBytes);
  // This thread's chunk: source, bytes of the row from it on (0 for an invalid row: zero-fill
  // from a valid dummy address), and shared destinations in stage 0.
  const char* xsrc = xrow ? xrow + q * 16 : xb;
  const char* ysrc = yrow ? yrow + q * 16 : yb;
  const int64_t xleft = xrow ? row_bytes - q * 16 : 0, yleft = yrow ? row_bytes - q * 16 : 0;
  uint32_t x_dst = smem_addr(&sm.u.pipe[0].x[r][swizzle(r, q)]);
  uint32_t y_dst = smem_addr(&sm.u.pipe[0].y[r][swizzle(r, q)]);
  constexpr uint32_t kStageBytes = sizeof(PipeStage);

  // row_bytes is a multiple of 16, so a chunk is wholly inside D or wholly past it.
  const auto load = [&](int step, int stage) {
    const int64_t off = static_cast<int64_t>(step) * kStepBytes;
    const bool xin = off < xleft, yin = off < yleft;
    cp_async16(x_dst + stage * kStageBytes, xin ? xsrc + off : xb, xin ? 16 : 0);
    cp_async16(y_dst + stage * kStageBytes, yin ? ysrc + off : yb, yin ? 16 : 0);
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ldmatrix lane roles: A (x) matrices 0..3 = rows +0/+8 by chunk +0/+1; B (y) matrices
  // 0..3 = chunk +0/+1 by columns +0/+8. Rows 16 apart share a swizzle, so one shared offset
  // serves both A loads and both B loads.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_q = lane >> 4;
  const int b_row = (lane & 7) + ((lane >> 4) & 1) * 8, b_q = (lane >> 3) & 1;
  uint32_t a_addr = smem_addr(&sm.u.pipe[0].x[wm + a_row][swizzle(a_row, 2 * kk + a_q)]);
  uint32_t b_addr = smem_addr(&sm.u.pipe[0].y[wn + b_row][swizzle(b_row, 2 * kk + b_q)]);
  constexpr uint32_t kRows16 = 16 * kStepBytes;
  // Opaque to ptxas, which would otherwise recompute these lane formulas at every step.
  asm volatile("" : "+r"(a_addr), "+r"(b_addr), "+r"(x_dst), "+r"(y_dst));

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  int read = 0, write = kStages - 1;  // stages of this step and of step + kStages - 1
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    // Step `step` is in shared memory for every thread, and every warp is done reading the
    // stage the next load overwrites (the one of step - 1).
    __syncthreads();
    if (step + kStages - 1 < steps) load(step + kStages - 1, write);
    cp_async_commit();
    const uint32_t stage = read * kStageBytes;
    read = read == kStages - 1 ? 0 : read + 1;
    write = write == kStages - 1 ? 0 : write + 1;
    uint32_t a[2][4], b[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) ldmatrix_x4(a[i], a_addr + stage + i * kRows16);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t bq[4];
      ldmatrix_x4(bq, b_addr + stage + h * kRows16);
      b[2 * h][0] = bq[0], b[2 * h][1] = bq[1], b[2 * h + 1][0] = bq[2], b[2 * h + 1][1] = bq[3];
    }
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[i][e] = to_tf32(a[i][e]);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) b[j][e] = to_tf32(b[j][e]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma1688_tf32(acc[i][j], a[i], b[j]);
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mma16816<std::is_same_v<T, __nv_bfloat16>>(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();  // only empty groups are left; nothing may land in the union later
  // Second-slice warps store their partial sums, then first-slice warps add theirs.
  const auto put = [&](bool add) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int rr = wm + i * 16 + g, cc = wn + j * 8 + t4 * 2;
        float* lo = &sm.c[rr][cc];
        float* hi = &sm.c[rr + 8][cc];
        lo[0] = add ? lo[0] + acc[i][j][0] : acc[i][j][0];
        lo[1] = add ? lo[1] + acc[i][j][1] : acc[i][j][1];
        hi[0] = add ? hi[0] + acc[i][j][2] : acc[i][j][2];
        hi[1] = add ? hi[1] + acc[i][j][3] : acc[i][j][3];
      }
  };
  if (kk == 1) put(false);
  __syncthreads();
  if (kk == 0) put(true);
  __syncthreads();
}

// Row pass: log2-unit LSE of tile row r over the valid columns of y set bs, at rows[bs*64 + r]
// (0 where the row is invalid or the y set lies past NY; never read there).
template <typename T>
__device__ __forceinline__ void row_lses(Smem& sm, const Args<T>& p) {
  const int bn = kTile >> p.lnp;
  for (int t = threadIdx.x; t < kTile * bn; t += kThreads) {
    const int r = t & (kTile - 1), c0 = (t >> 6) << p.lnp;
    float v = 0.f;
    if (sm.xok[r]) {
      float mx = -INFINITY;
      bool any = false;
      for (int j = 0; j < p.n; ++j)
        if (sm.yok[c0 + j]) {
          mx = max_nan(mx, sm.c[r][c0 + j]);
          any = true;
        }
      // NaN or +-inf in mx makes v NaN below, as the reference's pair is.
      if (any) {
        const float top = p.scale2 * mx;
        float s = 0.f;
        for (int j = 0; j < p.n; ++j)
          if (sm.yok[c0 + j]) s += exp2f(fmaf(p.scale2, sm.c[r][c0 + j], -top));
        v = top + log2f(s);
      }
    }
    sm.u.rows[t] = v;
  }
}

// Log2-unit LSE of tile column c over the valid rows r0 .. r0 + m - 1 (-INFINITY if none).
template <typename T>
__device__ __forceinline__ float column_lse(const Smem& sm, const Args<T>& p, int r0, int c) {
  float mx = -INFINITY;
  bool any = false;
  for (int i = 0; i < p.m; ++i)
    if (sm.xok[r0 + i]) {
      mx = max_nan(mx, sm.c[r0 + i][c]);
      any = true;
    }
  if (!any) return -INFINITY;  // NaN or +-inf in mx makes the LSE NaN below
  const float top = p.scale2 * mx;
  float s = 0.f;
  for (int i = 0; i < p.m; ++i)
    if (sm.xok[r0 + i]) s += exp2f(fmaf(p.scale2, sm.c[r0 + i][c], -top));
  return top + log2f(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) forward_fused_kernel(const Args<T> p) {
  __shared__ Smem sm;
  const int bm = kTile >> p.lmp, bn = kTile >> p.lnp, lbn = 6 - p.lnp;
  const int64_t tiles_x = (p.nx + bm - 1) / bm, tiles_y = (p.ny + bn - 1) / bn;
  for (int64_t tile = blockIdx.x; tile < tiles_x * tiles_y; tile += gridDim.x) {
    const TileIds id = tile_ids(tile, tiles_x, tiles_y);
    mark_rows(sm, p, id.tx, id.ty);
    __syncthreads();
    // 16-byte aligned rows take the cp.async pipeline; others (odd D, offset views) the
    // register-staged loop. fp32 takes it only where TF32 is allowed, else exact FMA.
    if (p.vec && (!std::is_same_v<T, float> || p.tf32)) {
      cosines_pipelined(sm, p, id.tx, id.ty);
    } else {
      cosine_tile(sm, p, id.tx, id.ty);
    }
    row_lses(sm, p);
    __syncthreads();
    // Column pass: each column's LSE replaces the first cosine of its column in its own block,
    // which only this thread reads.
    for (int t = threadIdx.x; t < bm * kTile; t += kThreads) {
      const int c = t & (kTile - 1), r0 = (t >> 6) << p.lmp;
      const float v = sm.yok[c] ? column_lse(sm, p, r0, c) : 0.f;
      sm.c[r0][c] = v;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < bm * bn; t += kThreads) {
      const int as = t >> lbn, bs = t & (bn - 1);
      const int64_t a = id.tx * bm + as, b = id.ty * bn + bs;
      if (a >= p.nx || b >= p.ny) continue;
      const int r0 = as << p.lmp, c0 = bs << p.lnp;
      float rs = 0.f, cs = 0.f;
      int cx = 0, cy = 0;
      for (int i = 0; i < p.m; ++i)
        if (sm.xok[r0 + i]) {
          rs += sm.u.rows[bs * kTile + r0 + i];
          ++cx;
        }
      for (int j = 0; j < p.n; ++j)
        if (sm.yok[c0 + j]) {
          cs += sm.c[r0][c0 + j];
          ++cy;
        }
      p.s[a * p.lds + b] = (rs / cx + cs / cy) * p.out_scale;
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// W[idx] = w: one float, or the 16-bit pair hi + lo.
template <typename T>
__device__ __forceinline__ void store_weight(const Args<T>& p, int64_t idx, float w) {
  if constexpr (std::is_same_v<T, float>) {
    static_cast<float*>(p.w_hi)[idx] = w;
  } else {
    const T hi = from_float<T>(w);
    static_cast<T*>(p.w_hi)[idx] = hi;
    static_cast<T*>(p.w_lo)[idx] = from_float<T>(w - to_float(hi));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) weights_kernel(const Args<T> p) {
  __shared__ Smem sm;
  const int tid = threadIdx.x;
  const int bm = kTile >> p.lmp, bn = kTile >> p.lnp;
  const int64_t tiles_x = (p.nx + bm - 1) / bm, tiles_y = (p.ny + bn - 1) / bn;
  for (int64_t tile = blockIdx.x; tile < tiles_x * tiles_y; tile += gridDim.x) {
    const TileIds id = tile_ids(tile, tiles_x, tiles_y);
    const int64_t set_x0 = id.tx * bm, set_y0 = id.ty * bn;
    mark_rows(sm, p, id.tx, id.ty);
    __syncthreads();
    cosine_tile(sm, p, id.tx, id.ty);
    row_lses(sm, p);
    __syncthreads();
    // Column pass: the column's LSE, then W for every cell of the column in its pair block
    // (padded, masked and out-of-range cells get 0, whatever g holds), in place: only this
    // thread touches them.
    for (int t = tid; t < bm * kTile; t += kThreads) {
      const int c = t & (kTile - 1), as = t >> 6, bs = c >> p.lnp;
      const int r0 = as << p.lmp;
      const int64_t a = set_x0 + as;
      const bool live = sm.yok[c] && a < p.nx;  // yok is false for y sets past NY
      float col = 0.f, wr = 0.f, wc = 0.f;
      if (live) {
        int cx = 0, cy = 0;
        for (int i = 0; i < p.m; ++i) cx += sm.xok[r0 + i];
        for (int j = 0; j < p.n; ++j) cy += sm.yok[(bs << p.lnp) + j];
        const float gab = p.g[a * p.ldg + set_y0 + bs] * p.inv_den;
        wr = gab / cx;
        wc = gab / cy;
        col = column_lse(sm, p, r0, c);
      }
      for (int i = 0; i < (1 << p.lmp); ++i) {
        float w = 0.f;
        if (live && sm.xok[r0 + i]) {
          const float cosine = sm.c[r0 + i][c];
          const float prow = exp2f(fmaf(p.scale2, cosine, -sm.u.rows[bs * kTile + r0 + i]));
          const float pcol = exp2f(fmaf(p.scale2, cosine, -col));
          w = wr * prow + wc * pcol;
        }
        sm.c[r0 + i][c] = w;
      }
    }
    __syncthreads();
    // Store the tile's real cells (elements inside their sets and sets inside NX, NY): a warp
    // writes consecutive columns of one row.
    const int c = tid & (kTile - 1), j = c & ((1 << p.lnp) - 1);
    const int64_t b = set_y0 + (c >> p.lnp);
    if (b < p.ny && j < p.n) {
      for (int r = tid >> 6; r < kTile; r += kThreads / kTile) {
        const int i = r & ((1 << p.lmp) - 1);
        const int64_t a = set_x0 + (r >> p.lmp);
        if (a < p.nx && i < p.m) store_weight(p, (a * p.m + i) * p.ldw + b * p.n + j, sm.c[r][c]);
      }
    }
    __syncthreads();  // the next tile overwrites sm
  }
}

int log2_pow2_at_least(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

template <typename T>
std::string launch_status(const char* kernel) {
  return launch_error(
      [&] { return std::string("smooth_chamfer ") + kernel + "<" + DtypeName<T>::value + ">"; });
}

// Sizes the kernels cannot take, as a message; empty when they can.
std::string check_sizes(const char* op, int dtype, int64_t nx, int64_t ny, int m, int n, int64_t d,
                        float t, float den, int64_t ld, const char* ld_name) {
  const std::string where = std::string("smooth_chamfer ") + op + ": ";
  if (dtype < 0 || dtype > 2)
    return where + "dtype code " + std::to_string(dtype) +
           " is not 0 (float32), 1 (float16) or 2 (bfloat16)";
  if (m < 1 || m > kMaxSetSize || n < 1 || n > kMaxSetSize)
    return where + "set sizes m = " + std::to_string(m) + ", n = " + std::to_string(n) +
           "; both must be in 1.." + std::to_string(kMaxSetSize);
  if (d < 1 || d > INT_MAX - 2 * kTile)
    return where + "D = " + std::to_string(d) + "; must be in 1.." +
           std::to_string(INT_MAX - 2 * kTile);
  if (nx < 0 || ny < 0)
    return where + "negative set count (NX = " + std::to_string(nx) +
           ", NY = " + std::to_string(ny) + ")";
  if (!(t > 0.f) || !(den > 0.f) || !std::isfinite(t) || !std::isfinite(den))
    return where + "temperature and denominator must be positive and finite";
  if (ld < ny)
    return where + ld_name + " = " + std::to_string(ld) + " is less than NY = " +
           std::to_string(ny);
  return {};
}

template <typename T>
Args<T> make_args(const void* x, const void* y, int64_t nx, int64_t ny, int m, int n, int64_t d,
                  const uint8_t* xm, const uint8_t* ym, float t, float den) {
  Args<T> a{};
  a.x = static_cast<const T*>(x);
  a.y = static_cast<const T*>(y);
  a.xm = xm;
  a.ym = ym;
  a.nx = nx;
  a.ny = ny;
  a.d = static_cast<int>(d);
  a.m = m;
  a.n = n;
  a.lmp = log2_pow2_at_least(m);
  a.lnp = log2_pow2_at_least(n);
  a.scale2 = static_cast<float>(static_cast<double>(t) * M_LOG2E);
  a.out_scale = static_cast<float>(M_LN2 / (static_cast<double>(den) * t));
  a.inv_den = static_cast<float>(1.0 / den);
  constexpr int per16 = 16 / sizeof(T);
  a.vec = d % per16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(y) % 16 == 0;
  return a;
}

unsigned grid_for(int64_t nx, int64_t ny, int lmp, int lnp) {
  const int64_t bm = kTile >> lmp, bn = kTile >> lnp;
  const int64_t tiles = ((nx + bm - 1) / bm) * ((ny + bn - 1) / bn);
  return static_cast<unsigned>(std::min<int64_t>(tiles, INT_MAX));
}

template <typename T>
std::string forward_typed(const Args<T>& a, cudaStream_t stream) {
  forward_fused_kernel<T><<<grid_for(a.nx, a.ny, a.lmp, a.lnp), kThreads, 0, stream>>>(a);
  return launch_status<T>("forward_fused_kernel");
}

template <typename T>
std::string weights_typed(const Args<T>& a, cudaStream_t stream) {
  weights_kernel<T><<<grid_for(a.nx, a.ny, a.lmp, a.lnp), kThreads, 0, stream>>>(a);
  return launch_status<T>("weights_kernel");
}

}  // namespace

std::string smooth_chamfer_forward_fused_cuda(const void* x, const void* y, int dtype, int64_t nx,
                                              int64_t ny, int m, int n, int64_t d,
                                              const uint8_t* x_mask, const uint8_t* y_mask,
                                              float t, float den, float* s, int64_t lds,
                                              uintptr_t stream, bool tf32) {
  std::string err = check_sizes("forward_fused", dtype, nx, ny, m, n, d, t, den, lds, "lds");
  if (!err.empty()) return err;
  if (nx == 0 || ny == 0) return {};
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto a = make_args<T>(x, y, nx, ny, m, n, d, x_mask, y_mask, t, den);
    a.s = s, a.lds = lds, a.tf32 = tf32;  // read for float only
    return forward_typed(a, st);
  });
}

std::string smooth_chamfer_backward_weights_cuda(const void* x, const void* y, int dtype,
                                                 int64_t nx, int64_t ny, int m, int n, int64_t d,
                                                 const uint8_t* x_mask, const uint8_t* y_mask,
                                                 float t, float den, const float* g, int64_t ldg,
                                                 void* w_hi, void* w_lo, int64_t ldw,
                                                 uintptr_t stream) {
  std::string err = check_sizes("backward_weights", dtype, nx, ny, m, n, d, t, den, ldg, "ldg");
  if (!err.empty()) return err;
  if (ldw < ny * n)
    return "smooth_chamfer backward_weights: ldw = " + std::to_string(ldw) +
           " is less than NY * n = " + std::to_string(ny * n);
  if (dtype != 0 && !w_lo)
    return "smooth_chamfer backward_weights: 16-bit inputs need w_lo";
  if (nx == 0 || ny == 0) return {};
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto a = make_args<T>(x, y, nx, ny, m, n, d, x_mask, y_mask, t, den);
    a.g = g, a.ldg = ldg, a.w_hi = w_hi, a.w_lo = w_lo, a.ldw = ldw;
    return weights_typed(a, st);
  });
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace dive
