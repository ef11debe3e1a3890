// What the CUDA kernels share: the dtype switch, dtype names for messages and the check after
// each launch.
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

// Calls fn(DtypeTag<T>{}) with T the element type of a binding's dtype code: 0 float32,
// 1 float16, 2 bfloat16 (the codes dive/ops pass; callers reject other codes before this).
template <typename T>
struct DtypeTag {
  using type = T;
};
template <typename Fn>
auto with_dtype(int code, Fn&& fn) {
  switch (code) {
    case 0: return fn(DtypeTag<float>{});
    case 1: return fn(DtypeTag<__half>{});
    default: return fn(DtypeTag<__nv_bfloat16>{});
  }
}

// Empty when the last launch on this thread succeeded, else "<what>: <CUDA error>"; `what`
// (which kernel, which template arguments) is only built on failure.
template <typename What>
std::string launch_error(What what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return {};
  return what() + ": " + cudaGetErrorString(err);
}

}  // namespace dive
