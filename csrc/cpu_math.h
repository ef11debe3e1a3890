// Elementwise float math for the CPU kernels: arithmetic only, so loops over it vectorise
// (libm calls would not).
#pragma once
#include <cstdint>
#include <cstring>

// Hot loops are built for AVX-512 and AVX2 beside the baseline; the loader picks per CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DIVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIVE_CLONES
#endif

namespace dive {
namespace cpu_math {

inline float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int32_t as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, 4);
  return i;
}

// exp for x <= 0 (Cephes polynomial, ~1 ulp); arithmetic only, so loops over it vectorise.
// x > 0 (an FMA's rounding) counts as 0; NaN stays NaN.
inline float exp_nonpos(float x) {
  x = x > 0.0f ? 0.0f : x;
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + shifter;
  const int32_t k = as_int(t) - as_int(shifter);
  const float fk = t - shifter;
  x -= fk * 0.693359375f;
  x -= fk * -2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  return y * as_float((k + 127) << 23);
}

// log for positive normal x (Cephes polynomial, ~1 ulp); NaN and +inf come back unchanged
// (the bit tricks below would turn them into plausible finite logs).
inline float log_pos(float x) {
  const bool special = !(x <= 3.40282347e38f);
  const int32_t bits = as_int(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float f = as_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = f < 0.707106781186547524f;
  e -= small;
  f = small ? f + f - 1.0f : f - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float result = f + y + 0.693359375f * fe;
  return special ? x : result;
}

}  // namespace cpu_math
}  // namespace dive
