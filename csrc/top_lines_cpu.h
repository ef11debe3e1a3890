// C-style API of the one-pass top-k selection over the rows and columns of a score matrix (the
// evaluation's ranking step; no torch headers: see docs/design.md §4).
#pragma once
#include <cstdint>

namespace dive {

// One list request: line l keeps its k[l] best items, best first, ties to the lower index (the
// first entries of a stable descending sort), in top[l * width ...]; slots past its own k (or
// past the items there are) are -1. Needs 0 <= k <= width. k = null skips the request.
struct TopRequest {
  const int64_t* k;
  int64_t width;
  int64_t* top;
};

// s: (rows, cols) row-major, row stride lds. `row_req` / `col_req` ask for each row's best
// columns and each column's best rows; `rows_in_group` / `cols_in_group` for the same restricted
// to the items of the line's own group (row_group: (rows,), col_group: (cols,) ids in
// [0, groups); a row and a column share a group when their ids are equal; both null when no
// request is in a group). All four come from one pass over the matrix: an entry is looked at
// twice only when it may beat the current k-th best of one of its lists. Memory: (groups + 1) *
// cols values besides the lists.
template <typename T>
void top_lines(const T* s, int64_t rows, int64_t cols, int64_t lds, TopRequest row_req,
               TopRequest col_req, const int64_t* row_group, const int64_t* col_group,
               int64_t groups, TopRequest rows_in_group, TopRequest cols_in_group);

}  // namespace dive
