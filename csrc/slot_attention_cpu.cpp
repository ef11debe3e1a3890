// CPU slot cross-attention: one OpenMP task per (b, h), one pass over its tokens.
//
// Each token's K scores are a handful of dot products, so the work is streaming k and v through
// short vectorised dot/axpy loops; the per-token slot softmax touches only K numbers.
#include "slot_attention_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dive {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DIVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIVE_CLONES
#endif

// Lane-wise partial sums: without -ffast-math a plain float reduction would not vectorise.
inline float dot(const float* a, const float* b, int64_t len) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[c + l] * b[c + l];
  for (; c < len; ++c) lanes[0] += a[c] * b[c];
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t len) {
  for (int64_t c = 0; c < len; ++c) y[c] += alpha * x[c];
}

// a[i] = softmax over i of scale * q_i . k_n (max-shifted).
inline void slot_softmax(const float* q, const float* kn, int64_t K, int64_t d, float scale,
                         float* a) {
  float top = -INFINITY;
  for (int64_t i = 0; i < K; ++i) {
    a[i] = scale * dot(q + i * d, kn, d);
    top = std::max(top, a[i]);
  }
  float total = 0.f;
  for (int64_t i = 0; i < K; ++i) total += (a[i] = std::exp(a[i] - top));
  const float inv = 1.f / total;
  for (int64_t i = 0; i < K; ++i) a[i] *= inv;
}

struct Dims {
  int64_t B, H, K, N, d, dv;
};

DIVE_CLONES void forward_one(const float* q, const float* k, const float* v, const uint8_t* mask,
                             float* out, float* r, const Dims& s, float scale, float eps,
                             float* a) {
  std::fill(out, out + s.K * s.dv, 0.f);
  std::fill(r, r + s.K, 0.f);
  for (int64_t n = 0; n < s.N; ++n) {
    if (mask && !mask[n]) continue;
    slot_softmax(q, k + n * s.d, s.K, s.d, scale, a);
    for (int64_t i = 0; i < s.K; ++i) {
      r[i] += a[i];
      axpy(a[i], v + n * s.dv, out + i * s.dv, s.dv);
    }
  }
  for (int64_t i = 0; i < s.K; ++i) {
    r[i] += eps;
    const float inv = 1.f / r[i];
    for (int64_t c = 0; c < s.dv; ++c) out[i * s.dv + c] *= inv;
  }
}

// Scratch per thread: a, delta, da (K each).
DIVE_CLONES void backward_one(const float* dout, const float* q, const float* k, const float* v,
                              const float* out, const float* r, const uint8_t* mask, float* dq,
                              float* dk, float* dvg, const Dims& s, float scale, float* a,
                              float* delta, float* da) {
  std::fill(dq, dq + s.K * s.d, 0.f);
  for (int64_t i = 0; i < s.K; ++i) delta[i] = dot(dout + i * s.dv, out + i * s.dv, s.dv);
  for (int64_t n = 0; n < s.N; ++n) {
    float* dkn = dk + n * s.d;
    float* dvn = dvg + n * s.dv;
    std::fill(dkn, dkn + s.d, 0.f);
    std::fill(dvn, dvn + s.dv, 0.f);
    if (mask && !mask[n]) continue;
    const float* kn = k + n * s.d;
    const float* vn = v + n * s.dv;
    slot_softmax(q, kn, s.K, s.d, scale, a);
    float mix = 0.f;  // sum_i A_i dA_i
    for (int64_t i = 0; i < s.K; ++i) {
      da[i] = (dot(dout + i * s.dv, vn, s.dv) - delta[i]) / r[i];
      mix += a[i] * da[i];
      axpy(a[i] / r[i], dout + i * s.dv, dvn, s.dv);
    }
    for (int64_t i = 0; i < s.K; ++i) {
      const float ds = scale * a[i] * (da[i] - mix);
      axpy(ds, q + i * s.d, dkn, s.d);
      axpy(ds, kn, dq + i * s.d, s.d);
    }
  }
}

}  // namespace

void slot_attention_forward(const float* q, const float* k, const float* v,
                            const uint8_t* key_mask, float* out, float* r, int64_t B, int64_t H,
                            int64_t K, int64_t N, int64_t d, int64_t dv, float scale, float eps) {
  const Dims s{B, H, K, N, d, dv};
#pragma omp parallel
  {
    std::vector<float> a(K);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H;
      forward_one(q + bh * K * d, k + bh * N * d, v + bh * N * dv,
                  key_mask ? key_mask + b * N : nullptr, out + bh * K * dv, r + bh * K, s, scale,
                  eps, a.data());
    }
  }
}

void slot_attention_backward(const float* dout, const float* q, const float* k, const float* v,
                             const float* out, const float* r, const uint8_t* key_mask, float* dq,
                             float* dk, float* dv_grad, int64_t B, int64_t H, int64_t K, int64_t N,
                             int64_t d, int64_t dv, float scale) {
  const Dims s{B, H, K, N, d, dv};
#pragma omp parallel
  {
    std::vector<float> scratch(3 * K);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H;
      backward_one(dout + bh * K * dv, q + bh * K * d, k + bh * N * d, v + bh * N * dv,
                   out + bh * K * dv, r + bh * K, key_mask ? key_mask + b * N : nullptr,
                   dq + bh * K * d, dk + bh * N * d, dv_grad + bh * N * dv, s, scale,
                   scratch.data(), scratch.data() + K, scratch.data() + 2 * K);
    }
  }
}

}  // namespace dive
