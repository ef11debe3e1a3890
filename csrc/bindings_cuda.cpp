// dive._C_cuda: pointers and the stream travel as integers so the module never links against
// torch; the CUDA runtime is linked statically so the import works on machines without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "set_size.h"
#include "slot_attention_cuda.h"
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
      "smooth_chamfer_forward_fused",
      [](uintptr_t x, uintptr_t y, int dtype, int64_t nx, int64_t ny, int m, int n, int64_t d,
         uintptr_t xm, uintptr_t ym, float t, float den, uintptr_t s, int64_t lds,
         uintptr_t stream, bool tf32) {
        check(dive::smooth_chamfer_forward_fused_cuda(
            ptr<const void>(x), ptr<const void>(y), dtype, nx, ny, m, n, d,
            ptr<const uint8_t>(xm), ptr<const uint8_t>(ym), t, den, ptr<float>(s), lds, stream,
            tf32));
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("nx"), py::arg("ny"), py::arg("m"),
      py::arg("n"), py::arg("d"), py::arg("x_mask"), py::arg("y_mask"), py::arg("t"),
      py::arg("den"), py::arg("s"), py::arg("lds"), py::arg("stream"), py::arg("tf32") = false,
      "Fused smooth-Chamfer forward on device pointers: x (NX,m,D), y (NY,n,D) contiguous, dtype "
      "0/1/2 = float32/float16/bfloat16, masks uint8 (1 = real) or 0; writes S (NX,NY) float32 "
      "with row stride lds. m, n in 1..32. tf32: float32 cosines may use TF32 tensor cores "
      "(10-bit operand mantissas, fp32 sums); otherwise they are exact fp32.");
  mod.def(
      "smooth_chamfer_backward_weights",
      [](uintptr_t x, uintptr_t y, int dtype, int64_t nx, int64_t ny, int m, int n, int64_t d,
         uintptr_t xm, uintptr_t ym, float t, float den, uintptr_t g, int64_t ldg, uintptr_t w_hi,
         uintptr_t w_lo, int64_t ldw, uintptr_t stream) {
        check(dive::smooth_chamfer_backward_weights_cuda(
            ptr<const void>(x), ptr<const void>(y), dtype, nx, ny, m, n, d,
            ptr<const uint8_t>(xm), ptr<const uint8_t>(ym), t, den, ptr<const float>(g), ldg,
            ptr<void>(w_hi), ptr<void>(w_lo), ldw, stream));
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("nx"), py::arg("ny"), py::arg("m"),
      py::arg("n"), py::arg("d"), py::arg("x_mask"), py::arg("y_mask"), py::arg("t"),
      py::arg("den"), py::arg("g"), py::arg("ldg"), py::arg("w_hi"), py::arg("w_lo"),
      py::arg("ldw"), py::arg("stream"),
      "Smooth-Chamfer gradient weights on device pointers: g (NX,NY) float32 with row stride "
      "ldg; writes W (NX*m, NY*n) with row stride ldw, float32 in w_hi for dtype 0, else "
      "W = w_hi + w_lo in the input dtype (zeros on masked elements). dx = W y, dy = W^T x.");
  mod.def(
      "slot_attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t key_mask, uintptr_t out, uintptr_t r,
         int64_t B, int64_t H, int64_t K, int64_t N, int64_t d, int64_t dv, float scale, float eps,
         int dtype, uintptr_t stream) {
        check(dive::slot_attention_forward_cuda(
            ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
            ptr<const uint8_t>(key_mask), ptr<void>(out), ptr<float>(r), B, H, K, N, d, dv,
            scale, eps, dtype, stream));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"), py::arg("out"),
      py::arg("r"), py::arg("B"), py::arg("H"), py::arg("K"), py::arg("N"), py::arg("d"),
      py::arg("dv"), py::arg("scale"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
      "Slot cross-attention forward on device pointers: writes out (B,H,K,dv) and r (B,H,K, "
      "float32, sum of weights + eps). dtype 0/1/2 = float32/float16/bfloat16; key_mask 0 = none.");
  mod.def(
      "slot_attention_backward",
      [](uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t r,
         uintptr_t key_mask, uintptr_t dq, uintptr_t dk, uintptr_t dv, int64_t B, int64_t H,
         int64_t K, int64_t N, int64_t d, int64_t dv_dim, float scale, float eps, int dtype,
         uintptr_t stream) {
        check(dive::slot_attention_backward_cuda(
            ptr<const void>(dout), ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
            ptr<const void>(out), ptr<const float>(r), ptr<const uint8_t>(key_mask),
            ptr<void>(dq), ptr<void>(dk), ptr<void>(dv), B, H, K, N, d, dv_dim, scale, eps,
            dtype, stream));
      },
      py::arg("do"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("r"),
      py::arg("key_mask"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("B"),
      py::arg("H"), py::arg("K"), py::arg("N"), py::arg("d"), py::arg("dv_dim"),
      py::arg("scale"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
      "Slot cross-attention backward on device pointers: writes dq, dk, dv (masked tokens' dk "
      "and dv rows are zeros) from do, the inputs and the forward's out and r.");
  mod.def("device_count", &dive::cuda_device_count, "CUDA devices visible (0 without a driver).");
  mod.attr("archs") = DIVE_CUDA_ARCHS;
  mod.attr("max_set_size") = dive::kMaxSetSize;
}
