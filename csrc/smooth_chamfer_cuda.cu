// CUDA smooth-Chamfer epilogue over a cosine block that a cuBLAS GEMM produced: one thread per
// (x set, y set) pair running the exact per-pair routine. The fused tensor-core kernels that
// replace the separate GEMM come with the CUDA C++ backend issue.
#include <cuda_runtime.h>

#include "smooth_chamfer_common.h"
#include "smooth_chamfer_cuda.h"

namespace dive {
namespace {

__global__ void forward_block_kernel(const float* c, int64_t ldc, int64_t bx, int64_t by, int m,
                                     int n, const uint8_t* xm, const uint8_t* ym, float t,
                                     float den, float* s, int64_t lds) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t a = blockIdx.y;
  if (b >= by) return;
  s[a * lds + b] = pair_forward_exact(c + a * m * ldc + b * n, ldc, m, n,
                                      xm ? xm + a * m : nullptr, ym ? ym + b * n : nullptr, t, den);
}

__global__ void backward_block_kernel(float* c, int64_t ldc, int64_t bx, int64_t by, int m, int n,
                                      const uint8_t* xm, const uint8_t* ym, float t, float den,
                                      const float* g, int64_t ldg) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t a = blockIdx.y;
  if (b >= by) return;
  pair_backward_exact(c + a * m * ldc + b * n, ldc, m, n, xm ? xm + a * m : nullptr,
                      ym ? ym + b * n : nullptr, t, den, g[a * ldg + b]);
}

constexpr int kThreads = 128;

std::string launch_status(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return {};
  return std::string(kernel) + ": " + cudaGetErrorString(err);
}

dim3 grid_for(int64_t bx, int64_t by) {
  return dim3(static_cast<unsigned>((by + kThreads - 1) / kThreads), static_cast<unsigned>(bx));
}

}  // namespace

std::string smooth_chamfer_forward_block_cuda(float* c, int64_t ldc, int64_t bx, int64_t by,
                                              int m, int n, const uint8_t* x_mask,
                                              const uint8_t* y_mask, float t, float den, float* s,
                                              int64_t lds, uintptr_t stream) {
  if (bx == 0 || by == 0) return {};
  forward_block_kernel<<<grid_for(bx, by), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      c, ldc, bx, by, m, n, x_mask, y_mask, t, den, s, lds);
  return launch_status("smooth_chamfer forward_block_kernel");
}

std::string smooth_chamfer_backward_block_cuda(float* c, int64_t ldc, int64_t bx, int64_t by,
                                               int m, int n, const uint8_t* x_mask,
                                               const uint8_t* y_mask, float t, float den,
                                               const float* g, int64_t ldg, uintptr_t stream) {
  if (bx == 0 || by == 0) return {};
  backward_block_kernel<<<grid_for(bx, by), kThreads, 0,
                          reinterpret_cast<cudaStream_t>(stream)>>>(c, ldc, bx, by, m, n, x_mask,
                                                                    y_mask, t, den, g, ldg);
  return launch_status("smooth_chamfer backward_block_kernel");
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace dive
