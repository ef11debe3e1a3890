// What the CUDA kernels share: dtype names for messages and the check after each launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

namespace dive {

template <typename T>
struct DtypeName;
template <>
struct DtypeName<float> {
  static constexpr const char* value = "float32";
};
template <>
struct DtypeName<__half> {
  static constexpr const char* value = "float16";
};
template <>
struct DtypeName<__nv_bfloat16> {
  static constexpr const char* value = "bfloat16";
};

// Empty when the last launch on this thread succeeded, else "<what>: <CUDA error>"; `what`
// (which kernel, which template arguments) is only built on failure.
template <typename What>
std::string launch_error(What what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return {};
  return what() + ": " + cudaGetErrorString(err);
}

}  // namespace dive
