// Fused CUDA DivE slot cross-attention, forward and backward (math: docs/design.md §2.3-2.4).
//
// One block of 256 threads owns one (b, h) and streams its tokens in tiles of 32, so the
// (K x N) attention never leaves the chip and dq needs no atomics. Each tile has two phases:
//  - row phase, one warp per token: a lane holds a slice of the token's d (or dv) columns and
//    dots it with every slot; a transposing butterfly leaves slot i's total in lanes
//    i * 32/KMAX .. (i+1) * 32/KMAX - 1, so the softmax over slots is a few shuffles more.
//    The per-token, per-slot weights go to a small shared tile.
//  - column phase, one thread per column pair: the tile's weights times the token rows,
//    accumulated per slot in registers (out in the forward, dq in the backward) or written
//    straight out per token (dk, dv).
// k and v are read straight from global memory, once per tile phase that needs them; q (and do
// in the backward), reused by every token, are staged in shared memory when they fit the copy
// budget, else read through the L1/L2 caches with the same generic-pointer code.
// Slots are padded to KMAX in {4, 8, 16, 32} so the per-slot arrays are registers; padded
// slots get probability 0 and are never stored. VEC = 2 loads column pairs (float2, half2,
// bfloat162) when d, dv and every pointer allow it, else VEC = 1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <initializer_list>

#include "cuda_common.cuh"
#include "slot_attention_cuda.h"

namespace dive {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;
constexpr int kMaxSlots = 32;
constexpr int kMaxDim = 512;
// q/do are staged in shared memory only below this, so several blocks still fit on an SM.
constexpr size_t kCopyBudget = 32 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Io;

template <>
struct Io<float> {
  __device__ static float load(const float* p) { return *p; }
  __device__ static void load2(const float* p, float& a, float& b) {
    const float2 x = *reinterpret_cast<const float2*>(p);
    a = x.x;
    b = x.y;
  }
  __device__ static void store(float* p, float a) { *p = a; }
  __device__ static void store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
};

template <>
struct Io<__half> {
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void load2(const __half* p, float& a, float& b) {
    const __half2 x = *reinterpret_cast<const __half2*>(p);
    a = __low2float(x);
    b = __high2float(x);
  }
  __device__ static void store(__half* p, float a) { *p = __float2half_rn(a); }
  __device__ static void store2(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
};

template <>
struct Io<__nv_bfloat16> {
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void load2(const __nv_bfloat16* p, float& a, float& b) {
    const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(p);
    a = __low2float(x);
    b = __high2float(x);
  }
  __device__ static void store(__nv_bfloat16* p, float a) { *p = __float2bfloat16_rn(a); }
  __device__ static void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
};

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[VEC]) {
  if constexpr (VEC == 1) {
    x[0] = Io<T>::load(p);
  } else {
    Io<T>::load2(p, x[0], x[1]);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[VEC]) {
  if constexpr (VEC == 1) {
    Io<T>::store(p, x[0]);
  } else {
    Io<T>::store2(p, x[0], x[1]);
  }
}

__host__ __device__ constexpr int log2_exact(int x) { return x <= 1 ? 0 : 1 + log2_exact(x / 2); }

// Lanes that share one slot after reduce_slots: slot = lane >> lane_shift.
template <int KMAX>
__host__ __device__ constexpr int lane_shift() {
  return 5 - log2_exact(KMAX);
}

// Blocks per SM each kernel is compiled for: a register budget (65536 / 256 / blocks) that the
// per-slot accumulators fit without spilling, so ptxas does not trade a spill for occupancy.
template <int KMAX>
__host__ __device__ constexpr int min_blocks() {
  return KMAX <= 8 ? 3 : KMAX <= 16 ? 2 : 1;
}

// The backward's extra do.out pass needs a few more registers at KMAX = 8.
template <int KMAX>
__host__ __device__ constexpr int min_blocks_backward() {
  return KMAX <= 4 ? 3 : KMAX <= 16 ? 2 : 1;
}

// Column chunks (of VEC columns) one thread owns in the column phase.
template <int VEC>
__host__ __device__ constexpr int thread_chunks() {
  return (kMaxDim / VEC + kThreads - 1) / kThreads;
}

// Sums each of the KMAX per-lane partials over the warp: halving the array at each butterfly
// step (KMAX - 1 shuffles in all instead of 5 * KMAX), then plain steps over the lanes that
// share a slot. Returns slot (lane >> lane_shift) 's total.
template <int N, int KMAX>
__device__ __forceinline__ void halve_slots(float (&v)[KMAX], int lane) {
  if constexpr (N > 1) {
    constexpr int half = N / 2;
    constexpr int mask = half << lane_shift<KMAX>();
    const bool upper = lane & mask;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float send = upper ? v[j] : v[j + half];
      const float keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(kFullMask, send, mask);
    }
    halve_slots<half, KMAX>(v, lane);
  }
}

template <int KMAX>
__device__ __forceinline__ float reduce_slots(float (&v)[KMAX], int lane) {
  halve_slots<KMAX, KMAX>(v, lane);
  float x = v[0];
#pragma unroll
  for (int mask = (1 << lane_shift<KMAX>()) >> 1; mask > 0; mask >>= 1)
    x += __shfl_xor_sync(kFullMask, x, mask);
  return x;
}

// Sum over slots of a per-slot lane value (lanes of one slot hold the same value): the xor
// steps over the slot bits of the lane index only, so each slot counts once.
template <int KMAX>
__device__ __forceinline__ float sum_over_slots(float x) {
#pragma unroll
  for (int mask = 16; mask >= (1 << lane_shift<KMAX>()); mask >>= 1)
    x += __shfl_xor_sync(kFullMask, x, mask);
  return x;
}

// Max over slots that keeps a NaN (fmaxf drops it): a NaN score makes its token's column NaN,
// as in the reference.
template <int KMAX>
__device__ __forceinline__ float max_over_slots(float x) {
#pragma unroll
  for (int mask = 16; mask >= (1 << lane_shift<KMAX>()); mask >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, x, mask);
    x = (x > other || x != x) ? x : other;
  }
  return x;
}

// Max-shifted softmax over the real slots of one token; padded slots get exactly 0.
template <int KMAX>
__device__ __forceinline__ float slot_softmax(float s, bool real_slot) {
  const float top = max_over_slots<KMAX>(real_slot ? s : -INFINITY);
  const float e = real_slot ? expf(s - top) : 0.f;
  return e / sum_over_slots<KMAX>(e);
}

// rows (slots x len, row-major) dotted with x (len): every lane gets the total of its slot
// (lane >> lane_shift), 0 for padded slots. Called by a whole warp.
template <typename T, int KMAX, int VEC>
__device__ __forceinline__ float slot_dots(const T* rows, const T* x, int len, int slots,
                                           int lane) {
  // x chunks loaded ahead of their use, as many as the per-slot partials leave registers for.
  constexpr int kBatch = KMAX >= 16 ? 1 : 16 / KMAX;
  const int chunks = len / VEC;
  float part[KMAX];
#pragma unroll
  for (int i = 0; i < KMAX; ++i) part[i] = 0.f;
#pragma unroll 1
  for (int base = lane; base < chunks; base += 32 * kBatch) {
    float xr[kBatch][VEC];
#pragma unroll
    for (int m = 0; m < kBatch; ++m) {
      const int ch = base + 32 * m;
      if (ch < chunks) {
        load_vec<VEC>(x + ch * VEC, xr[m]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) xr[m][e] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < kBatch; ++m) {
      const int ch = base + 32 * m;
      if (ch >= chunks) break;
#pragma unroll
      for (int i = 0; i < KMAX; ++i) {
        if (i < slots) {
          float rv[VEC];
          load_vec<VEC>(rows + i * len + ch * VEC, rv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) part[i] = fmaf(rv[e], xr[m][e], part[i]);
        }
      }
    }
  }
  return reduce_slots<KMAX>(part, lane);
}

template <typename T>
__device__ __forceinline__ void copy_rows(T* dst, const T* src, int count) {
  for (int idx = threadIdx.x; idx < count; idx += kThreads) dst[idx] = src[idx];
}

constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Shared memory: fp32 tiles first, then (16-byte aligned) the optional copies in T.
template <int KMAX>
struct ForwardLayout {
  // prob[kTile][KMAX], r_part[kWarps][KMAX], r_total[KMAX], real[kTile]
  static constexpr size_t tile_bytes =
      align16(sizeof(float) * (kTile * KMAX + kWarps * KMAX + KMAX) + sizeof(int) * kTile);
};

template <int KMAX>
struct BackwardLayout {
  // weight[kTile][KMAX], dscore[kTile][KMAX], out_dot[KMAX], real[kTile]
  static constexpr size_t tile_bytes =
      align16(sizeof(float) * (2 * kTile * KMAX + KMAX) + sizeof(int) * kTile);
};

template <typename T>
struct ForwardArgs {
  const T* q;
  const T* k;
  const T* v;
  const uint8_t* mask;
  T* out;
  float* r;
  int heads, slots, tokens, d, dv;
  float scale, eps;
  bool copy_q;
};

template <typename T>
struct BackwardArgs {
  const T* dout;
  const T* q;
  const T* k;
  const T* v;
  const T* out;
  const float* r;
  const uint8_t* mask;
  T* dq;
  T* dk;
  T* dv;
  int heads, slots, tokens, d, dv_dim;
  float scale;
  bool copy_q_do;
};

template <typename T, int KMAX, int VEC>
__global__ void __launch_bounds__(kThreads, min_blocks<KMAX>()) forward_kernel(const ForwardArgs<T> a) {
  constexpr int kShift = lane_shift<KMAX>();
  constexpr int kChunks = thread_chunks<VEC>();
  extern __shared__ __align__(16) unsigned char smem[];
  float* prob = reinterpret_cast<float*>(smem);
  float* r_part = prob + kTile * KMAX;
  float* r_total = r_part + kWarps * KMAX;
  int* real = reinterpret_cast<int*>(r_total + KMAX);
  T* q_copy = reinterpret_cast<T*>(smem + ForwardLayout<KMAX>::tile_bytes);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = lane >> kShift;
  const bool slot_writer = (lane & ((1 << kShift) - 1)) == 0;
  const int K = a.slots, N = a.tokens, d = a.d, dv = a.dv;
  const int64_t bh = blockIdx.x;
  const T* q = a.q + bh * K * d;
  const T* k = a.k + bh * N * d;
  const T* v = a.v + bh * N * dv;
  const uint8_t* mask = a.mask ? a.mask + bh / a.heads * N : nullptr;

  if (a.copy_q) copy_rows(q_copy, q, K * d);
  const T* qs = a.copy_q ? q_copy : q;
  __syncthreads();

  float acc[kChunks][KMAX][VEC];
#pragma unroll
  for (int j = 0; j < kChunks; ++j)
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[j][i][e] = 0.f;
  float r_lane = 0.f;  // this warp's share of sum_n A_in, slot = lane >> kShift

  for (int n0 = 0; n0 < N; n0 += kTile) {
    const int tile = min(kTile, N - n0);
    for (int t = warp; t < tile; t += kWarps) {
      const int n = n0 + t;
      const bool is_real = !mask || mask[n];
      float p = 0.f;
      if (is_real) {
        const float s = a.scale * slot_dots<T, KMAX, VEC>(qs, k + int64_t(n) * d, d, K, lane);
        p = slot_softmax<KMAX>(s, slot < K);
      }
      r_lane += p;
      if (slot_writer) prob[t * KMAX + slot] = p;
      if (lane == 0) real[t] = is_real;
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int ch = tid + j * kThreads;
      if (ch >= dv / VEC) break;
#pragma unroll 4
      for (int t = 0; t < tile; ++t) {
        if (!real[t]) continue;  // its v row may hold anything, even NaN
        float x[VEC];
        load_vec<VEC>(v + int64_t(n0 + t) * dv + ch * VEC, x);
#pragma unroll
        for (int i = 0; i < KMAX; ++i) {
          if (i < K) {
            const float p = prob[t * KMAX + i];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[j][i][e] = fmaf(p, x[e], acc[j][i][e]);
          }
        }
      }
    }
    __syncthreads();  // the next tile's row phase overwrites prob and real
  }

  if (slot_writer) r_part[warp * KMAX + slot] = r_lane;
  __syncthreads();
  if (tid < K) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += r_part[w * KMAX + tid];
    total += a.eps;
    r_total[tid] = total;
    a.r[bh * K + tid] = total;
  }
  __syncthreads();

  T* out = a.out + bh * K * dv;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int ch = tid + j * kThreads;
    if (ch >= dv / VEC) break;
#pragma unroll
    for (int i = 0; i < KMAX; ++i) {
      if (i < K) {
        const float r = r_total[i];
        float y[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) y[e] = acc[j][i][e] / r;
        store_vec<VEC>(out + i * dv + ch * VEC, y);
      }
    }
  }
}

template <typename T, int KMAX, int VEC>
__global__ void __launch_bounds__(kThreads, min_blocks_backward<KMAX>()) backward_kernel(
    const BackwardArgs<T> a) {
  constexpr int kShift = lane_shift<KMAX>();
  constexpr int kChunks = thread_chunks<VEC>();
  extern __shared__ __align__(16) unsigned char smem[];
  float* weight = reinterpret_cast<float*>(smem);  // A_in / r_i
  float* dscore = weight + kTile * KMAX;           // scale * ds_in
  float* out_dot = dscore + kTile * KMAX;          // do_i . out_i
  int* real = reinterpret_cast<int*>(out_dot + KMAX);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = lane >> kShift;
  const bool slot_writer = (lane & ((1 << kShift) - 1)) == 0;
  const int K = a.slots, N = a.tokens, d = a.d, dv = a.dv_dim;
  const int64_t bh = blockIdx.x;
  const T* q = a.q + bh * K * d;
  const T* dout = a.dout + bh * K * dv;
  const T* k = a.k + bh * N * d;
  const T* v = a.v + bh * N * dv;
  T* dk = a.dk + bh * N * d;
  T* dvg = a.dv + bh * N * dv;
  const uint8_t* mask = a.mask ? a.mask + bh / a.heads * N : nullptr;

  T* q_copy = reinterpret_cast<T*>(smem + BackwardLayout<KMAX>::tile_bytes);
  T* do_copy = q_copy + K * d;
  if (a.copy_q_do) {
    copy_rows(q_copy, q, K * d);
    copy_rows(do_copy, dout, K * dv);
  }
  const T* qs = a.copy_q_do ? q_copy : q;
  const T* dos = a.copy_q_do ? do_copy : dout;
  __syncthreads();

  const float r_lane = slot < K ? a.r[bh * K + slot] : 1.f;
  // do.out = sum_n (A_in / r_i) do.v_n, from fp32 terms rather than from the saved out: a
  // 16-bit out is rounded to T, and with few tokens do.(v_n - out_i) cancels to noise (in fp32
  // too, with a single real token and a wide dv).
  // The CPU backend does the same; the cost is one more pass over k and v. Each warp adds its
  // tokens into its own row of partials (in `weight`, unused until the token loop; one writer
  // lane per slot, so no atomics), then the rows are summed in a fixed order: the same bits
  // every run.
  static_assert(kWarps <= kTile, "the warp partials live in weight[kTile][KMAX]");
  if (slot_writer) weight[warp * KMAX + slot] = 0.f;
  for (int n = warp; n < N; n += kWarps) {
    if (mask && !mask[n]) continue;  // the same n for the whole warp: shuffles stay uniform
    const float s = a.scale * slot_dots<T, KMAX, VEC>(qs, k + int64_t(n) * d, d, K, lane);
    const float p = slot_softmax<KMAX>(s, slot < K);
    const float g = slot_dots<T, KMAX, VEC>(dos, v + int64_t(n) * dv, dv, K, lane);
    if (slot_writer && slot < K) weight[warp * KMAX + slot] += p * g / r_lane;
  }
  __syncthreads();
  for (int i = tid; i < KMAX; i += kThreads) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += weight[w * KMAX + i];
    out_dot[i] = total;
  }
  __syncthreads();
  const float out_dot_lane = slot < K ? out_dot[slot] : 0.f;

  float dq[kChunks][KMAX][VEC];
#pragma unroll
  for (int j = 0; j < kChunks; ++j)
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
#pragma unroll
      for (int e = 0; e < VEC; ++e) dq[j][i][e] = 0.f;

  for (int n0 = 0; n0 < N; n0 += kTile) {
    const int tile = min(kTile, N - n0);
    for (int t = warp; t < tile; t += kWarps) {
      const int n = n0 + t;
      const bool is_real = !mask || mask[n];
      float w = 0.f, ds = 0.f;
      if (is_real) {
        const float s = a.scale * slot_dots<T, KMAX, VEC>(qs, k + int64_t(n) * d, d, K, lane);
        const float p = slot_softmax<KMAX>(s, slot < K);
        const float g = slot_dots<T, KMAX, VEC>(dos, v + int64_t(n) * dv, dv, K, lane);
        const float dp = slot < K ? (g - out_dot_lane) / r_lane : 0.f;
        ds = a.scale * p * (dp - sum_over_slots<KMAX>(p * dp));
        w = p / r_lane;
      }
      if (slot_writer) {
        weight[t * KMAX + slot] = w;
        dscore[t * KMAX + slot] = ds;
      }
      if (lane == 0) real[t] = is_real;
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int ch = tid + j * kThreads;
      if (ch >= d / VEC) break;
#pragma unroll 2
      for (int t = 0; t < tile; ++t) {
        float g[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[e] = 0.f;
        if (real[t]) {  // masked rows: dk stays exactly 0 and their k (maybe NaN) is never read
          float x[VEC];
          load_vec<VEC>(k + int64_t(n0 + t) * d + ch * VEC, x);
#pragma unroll
          for (int i = 0; i < KMAX; ++i) {
            if (i < K) {
              const float ds = dscore[t * KMAX + i];
              float qv[VEC];
              load_vec<VEC>(qs + i * d + ch * VEC, qv);
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                g[e] = fmaf(ds, qv[e], g[e]);
                dq[j][i][e] = fmaf(ds, x[e], dq[j][i][e]);
              }
            }
          }
        }
        store_vec<VEC>(dk + int64_t(n0 + t) * d + ch * VEC, g);
      }
    }

#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int ch = tid + j * kThreads;
      if (ch >= dv / VEC) break;
#pragma unroll 2
      for (int t = 0; t < tile; ++t) {
        float g[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[e] = 0.f;
        if (real[t]) {
#pragma unroll
          for (int i = 0; i < KMAX; ++i) {
            if (i < K) {
              const float w = weight[t * KMAX + i];
              float dov[VEC];
              load_vec<VEC>(dos + i * dv + ch * VEC, dov);
#pragma unroll
              for (int e = 0; e < VEC; ++e) g[e] = fmaf(w, dov[e], g[e]);
            }
          }
        }
        store_vec<VEC>(dvg + int64_t(n0 + t) * dv + ch * VEC, g);
      }
    }
    __syncthreads();  // the next tile's row phase overwrites weight, dscore and real
  }

  T* dqg = a.dq + bh * K * d;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int ch = tid + j * kThreads;
    if (ch >= d / VEC) break;
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
      if (i < K) store_vec<VEC>(dqg + i * d + ch * VEC, dq[j][i]);
  }
}

template <typename T, int KMAX, int VEC>
std::string launch_status(const char* kernel) {
  return launch_error([&] {
    return std::string("slot_attention ") + kernel + "<" + DtypeName<T>::value +
           ", KMAX=" + std::to_string(KMAX) + ", VEC=" + std::to_string(VEC) + ">";
  });
}

template <typename T, int KMAX, int VEC>
std::string launch_forward(const ForwardArgs<T>& a, int64_t bh, cudaStream_t stream) {
  const size_t bytes =
      ForwardLayout<KMAX>::tile_bytes + (a.copy_q ? sizeof(T) * a.slots * a.d : 0);
  forward_kernel<T, KMAX, VEC><<<static_cast<unsigned>(bh), kThreads, bytes, stream>>>(a);
  return launch_status<T, KMAX, VEC>("forward_kernel");
}

template <typename T, int KMAX, int VEC>
std::string launch_backward(const BackwardArgs<T>& a, int64_t bh, cudaStream_t stream) {
  const size_t bytes = BackwardLayout<KMAX>::tile_bytes +
                       (a.copy_q_do ? sizeof(T) * a.slots * (a.d + a.dv_dim) : 0);
  backward_kernel<T, KMAX, VEC><<<static_cast<unsigned>(bh), kThreads, bytes, stream>>>(a);
  return launch_status<T, KMAX, VEC>("backward_kernel");
}

int slot_bucket(int64_t K) { return K <= 4 ? 4 : K <= 8 ? 8 : K <= 16 ? 16 : 32; }

// Calls fn with KMAX and VEC as compile-time constants.
template <int VEC, typename Fn>
std::string by_slots(int kmax, Fn&& fn) {
  switch (kmax) {
    case 4: return fn(std::integral_constant<int, 4>{}, std::integral_constant<int, VEC>{});
    case 8: return fn(std::integral_constant<int, 8>{}, std::integral_constant<int, VEC>{});
    case 16: return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, VEC>{});
    default: return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, VEC>{});
  }
}

bool pair_aligned(std::initializer_list<const void*> ptrs, size_t elem_bytes) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % (2 * elem_bytes) != 0) return false;
  return true;
}

// Sizes the kernels cannot take, as a message; empty when they can.
std::string check_sizes(const char* op, int64_t B, int64_t H, int64_t K, int64_t N, int64_t d,
                        int64_t dv, int dtype) {
  const std::string where = std::string("slot_attention ") + op + ": ";
  if (dtype < 0 || dtype > 2)
    return where + "dtype code " + std::to_string(dtype) +
           " is not 0 (float32), 1 (float16) or 2 (bfloat16)";
  if (K < 1 || K > kMaxSlots)
    return where + "K = " + std::to_string(K) + " slots; supported 1.." +
           std::to_string(kMaxSlots);
  if (d < 1 || d > kMaxDim || dv < 1 || dv > kMaxDim)
    return where + "d = " + std::to_string(d) + ", dv = " + std::to_string(dv) +
           "; both must be in 1.." + std::to_string(kMaxDim);
  if (B < 0 || H < 0 || N < 0)
    return where + "negative size (B = " + std::to_string(B) + ", H = " + std::to_string(H) +
           ", N = " + std::to_string(N) + ")";
  if (N > INT_MAX / kMaxDim)
    return where + "N = " + std::to_string(N) + " tokens is too many";
  if (H > 0 && B > INT_MAX / H)
    return where + "B * H = " + std::to_string(B) + " * " + std::to_string(H) +
           " exceeds the grid limit 2^31 - 1";
  return {};
}

template <typename T>
std::string forward_typed(const void* q, const void* k, const void* v, const uint8_t* key_mask,
                          void* out, float* r, int64_t B, int64_t H, int64_t K, int64_t N,
                          int64_t d, int64_t dv, float scale, float eps, cudaStream_t stream) {
  ForwardArgs<T> a{static_cast<const T*>(q), static_cast<const T*>(k),
                   static_cast<const T*>(v), key_mask, static_cast<T*>(out), r,
                   static_cast<int>(H), static_cast<int>(K), static_cast<int>(N),
                   static_cast<int>(d), static_cast<int>(dv), scale, eps, false};
  const bool pairs = d % 2 == 0 && dv % 2 == 0 && pair_aligned({q, k, v, out}, sizeof(T));
  const auto launch = [&](auto kmax, auto vec) -> std::string {
    a.copy_q = ForwardLayout<decltype(kmax)::value>::tile_bytes + sizeof(T) * K * d <=
               kCopyBudget;
    return launch_forward<T, decltype(kmax)::value, decltype(vec)::value>(a, B * H, stream);
  };
  const int kmax = slot_bucket(K);
  return pairs ? by_slots<2>(kmax, launch)
               : by_slots<1>(kmax, launch);
}

template <typename T>
std::string backward_typed(const void* dout, const void* q, const void* k, const void* v,
                           const void* out, const float* r, const uint8_t* key_mask, void* dq,
                           void* dk, void* dv, int64_t B, int64_t H, int64_t K, int64_t N,
                           int64_t d, int64_t dv_dim, float scale, cudaStream_t stream) {
  BackwardArgs<T> a{static_cast<const T*>(dout), static_cast<const T*>(q),
                    static_cast<const T*>(k),    static_cast<const T*>(v),
                    static_cast<const T*>(out),  r,
                    key_mask,                    static_cast<T*>(dq),
                    static_cast<T*>(dk),         static_cast<T*>(dv),
                    static_cast<int>(H),         static_cast<int>(K),
                    static_cast<int>(N),         static_cast<int>(d),
                    static_cast<int>(dv_dim),    scale,
                    false};
  const bool pairs = d % 2 == 0 && dv_dim % 2 == 0 &&
                     pair_aligned({dout, q, k, v, out, dq, dk, dv}, sizeof(T));
  const auto launch = [&](auto kmax, auto vec) -> std::string {
    a.copy_q_do = BackwardLayout<decltype(kmax)::value>::tile_bytes +
                      sizeof(T) * K * (d + dv_dim) <=
                  kCopyBudget;
    return launch_backward<T, decltype(kmax)::value, decltype(vec)::value>(a, B * H, stream);
  };
  const int kmax = slot_bucket(K);
  return pairs ? by_slots<2>(kmax, launch)
               : by_slots<1>(kmax, launch);
}

}  // namespace

std::string slot_attention_forward_cuda(const void* q, const void* k, const void* v,
                                        const uint8_t* key_mask, void* out, float* r, int64_t B,
                                        int64_t H, int64_t K, int64_t N, int64_t d, int64_t dv,
                                        float scale, float eps, int dtype, uintptr_t stream) {
  std::string err = check_sizes("forward", B, H, K, N, d, dv, dtype);
  if (!err.empty()) return err;
  if (B * H == 0 || N == 0) return {};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return forward_typed<T>(q, k, v, key_mask, out, r, B, H, K, N, d, dv, scale, eps, s);
  });
}

std::string slot_attention_backward_cuda(const void* dout, const void* q, const void* k,
                                         const void* v, const void* out, const float* r,
                                         const uint8_t* key_mask, void* dq, void* dk, void* dv,
                                         int64_t B, int64_t H, int64_t K, int64_t N, int64_t d,
                                         int64_t dv_dim, float scale, float eps, int dtype,
                                         uintptr_t stream) {
  std::string err = check_sizes("backward", B, H, K, N, d, dv_dim, dtype);
  if (!err.empty()) return err;
  if (B * H == 0 || N == 0) return {};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return backward_typed<T>(dout, q, k, v, out, r, key_mask, dq, dk, dv, B, H, K, N, d, dv_dim,
                             scale, s);
  });
}

}  // namespace dive
