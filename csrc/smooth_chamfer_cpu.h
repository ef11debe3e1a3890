// C-style API of the CPU smooth-Chamfer epilogue (no torch headers: see docs/design.md §4).
#pragma once
#include <cstdint>

namespace dive {

// c: (bx*m, by*n) fp32 cosines, row stride ldc; used as scratch. Writes s[a*lds + b], the
// smooth-Chamfer value of x set a against y set b. Masks: (bx, m) / (by, n) bytes, or null.
void smooth_chamfer_forward_block(float* c, int64_t ldc, int64_t bx, int64_t by, int m, int n,
                                  const uint8_t* x_mask, const uint8_t* y_mask, float t, float den,
                                  float* s, int64_t lds);

// Same block; overwrites c with dS/dc weighted by the incoming gradient g (bx, by; stride ldg).
void smooth_chamfer_backward_block(float* c, int64_t ldc, int64_t bx, int64_t by, int m, int n,
                                   const uint8_t* x_mask, const uint8_t* y_mask, float t,
                                   float den, const float* g, int64_t ldg);

int num_threads();

}  // namespace dive
