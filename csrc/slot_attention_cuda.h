// C-style API of the CUDA slot cross-attention kernels (no torch headers: see docs/design.md §4).
// All tensors are contiguous device buffers of one dtype (0 = float32, 1 = float16,
// 2 = bfloat16), accumulation is fp32: q (B,H,K,d), k (B,H,N,d), v (B,H,N,dv), out (B,H,K,dv);
// r (B,H,K) is float32 (r_i = sum_n A_in + eps), written by the forward and read by the backward;
// key_mask is uint8 (B,N), 1 = real token, or null. Sizes: K 1..32, d and dv 1..512, N >= 0.
// N == 0 or B*H == 0 launches nothing and writes nothing (the caller fills its empty result).
// Each returns an empty string on success, else a message naming the kernel or the bad size.
#pragma once
#include <cstdint>
#include <string>

namespace dive {

std::string slot_attention_forward_cuda(const void* q, const void* k, const void* v,
                                        const uint8_t* key_mask, void* out, float* r, int64_t B,
                                        int64_t H, int64_t K, int64_t N, int64_t d, int64_t dv,
                                        float scale, float eps, int dtype, uintptr_t stream);

// dout = dL/dout; out and r are the forward's outputs. dk and dv rows of masked tokens are zeros.
std::string slot_attention_backward_cuda(const void* dout, const void* q, const void* k,
                                         const void* v, const void* out, const float* r,
                                         const uint8_t* key_mask, void* dq, void* dk, void* dv,
                                         int64_t B, int64_t H, int64_t K, int64_t N, int64_t d,
                                         int64_t dv_dim, float scale, float eps, int dtype,
                                         uintptr_t stream);

}  // namespace dive
