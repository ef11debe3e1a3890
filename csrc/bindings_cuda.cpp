// dive._C_cuda: pointers and the stream travel as integers so the module never links against
// torch; the CUDA runtime is linked statically so the import works on machines without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "smooth_chamfer_cuda.h"

namespace py = pybind11;

#ifndef DIVE_CUDA_ARCHS
#define DIVE_CUDA_ARCHS ""
#endif

namespace {
template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}
}  // namespace

PYBIND11_MODULE(_C_cuda, mod) {
  mod.doc() = "dive native CUDA kernels";
  mod.def(
      "smooth_chamfer_forward_block",
      [](uintptr_t c, int64_t ldc, int64_t bx, int64_t by, int m, int n, uintptr_t xm,
         uintptr_t ym, float t, float den, uintptr_t s, int64_t lds, uintptr_t stream) {
        check(dive::smooth_chamfer_forward_block_cuda(ptr<float>(c), ldc, bx, by, m, n,
                                                      ptr<const uint8_t>(xm),
                                                      ptr<const uint8_t>(ym), t, den,
                                                      ptr<float>(s), lds, stream));
      },
      "Smooth-Chamfer values of a device cosine block, on the given stream.");
  mod.def(
      "smooth_chamfer_backward_block",
      [](uintptr_t c, int64_t ldc, int64_t bx, int64_t by, int m, int n, uintptr_t xm,
         uintptr_t ym, float t, float den, uintptr_t g, int64_t ldg, uintptr_t stream) {
        check(dive::smooth_chamfer_backward_block_cuda(ptr<float>(c), ldc, bx, by, m, n,
                                                       ptr<const uint8_t>(xm),
                                                       ptr<const uint8_t>(ym), t, den,
                                                       ptr<const float>(g), ldg, stream));
      },
      "Overwrite a device cosine block with its gradient weights, on the given stream.");
  mod.def("device_count", &dive::cuda_device_count, "CUDA devices visible (0 without a driver).");
  mod.attr("archs") = DIVE_CUDA_ARCHS;
  mod.attr("max_set_size") = 32;
}
