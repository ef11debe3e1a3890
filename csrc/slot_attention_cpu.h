// C-style API of the CPU slot cross-attention epilogues (no torch headers: see docs/design.md §4).
// The GEMMs around them run through torch; these do the per-token work in between, on
// contiguous float32 (BH, K, N) blocks (BH = B*H, h-fastest), in place.
#pragma once
#include <cstdint>

namespace dive {

// s: scores q.k (unscaled) -> A' = A / r with A the slot softmax of scale*s per token (masked
// tokens: 0) and r_i = sum_n A_in + eps, written to r (BH, K). key_mask: (B, N) bytes or null.
void slot_attention_forward_epilogue(float* s, const uint8_t* key_mask, float* r, int64_t BH,
                                     int64_t H, int64_t K, int64_t N, float scale, float eps);

// s: scores q.k again, dov: do.v, r from the forward.
// Overwrites s with dL/d(q.k) = scale * A (dA - sum_i A dA), dA = (dov - do.out) / r (do.out
// formed here as sum_n A/r dov), and dov with A / r (the weights of dv = (A/r)^T do). Masked
// tokens get 0 in both.
void slot_attention_backward_epilogue(float* s, float* dov, const float* r,
                                      const uint8_t* key_mask, int64_t BH, int64_t H, int64_t K,
                                      int64_t N, float scale);

}  // namespace dive
