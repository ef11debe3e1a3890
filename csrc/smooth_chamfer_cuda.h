// C-style API of the CUDA smooth-Chamfer kernels (no torch headers: see docs/design.md §4), on
// device pointers and the caller's stream. Each returns an empty string on success, else the
// error naming the kernel.
#pragma once
#include <cstdint>
#include <string>

namespace dive {

// Fused kernels: cosines and epilogue in one pass per tile, never the
// (NX*m x NY*n) grid. x (NX, m, D), y (NY, n, D) contiguous, dtype 0/1/2 = float32/float16/
// bfloat16; masks uint8 (NX, m) / (NY, n), 1 = real element, or null; m, n in 1..32, D >= 1;
// every set needs a real element. forward writes S (NX, NY) float32 with row stride lds; with
// tf32, float32 inputs whose rows are 16-byte aligned take TF32 tensor cores (operands rounded
// to 10 mantissa bits, fp32 accumulation), else every float32 cosine is exact fp32 FMA.
std::string smooth_chamfer_forward_fused_cuda(const void* x, const void* y, int dtype, int64_t nx,
                                              int64_t ny, int m, int n, int64_t d,
                                              const uint8_t* x_mask, const uint8_t* y_mask,
                                              float t, float den, float* s, int64_t lds,
                                              uintptr_t stream, bool tf32 = false);

// Gradient weights W = g_ab (P / m + Q / n) / den of sum(g * S), g (NX, NY) float32 with row
// stride ldg, written to the real cells of W (NX*m, NY*n) with row stride ldw (0 on masked
// elements): float32 in w_hi for dtype 0, else W = w_hi + w_lo in the input dtype. The caller
// forms dx = W y and dy = W^T x (no atomics anywhere).
std::string smooth_chamfer_backward_weights_cuda(const void* x, const void* y, int dtype,
                                                 int64_t nx, int64_t ny, int m, int n, int64_t d,
                                                 const uint8_t* x_mask, const uint8_t* y_mask,
                                                 float t, float den, const float* g, int64_t ldg,
                                                 void* w_hi, void* w_lo, int64_t ldw,
                                                 uintptr_t stream);

int cuda_device_count();

}  // namespace dive
