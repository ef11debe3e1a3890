// dive._C: pointers travel as integers so the module never links against torch.
#include <pybind11/pybind11.h>

#include "set_size.h"
#include "slot_attention_cpu.h"
#include "smooth_chamfer_cpu.h"
#include "top_lines_cpu.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "dive native CPU kernels";
  mod.def(
      "smooth_chamfer_forward_block",
      [](uintptr_t c, int64_t ldc, int64_t bx, int64_t by, int m, int n, uintptr_t xm,
         uintptr_t ym, float t, float den, uintptr_t s, int64_t lds) {
        py::gil_scoped_release nogil;
        dive::smooth_chamfer_forward_block(ptr<float>(c), ldc, bx, by, m, n, ptr<const uint8_t>(xm),
                                           ptr<const uint8_t>(ym), t, den, ptr<float>(s), lds);
      },
      "Smooth-Chamfer values of a cosine block (see csrc/smooth_chamfer_cpu.h).");
  mod.def(
      "smooth_chamfer_backward_block",
      [](uintptr_t c, int64_t ldc, int64_t bx, int64_t by, int m, int n, uintptr_t xm,
         uintptr_t ym, float t, float den, uintptr_t g, int64_t ldg) {
        py::gil_scoped_release nogil;
        dive::smooth_chamfer_backward_block(ptr<float>(c), ldc, bx, by, m, n,
                                            ptr<const uint8_t>(xm), ptr<const uint8_t>(ym), t, den,
                                            ptr<const float>(g), ldg);
      },
      "Overwrite a cosine block with its gradient weights (see csrc/smooth_chamfer_cpu.h).");
  mod.def(
      "slot_attention_forward_epilogue",
      [](uintptr_t s, uintptr_t mask, uintptr_t r, int64_t bh, int64_t h, int64_t k, int64_t n,
         float scale, float eps) {
        py::gil_scoped_release nogil;
        dive::slot_attention_forward_epilogue(ptr<float>(s), ptr<const uint8_t>(mask),
                                              ptr<float>(r), bh, h, k, n, scale, eps);
      },
      "Scores -> normalised slot weights, in place (see csrc/slot_attention_cpu.h).");
  mod.def(
      "slot_attention_backward_epilogue",
      [](uintptr_t s, uintptr_t dov, uintptr_t r, uintptr_t mask, int64_t bh, int64_t h,
         int64_t k, int64_t n, float scale) {
        py::gil_scoped_release nogil;
        dive::slot_attention_backward_epilogue(ptr<float>(s), ptr<float>(dov), ptr<const float>(r),
                                               ptr<const uint8_t>(mask), bh, h, k, n, scale);
      },
      "Scores and do.v -> score gradients and dv weights, in place (see csrc/slot_attention_cpu.h).");
  mod.def(
      "top_lines",
      [](uintptr_t s, bool f64, int64_t rows, int64_t cols, int64_t lds, uintptr_t row_k,
         int64_t row_width, uintptr_t row_top, uintptr_t col_k, int64_t col_width,
         uintptr_t col_top, uintptr_t row_group, uintptr_t col_group, int64_t groups,
         uintptr_t group_row_k,
         int64_t group_row_width, uintptr_t group_row_top, uintptr_t group_col_k,
         int64_t group_col_width, uintptr_t group_col_top) {
        py::gil_scoped_release nogil;
        auto req = [](uintptr_t k, int64_t width, uintptr_t top) {
          return dive::TopRequest{ptr<const int64_t>(k), width, ptr<int64_t>(top)};
        };
        auto run = [&](auto* values) {
          dive::top_lines(values, rows, cols, lds, req(row_k, row_width, row_top),
                          req(col_k, col_width, col_top), ptr<const int64_t>(row_group),
                          ptr<const int64_t>(col_group), groups,
                          req(group_row_k, group_row_width, group_row_top),
                          req(group_col_k, group_col_width, group_col_top));
        };
        if (f64)
          run(ptr<const double>(s));
        else
          run(ptr<const float>(s));
      },
      "Each row's and column's best entries, overall and within their group, in one pass (see "
      "csrc/top_lines_cpu.h).");
  mod.def("num_threads", &dive::num_threads, "OpenMP threads the kernels use.");
  mod.attr("max_set_size") = dive::kMaxSetSize;
}
