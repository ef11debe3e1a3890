// Per-pair smooth-Chamfer epilogue of the CPU build, in the exact form the CUDA kernels follow too.
//
// A "pair" is one x set (m rows) against one y set (n columns) of a cosine block C that a GEMM
// has already produced (row-major, leading dimension ldc). This is the exact form: one max per
// row and per column, so it never underflows; the CPU fast path uses it as its fallback.
#pragma once
#include <cstdint>
#include <math.h>

#include "set_size.h"

namespace dive {

// Forward value S(a, b) of one pair. xm/ym: 0/1 validity per row/column, or null (all valid).
inline float pair_forward_exact(const float* c, int64_t ldc, int m, int n, const uint8_t* xm,
                                const uint8_t* ym, float t, float den) {
  float row_total = 0.f, col_total = 0.f;
  int rows = 0, cols = 0;
  for (int i = 0; i < m; ++i) {
    if (xm && !xm[i]) continue;
    float mx = -INFINITY;
    for (int j = 0; j < n; ++j)
      if (!ym || ym[j]) mx = fmaxf(mx, c[i * ldc + j]);
    float s = 0.f;
    for (int j = 0; j < n; ++j)
      if (!ym || ym[j]) s += expf(t * (c[i * ldc + j] - mx));
    row_total += t * mx + logf(s);
    ++rows;
  }
  for (int j = 0; j < n; ++j) {
    if (ym && !ym[j]) continue;
    float mx = -INFINITY;
    for (int i = 0; i < m; ++i)
      if (!xm || xm[i]) mx = fmaxf(mx, c[i * ldc + j]);
    float s = 0.f;
    for (int i = 0; i < m; ++i)
      if (!xm || xm[i]) s += expf(t * (c[i * ldc + j] - mx));
    col_total += t * mx + logf(s);
    ++cols;
  }
  return (row_total / rows + col_total / cols) / (den * t);
}

// Backward of one pair, in place: c holds cosines on entry and the weights
// W_ij = g * (P_ij / m + Q_ij / n) / den on return (0 on masked rows/columns).
inline void pair_backward_exact(float* c, int64_t ldc, int m, int n, const uint8_t* xm,
                                const uint8_t* ym, float t, float den, float g) {
  int rows = 0, cols = 0;
  for (int i = 0; i < m; ++i) rows += (!xm || xm[i]);
  for (int j = 0; j < n; ++j) cols += (!ym || ym[j]);
  // Column statistics first: the row pass below overwrites c.
  float col_max[kMaxSetSize], col_sum[kMaxSetSize];
  for (int j = 0; j < n; ++j) {
    float mx = -INFINITY, s = 0.f;
    if (!ym || ym[j]) {
      for (int i = 0; i < m; ++i)
        if (!xm || xm[i]) mx = fmaxf(mx, c[i * ldc + j]);
      for (int i = 0; i < m; ++i)
        if (!xm || xm[i]) s += expf(t * (c[i * ldc + j] - mx));
    }
    col_max[j] = mx;
    col_sum[j] = s;
  }
  const float wr = g / (den * rows), wc = g / (den * cols);
  for (int i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (xm && !xm[i]) {
      for (int j = 0; j < n; ++j) row[j] = 0.f;
      continue;
    }
    float mx = -INFINITY, s = 0.f;
    for (int j = 0; j < n; ++j)
      if (!ym || ym[j]) mx = fmaxf(mx, row[j]);
    for (int j = 0; j < n; ++j)
      if (!ym || ym[j]) s += expf(t * (row[j] - mx));
    for (int j = 0; j < n; ++j) {
      if (ym && !ym[j]) {
        row[j] = 0.f;
        continue;
      }
      const float p = expf(t * (row[j] - mx)) / s;
      const float q = expf(t * (row[j] - col_max[j])) / col_sum[j];
      row[j] = wr * p + wc * q;
    }
  }
}

}  // namespace dive
