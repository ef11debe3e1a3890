// C-style API of the CUDA smooth-Chamfer kernels (no torch headers: see DESIGN.md §3).
// Same contract as smooth_chamfer_cpu.h, on device pointers and the caller's stream.
// Each returns an empty string on success, else the CUDA error naming the kernel.
#pragma once
#include <cstdint>
#include <string>

namespace dive {

std::string smooth_chamfer_forward_block_cuda(float* c, int64_t ldc, int64_t bx, int64_t by,
                                              int m, int n, const uint8_t* x_mask,
                                              const uint8_t* y_mask, float t, float den, float* s,
                                              int64_t lds, uintptr_t stream);

std::string smooth_chamfer_backward_block_cuda(float* c, int64_t ldc, int64_t bx, int64_t by,
                                               int m, int n, const uint8_t* x_mask,
                                               const uint8_t* y_mask, float t, float den,
                                               const float* g, int64_t ldg, uintptr_t stream);

int cuda_device_count();

}  // namespace dive
