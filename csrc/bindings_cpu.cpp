// dive._C: pointers travel as integers so the module never links against torch.
#include <pybind11/pybind11.h>

#include "set_size.h"
#include "slot_attention_cpu.h"
#include "smooth_chamfer_cpu.h"

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
  mod.def("num_threads", &dive::num_threads, "OpenMP threads the kernels use.");
  mod.attr("max_set_size") = dive::kMaxSetSize;
}
