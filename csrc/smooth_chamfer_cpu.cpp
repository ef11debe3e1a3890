// CPU smooth-Chamfer epilogue over a cosine block produced by a torch GEMM.
//
// Fast path: one shared max per (x set, y set) pair, so every cosine costs one exp and the row
// and column sums come from the same exps; loops run over whole contiguous rows of the block so
// they vectorise. A pair whose row or column sum falls below 2^-100 (T * spread beyond ~69 nats)
// would lose precision that way and is redone with the exact per-row/per-column form.
#include "smooth_chamfer_cpu.h"

#include <omp.h>

#include <cfloat>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "smooth_chamfer_common.h"

namespace dive {
namespace {

using cpu_math::exp_nonpos;
using cpu_math::log_pos;

constexpr float kTiny = 7.888609052210118e-31f;  // 2^-100

// Minimum of v[0..len); lane-wise so it vectorises without -ffast-math.
inline float min_of(const float* v, int64_t len) {
  constexpr int kLanes = 16;
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = FLT_MAX;
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = v[k + l] < lanes[l] ? v[k + l] : lanes[l];
  for (; k < len; ++k) lanes[0] = v[k] < lanes[0] ? v[k] : lanes[0];
  float lowest = FLT_MAX;
  for (int l = 0; l < kLanes; ++l) lowest = lanes[l] < lowest ? lanes[l] : lowest;
  return lowest;
}

struct Block {
  float* c;
  int64_t ldc;
  int64_t bx, by;
  int m, n;
  const uint8_t* xm;  // (bx, m) or null
  const uint8_t* ym;  // (by, n) or null
  float t, den;
  int64_t cols() const { return by * n; }
};

// Per-block facts about the y sets, shared by all threads.
struct YInfo {
  std::vector<float> valid;  // (by * n): 1 for a real element, 0 for padding
  std::vector<int> count;    // (by): real elements per y set
  explicit YInfo(const Block& blk) : valid(blk.cols(), 1.f), count(blk.by, blk.n) {
    if (!blk.ym) return;
    for (int64_t b = 0; b < blk.by; ++b) {
      count[b] = 0;
      for (int j = 0; j < blk.n; ++j) {
        valid[b * blk.n + j] = blk.ym[b * blk.n + j] ? 1.f : 0.f;
        count[b] += blk.ym[b * blk.n + j] != 0;
      }
    }
  }
};

// Scratch of one thread for one x set.
struct Scratch {
  std::vector<float> shift, e, col_sum, row_sum, log_col;
  std::vector<int> rows;  // indices of the x set's real rows
  std::vector<uint8_t> exact;
  Scratch(const Block& blk)
      : shift(blk.cols()), e(blk.m * blk.cols()), col_sum(blk.cols()), row_sum(blk.m * blk.by),
        log_col(blk.cols()), exact(blk.by) {
    rows.reserve(blk.m);
  }
};

// Shared-max exps of x set a against every y set of the block; fills sc and returns the number of
// real rows. Pairs flagged in sc.exact need the exact routine.
template <int N>
DIVE_CLONES int exps_for_set(const Block& blk, const YInfo& yi, int64_t a, Scratch& sc) {
  const int64_t K = blk.cols();
  const int n = N ? N : blk.n;
  const float* c = blk.c + a * blk.m * blk.ldc;
  const float* yv = yi.valid.data();
  float* shift = sc.shift.data();
  sc.rows.clear();
  for (int i = 0; i < blk.m; ++i)
    if (!blk.xm || blk.xm[a * blk.m + i]) sc.rows.push_back(i);
  const int R = static_cast<int>(sc.rows.size());

  // Column maxima over real rows, then one max per pair broadcast over its columns.
  for (int64_t k = 0; k < K; ++k) shift[k] = -FLT_MAX;
  for (int r = 0; r < R; ++r) {
    const float* row = c + sc.rows[r] * blk.ldc;
    for (int64_t k = 0; k < K; ++k) shift[k] = row[k] > shift[k] ? row[k] : shift[k];
  }
  for (int64_t k = 0; k < K; ++k) shift[k] = yv[k] != 0.f ? shift[k] : -FLT_MAX;
  for (int64_t b = 0; b < blk.by; ++b) {
    float mx = -FLT_MAX;
    for (int j = 0; j < n; ++j) mx = shift[b * n + j] > mx ? shift[b * n + j] : mx;
    for (int j = 0; j < n; ++j) shift[b * n + j] = mx;
  }

  float* col_sum = sc.col_sum.data();
  for (int64_t k = 0; k < K; ++k) col_sum[k] = 0.f;
  const float t = blk.t;
  for (int r = 0; r < R; ++r) {
    const float* row = c + sc.rows[r] * blk.ldc;
    float* e = sc.e.data() + r * K;
    for (int64_t k = 0; k < K; ++k) {
      // A select, not a product: a padding column may hold NaN or inf.
      const float v = yv[k] != 0.f ? exp_nonpos(t * (row[k] - shift[k])) : 0.f;
      e[k] = v;
      col_sum[k] += v;
    }
    float* rs = sc.row_sum.data() + r * blk.by;
    for (int64_t b = 0; b < blk.by; ++b) {
      float s = 0.f;
      for (int j = 0; j < n; ++j) s += e[b * n + j];
      rs[b] = s;
    }
  }

  // Padding columns get a sum of 1 so that they pass the check below; every later use
  // weights them by yv = 0.
  for (int64_t k = 0; k < K; ++k) col_sum[k] = yv[k] != 0.f ? col_sum[k] : 1.f;
  // Usually no sum is tiny: one vectorised minimum settles it for the whole row of pairs.
  const float lowest = std::min(min_of(sc.row_sum.data(), static_cast<int64_t>(R) * blk.by),
                                min_of(col_sum, K));
  if (lowest >= kTiny) {
    std::memset(sc.exact.data(), 0, blk.by);
    return R;
  }
  for (int64_t b = 0; b < blk.by; ++b) {
    bool bad = false;
    for (int r = 0; r < R; ++r) bad |= sc.row_sum[r * blk.by + b] < kTiny;
    for (int j = 0; j < n; ++j) bad |= col_sum[b * n + j] < kTiny;
    sc.exact[b] = bad;
  }
  return R;
}

template <int N>
DIVE_CLONES void forward_set(const Block& blk, const YInfo& yi, int64_t a, Scratch& sc,
                             float* s_row) {
  const int R = exps_for_set<N>(blk, yi, a, sc);
  const int64_t K = blk.cols();
  const int n = N ? N : blk.n;
  const float* yv = yi.valid.data();
  for (int64_t k = 0; k < K; ++k)
    sc.log_col[k] = yv[k] != 0.f ? log_pos(sc.col_sum[k]) : 0.f;
  // Written so that a NaN sum stays NaN (and its pair's score NaN).
  for (int64_t i = 0; i < static_cast<int64_t>(R) * blk.by; ++i)
    sc.row_sum[i] = log_pos(sc.row_sum[i] < FLT_MIN ? FLT_MIN : sc.row_sum[i]);

  const float scale = 1.f / (blk.den * blk.t);
  for (int64_t b = 0; b < blk.by; ++b) s_row[b] = 0.f;
  for (int r = 0; r < R; ++r)
    for (int64_t b = 0; b < blk.by; ++b) s_row[b] += sc.row_sum[r * blk.by + b];
  for (int64_t b = 0; b < blk.by; ++b) {
    float col_term = 0.f;
    for (int j = 0; j < n; ++j) col_term += sc.log_col[b * n + j];
    const float lse_shift = 2.f * blk.t * sc.shift[b * n];
    s_row[b] = (lse_shift + s_row[b] / R + col_term / yi.count[b]) * scale;
  }
  for (int64_t b = 0; b < blk.by; ++b) {
    if (!sc.exact[b]) continue;
    s_row[b] = pair_forward_exact(blk.c + a * blk.m * blk.ldc + b * n, blk.ldc, blk.m, n,
                                  blk.xm ? blk.xm + a * blk.m : nullptr,
                                  blk.ym ? blk.ym + b * n : nullptr, blk.t, blk.den);
  }
}

template <int N>
DIVE_CLONES void backward_set(const Block& blk, const YInfo& yi, int64_t a, Scratch& sc,
                              const float* g_row) {
  const int R = exps_for_set<N>(blk, yi, a, sc);
  const int64_t K = blk.cols();
  const int n = N ? N : blk.n;
  const float* yv = yi.valid.data();
  float* c = blk.c + a * blk.m * blk.ldc;

  for (int64_t b = 0; b < blk.by; ++b) {
    if (!sc.exact[b]) continue;
    pair_backward_exact(c + b * n, blk.ldc, blk.m, n, blk.xm ? blk.xm + a * blk.m : nullptr,
                        blk.ym ? blk.ym + b * n : nullptr, blk.t, blk.den, g_row[b]);
  }
  // Column factors g / (den * n_b * colsum), reusing log_col as storage.
  float* col_f = sc.log_col.data();
  for (int64_t b = 0; b < blk.by; ++b) {
    const float w = g_row[b] / (blk.den * yi.count[b]);
    for (int j = 0; j < n; ++j) {
      col_f[b * n + j] = yv[b * n + j] != 0.f ? w / sc.col_sum[b * n + j] : 0.f;
    }
  }
  for (int i = 0; i < blk.m; ++i) {
    if (blk.xm && !blk.xm[a * blk.m + i]) {
      for (int64_t b = 0; b < blk.by; ++b)
        if (!sc.exact[b]) std::memset(c + i * blk.ldc + b * n, 0, n * sizeof(float));
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row = c + sc.rows[r] * blk.ldc;
    const float* e = sc.e.data() + r * K;
    const float* rs = sc.row_sum.data() + r * blk.by;
    for (int64_t b = 0; b < blk.by; ++b) {
      if (sc.exact[b]) continue;
      const float row_f = g_row[b] / (blk.den * R * rs[b]);
      for (int j = 0; j < n; ++j)
        row[b * n + j] = yv[b * n + j] != 0.f ? e[b * n + j] * (row_f + col_f[b * n + j]) : 0.f;
    }
  }
}

// Set sizes known at compile time let the short per-pair loops unroll; 0 = any size.
template <typename Fn>
void for_set_size(int n, Fn&& fn) {
  switch (n) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: fn(std::integral_constant<int, 0>{});
  }
}

}  // namespace

void smooth_chamfer_forward_block(float* c, int64_t ldc, int64_t bx, int64_t by, int m, int n,
                                  const uint8_t* x_mask, const uint8_t* y_mask, float t, float den,
                                  float* s, int64_t lds) {
  const Block blk{c, ldc, bx, by, m, n, x_mask, y_mask, t, den};
  const YInfo yi(blk);
  for_set_size(n, [&](auto size) {
#pragma omp parallel
    {
      Scratch sc(blk);
#pragma omp for schedule(static)
      for (int64_t a = 0; a < bx; ++a) forward_set<size()>(blk, yi, a, sc, s + a * lds);
    }
  });
}

void smooth_chamfer_backward_block(float* c, int64_t ldc, int64_t bx, int64_t by, int m, int n,
                                   const uint8_t* x_mask, const uint8_t* y_mask, float t,
                                   float den, const float* g, int64_t ldg) {
  const Block blk{c, ldc, bx, by, m, n, x_mask, y_mask, t, den};
  const YInfo yi(blk);
  for_set_size(n, [&](auto size) {
#pragma omp parallel
    {
      Scratch sc(blk);
#pragma omp for schedule(static)
      for (int64_t a = 0; a < bx; ++a) backward_set<size()>(blk, yi, a, sc, g + a * ldg);
    }
  });
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace dive
