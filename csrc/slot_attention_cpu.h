// C-style API of the CPU slot cross-attention kernels (no torch headers: see DESIGN.md §3).
// Contiguous float32 tensors: q (B,H,K,d), k (B,H,N,d), v (B,H,N,dv), out (B,H,K,dv),
// r (B,H,K). key_mask: (B,N) bytes, 1 = real token, or null. One pass over the tokens per
// (b, h); nothing of size (B,H,K,N) is stored.
#pragma once
#include <cstdint>

namespace dive {

// Writes out and r (r_i = sum_n A_in + eps, kept for the backward).
void slot_attention_forward(const float* q, const float* k, const float* v,
                            const uint8_t* key_mask, float* out, float* r, int64_t B, int64_t H,
                            int64_t K, int64_t N, int64_t d, int64_t dv, float scale, float eps);

// Writes dq, dk, dv_grad (overwritten, masked tokens get zeros) from do, the forward's out and r.
void slot_attention_backward(const float* dout, const float* q, const float* k, const float* v,
                             const float* out, const float* r, const uint8_t* key_mask, float* dq,
                             float* dk, float* dv_grad, int64_t B, int64_t H, int64_t K, int64_t N,
                             int64_t d, int64_t dv, float scale);

}  // namespace dive
