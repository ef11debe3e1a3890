#include "top_lines_cpu.h"

#include <omp.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace dive {
namespace {

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// Sorted best-first lists of (value, index), one per line. `bar[line]` is what an entry must
// beat: the k-th best value once the list is full, -inf before, +inf for k = 0. A list that
// never fills (its line holds fewer than k admitted values above -inf) is rebuilt after the pass
// by `refill_line`. With groups, only items of the line's group enter.
template <typename T>
struct Lists {
  const int64_t* k;
  int64_t width;
  int64_t* idx;
  const int64_t* line_group;
  const int64_t* item_group;
  std::vector<T> val;
  std::vector<int64_t> count;
  std::vector<T> bar;

  Lists(int64_t lines, const TopRequest& req, int64_t* idx, const int64_t* line_group,
        const int64_t* item_group)
      : k(req.k), width(req.width), idx(idx), line_group(line_group), item_group(item_group),
        val(lines * width), count(lines, 0), bar(lines) {
    for (int64_t l = 0; l < lines; ++l) {
      bar[l] = k[l] > 0 ? -kInf<T> : kInf<T>;
      std::fill(idx + l * width, idx + (l + 1) * width, int64_t(-1));
    }
  }

  // Entries arrive in increasing index order, so a new one goes after every equal value.
  void offer(int64_t line, T v, int64_t index) {
    if (!(v > bar[line]) || (line_group && line_group[line] != item_group[index])) return;
    T* vals = val.data() + line * width;
    int64_t* ids = idx + line * width;
    const int64_t n = count[line], kk = k[line];
    int64_t p = n;
    while (p > 0 && vals[p - 1] < v) --p;
    for (int64_t q = std::min(n, kk - 1); q > p; --q) {
      vals[q] = vals[q - 1];
      ids[q] = ids[q - 1];
    }
    vals[p] = v;
    ids[p] = index;
    if (n < kk) count[line] = n + 1;
    if (count[line] == kk) bar[line] = vals[kk - 1];
  }
};

template <typename T>
T bar_of(const Lists<T>* list, int64_t line) {
  return list ? list->bar[line] : kInf<T>;
}

constexpr int64_t kChunk = 16;
constexpr int64_t kMinStripe = 2048;  // columns per thread at least
constexpr int64_t kBlock = 4096;  // columns scanned by all rows before the next

// Where column j is in group g: off[g * cols + j] is -inf there and +inf elsewhere, so that
// `v > off` selects the group's entries inside the vector test.
template <typename T>
std::vector<T> group_offsets(int64_t groups, int64_t cols, const int64_t* col_group) {
  std::vector<T> off(groups * cols);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < cols; ++j)
      off[g * cols + j] = col_group && col_group[j] == g ? -kInf<T> : kInf<T>;
  return off;
}

// The bars a scan compares against: each list's own, or +inf where a list is not asked for.
template <typename T>
struct Bars {
  const T* col;          // (cols,) column lists
  const T* col_grouped;  // (cols,) column group lists
  const T* off;          // (groups, cols) from group_offsets
};

// Which of kChunk entries may enter a list (bit u for entry u): those beating their column's
// bar, the row's bar, or, within the row's group, the column's or the row's group bar. 16-byte
// vectors (GCC and Clang vector extensions); SSE2 turns a comparison into bits in one
// instruction, elsewhere lane by lane. Most chunks give 0.
template <typename T>
inline uint32_t beats(const T* r, const T* cbar, const T* gcbar, const T* off, T rbar, T gbar) {
  typedef T V __attribute__((vector_size(16)));
  constexpr int lanes = 16 / sizeof(T);
  const V rb = V{} + rbar, gb = V{} + gbar;
  uint32_t bits = 0;
  for (int u = 0; u < kChunk; u += lanes) {
    V a, c, gc, o;
    std::memcpy(&a, r + u, 16);
    std::memcpy(&c, cbar + u, 16);
    std::memcpy(&gc, gcbar + u, 16);
    std::memcpy(&o, off + u, 16);
    const auto hit = (a > c) | (a > rb) | ((a > o) & ((a > gc) | (a > gb)));
#if defined(__SSE2__)
    uint32_t m;
    if constexpr (sizeof(T) == 4)
      m = _mm_movemask_ps(reinterpret_cast<__m128>(hit));
    else
      m = _mm_movemask_pd(reinterpret_cast<__m128d>(hit));
#else
    uint32_t m = 0;
    for (int l = 0; l < lanes; ++l) m |= uint32_t(hit[l] != 0) << l;
#endif
    bits |= m << u;
  }
  return bits;
}

// The rows' lists over columns [c0, c1) and the lists of those columns.
template <typename T>
void scan_block(const T* s, int64_t rows, int64_t cols, int64_t lds, int64_t c0, int64_t c1,
                Lists<T>* row, Lists<T>* row_grouped, const int64_t* row_group, Lists<T>* col,
                Lists<T>* col_grouped, const Bars<T>& bars) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = s + i * lds;
    const T* off = bars.off + (row_group ? row_group[i] : 0) * cols;
    T rbar = bar_of(row, i), gbar = bar_of(row_grouped, i);
    // Entry (i, j) to every list that may take it; each list checks its own bar and group.
    auto visit = [&](int64_t j) {
      const T v = r[j];
      if (v > bars.col[j] || (v > off[j] && v > bars.col_grouped[j])) {
        if (col) col->offer(j, v, i);
        if (col_grouped) col_grouped->offer(j, v, i);
      }
      if (v > rbar || (v > off[j] && v > gbar)) {
        if (row) row->offer(i, v, j);
        if (row_grouped) row_grouped->offer(i, v, j);
        rbar = bar_of(row, i);
        gbar = bar_of(row_grouped, i);
      }
    };
    int64_t j = c0;
    for (; j + kChunk <= c1; j += kChunk) {
      for (uint32_t bits = beats(r + j, bars.col + j, bars.col_grouped + j, off + j, rbar, gbar);
           bits; bits &= bits - 1)
        visit(j + __builtin_ctz(bits));
    }
    for (; j < c1; ++j) visit(j);
  }
}

// Column blocks narrow enough that their lists stay in cache while every row passes over them.
template <typename T>
void scan_stripe(const T* s, int64_t rows, int64_t cols, int64_t lds, int64_t c0, int64_t c1,
                 Lists<T>* row, Lists<T>* row_grouped, const int64_t* row_group, Lists<T>* col,
                 Lists<T>* col_grouped, const Bars<T>& bars) {
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock)
    scan_block(s, rows, cols, lds, b0, std::min(b0 + kBlock, c1), row, row_grouped, row_group,
               col, col_grouped, bars);
}

// Each row's list from the per-stripe lists (stripes in column order: ties to the earlier one).
template <typename T>
void merge_rows(const std::vector<Lists<T>>& parts, int64_t rows, int64_t* out) {
  const int64_t width = parts[0].width;
  std::vector<int64_t> head(parts.size());
  for (int64_t i = 0; i < rows; ++i) {
    std::fill(head.begin(), head.end(), 0);
    const int64_t kk = parts[0].k[i];
    for (int64_t slot = 0; slot < width; ++slot) {
      int64_t pick = -1;
      for (size_t t = 0; slot < kk && t < parts.size(); ++t) {
        if (head[t] >= parts[t].count[i]) continue;
        if (pick < 0 ||
            parts[t].val[i * width + head[t]] > parts[pick].val[i * width + head[pick]])
          pick = t;
      }
      out[i * width + slot] = pick < 0 ? -1 : parts[pick].idx[i * width + head[pick]++];
    }
  }
}

// A line from scratch, every admitted item offered (-inf ones included), for the lists that
// did not fill in the pass. value(j) and admits(j) for item j.
template <typename T, typename Value, typename Admits>
void refill_line(int64_t kk, int64_t items, int64_t* out, Value value, Admits admits) {
  std::vector<T> vals;
  std::vector<int64_t> ids;
  for (int64_t j = 0; j < items; ++j) {
    if (!admits(j)) continue;
    const T v = value(j);
    if (static_cast<int64_t>(vals.size()) == kk && !(v > vals.back())) continue;
    int64_t p = vals.size();
    while (p > 0 && vals[p - 1] < v) --p;
    vals.insert(vals.begin() + p, v);
    ids.insert(ids.begin() + p, j);
    if (static_cast<int64_t>(vals.size()) > kk) {
      vals.pop_back();
      ids.pop_back();
    }
  }
  std::copy(ids.begin(), ids.end(), out);
}

template <typename T>
void refill_short(const TopRequest& req, int64_t lines, int64_t items,
                  const std::function<T(int64_t, int64_t)>& value,
                  const std::function<bool(int64_t, int64_t)>& admits) {
  for (int64_t l = 0; req.k && l < lines; ++l) {
    int64_t* out = req.top + l * req.width;
    if (std::count(out, out + req.k[l], int64_t(-1)))
      refill_line<T>(req.k[l], items, out, [&](int64_t j) { return value(l, j); },
                     [&](int64_t j) { return admits(l, j); });
  }
}

}  // namespace

template <typename T>
void top_lines(const T* s, int64_t rows, int64_t cols, int64_t lds, TopRequest row_req,
               TopRequest col_req, const int64_t* row_group, const int64_t* col_group,
               int64_t groups, TopRequest rows_in_group, TopRequest cols_in_group) {
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), cols / kMinStripe)));
  // Column lists are whole (stripes split the columns); row lists are per stripe, merged after.
  std::vector<Lists<T>> col_lists;
  col_lists.reserve(2);
  Lists<T>* col = nullptr;
  Lists<T>* col_grouped = nullptr;
  if (col_req.k) col = &col_lists.emplace_back(cols, col_req, col_req.top, nullptr, nullptr);
  if (cols_in_group.k)
    col_grouped = &col_lists.emplace_back(cols, cols_in_group, cols_in_group.top, col_group,
                                          row_group);
  const TopRequest* row_reqs[2] = {row_req.k ? &row_req : nullptr,
                                   rows_in_group.k ? &rows_in_group : nullptr};
  std::vector<std::vector<int64_t>> scratch;
  std::vector<Lists<T>> row_parts[2];
  for (int u = 0; u < 2; ++u) {
    for (int t = 0; row_reqs[u] && t < threads; ++t) {
      int64_t* idx = row_reqs[u]->top;
      if (threads > 1) idx = scratch.emplace_back(rows * row_reqs[u]->width).data();
      row_parts[u].emplace_back(rows, *row_reqs[u], idx, u ? row_group : nullptr,
                                u ? col_group : nullptr);
    }
  }
  if (!row_group || !col_group) groups = 1;
  const std::vector<T> off = group_offsets<T>(groups, cols, col_group);
  const std::vector<T> none(cols, kInf<T>);
  const Bars<T> bars{col ? col->bar.data() : none.data(),
                     col_grouped ? col_grouped->bar.data() : none.data(), off.data()};
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    Lists<T>* row = row_parts[0].empty() ? nullptr : &row_parts[0][t];
    Lists<T>* row_grouped = row_parts[1].empty() ? nullptr : &row_parts[1][t];
    scan_stripe(s, rows, cols, lds, cols * t / nt, cols * (t + 1) / nt, row, row_grouped,
                row_group, col, col_grouped, bars);
  }
  for (int u = 0; u < 2 && threads > 1; ++u)
    if (row_reqs[u]) merge_rows(row_parts[u], rows, row_reqs[u]->top);

  auto at = [&](int64_t i, int64_t j) { return s[i * lds + j]; };
  auto all = [](int64_t, int64_t) { return true; };
  refill_short<T>(row_req, rows, cols, at, all);
  refill_short<T>(col_req, cols, rows, [&](int64_t j, int64_t i) { return at(i, j); }, all);
  refill_short<T>(rows_in_group, rows, cols, at,
                  [&](int64_t i, int64_t j) { return row_group[i] == col_group[j]; });
  refill_short<T>(cols_in_group, cols, rows, [&](int64_t j, int64_t i) { return at(i, j); },
                  [&](int64_t j, int64_t i) { return row_group[i] == col_group[j]; });
}

template void top_lines<float>(const float*, int64_t, int64_t, int64_t, TopRequest, TopRequest,
                               const int64_t*, const int64_t*, int64_t, TopRequest, TopRequest);
template void top_lines<double>(const double*, int64_t, int64_t, int64_t, TopRequest, TopRequest,
                                const int64_t*, const int64_t*, int64_t, TopRequest, TopRequest);

}  // namespace dive
