// CPU slot cross-attention epilogues: the slot softmax runs down each token's column of K
// scores, so the loops run over tokens (contiguous) with the slots outside, and vectorise.
#include "slot_attention_cpu.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu_math.h"

namespace dive {
namespace {

using cpu_math::exp_nonpos;

// a (K, N) <- slot softmax of scale * s per column, in place; masked columns -> 0. top, sum: (N)
// scratch. The scaled scores are stored once and both the max and the exps read them: computed
// twice, one product may be contracted into an FMA and the other not, which at a large scale
// puts the "max" above a score by thousands. A NaN score makes its column NaN.
DIVE_CLONES void slot_softmax(float* a, const uint8_t* mask, int64_t K, int64_t N, float scale,
                              float* top, float* sum) {
  for (int64_t i = 0; i < K * N; ++i) a[i] *= scale;
  for (int64_t n = 0; n < N; ++n) top[n] = a[n];
  for (int64_t i = 1; i < K; ++i)
    for (int64_t n = 0; n < N; ++n) top[n] = std::max(top[n], a[i * N + n]);
  std::fill(sum, sum + N, 0.f);
  for (int64_t i = 0; i < K; ++i)
    for (int64_t n = 0; n < N; ++n) {
      const float e = exp_nonpos(a[i * N + n] - top[n]);
      a[i * N + n] = e;
      sum[n] += e;
    }
  for (int64_t n = 0; n < N; ++n) sum[n] = 1.f / sum[n];
  for (int64_t i = 0; i < K; ++i)
    for (int64_t n = 0; n < N; ++n) a[i * N + n] *= sum[n];
  if (!mask) return;
  // A select, not a product: whatever a padded token holds, its weight is exactly 0.
  for (int64_t i = 0; i < K; ++i)
    for (int64_t n = 0; n < N; ++n) a[i * N + n] = mask[n] ? a[i * N + n] : 0.f;
}

}  // namespace

void slot_attention_forward_epilogue(float* s, const uint8_t* key_mask, float* r, int64_t BH,
                                     int64_t H, int64_t K, int64_t N, float scale, float eps) {
#pragma omp parallel
  {
    std::vector<float> scratch(2 * N);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      float* a = s + bh * K * N;
      const uint8_t* mask = key_mask ? key_mask + (bh / H) * N : nullptr;
      slot_softmax(a, mask, K, N, scale, scratch.data(), scratch.data() + N);
      for (int64_t i = 0; i < K; ++i) {
        float total = eps;
        for (int64_t n = 0; n < N; ++n) total += a[i * N + n];
        r[bh * K + i] = total;
        const float inv = 1.f / total;
        for (int64_t n = 0; n < N; ++n) a[i * N + n] *= inv;
      }
    }
  }
}

void slot_attention_backward_epilogue(float* s, float* dov, const float* r,
                                      const uint8_t* key_mask, int64_t BH, int64_t H, int64_t K,
                                      int64_t N, float scale) {
#pragma omp parallel
  {
    std::vector<float> scratch(3 * N);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      float* a = s + bh * K * N;
      float* g = dov + bh * K * N;
      const uint8_t* mask = key_mask ? key_mask + (bh / H) * N : nullptr;
      float* mix = scratch.data() + 2 * N;
      slot_softmax(a, mask, K, N, scale, scratch.data(), scratch.data() + N);
      std::fill(mix, mix + N, 0.f);
      for (int64_t i = 0; i < K; ++i) {
        // do_i . out_i = sum_n (A_in / r_i) do_i . v_n, from fp32 terms: the saved out is
        // rounded to the input dtype, and with few tokens do . (v_n - out_i) cancels.
        const float inv_r = 1.f / r[bh * K + i];
        float di = 0.f;
        for (int64_t n = 0; n < N; ++n) di += a[i * N + n] * g[i * N + n];
        di *= inv_r;
        for (int64_t n = 0; n < N; ++n) {
          g[i * N + n] = (g[i * N + n] - di) * inv_r;  // dA
          mix[n] += a[i * N + n] * g[i * N + n];
        }
      }
      for (int64_t i = 0; i < K; ++i) {
        const float inv_r = 1.f / r[bh * K + i];
        for (int64_t n = 0; n < N; ++n) {
          const float ai = a[i * N + n];
          a[i * N + n] = scale * ai * (g[i * N + n] - mix[n]);
          g[i * N + n] = ai * inv_r;
        }
      }
    }
  }
}

}  // namespace dive
