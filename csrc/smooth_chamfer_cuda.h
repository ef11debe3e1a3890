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

// dx (NX, m, D), dy (NY, n, D) float32 of sum(g * S), g (NX, NY) float32 with row stride ldg.
// Zeroes dx and dy itself (cudaMemsetAsync on the stream) before the kernel adds into them;
// masked elements get zero gradients.
std::string smooth_chamfer_backward_fused_cuda(const void* x, const void* y, int dtype,
                                               int64_t nx, int64_t ny, int m, int n, int64_t d,
                                               const uint8_t* x_mask, const uint8_t* y_mask,
                                               float t, float den, const float* g, int64_t ldg,
                                               float* dx, float* dy, uintptr_t stream);

int cuda_device_count();

}  // namespace dive
