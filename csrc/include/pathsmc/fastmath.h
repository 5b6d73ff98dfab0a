// Branch-free polynomial log / sincos / exp that compilers vectorize on the CPU and that run
// unchanged on the GPU, so CPU and CUDA draw the same normals to within rounding.
//
// Accuracy: logf_poly and sincos_2pi_f within ~2 ulp of float (Cephes-style minimax
// polynomials); exp_nonpos within ~2 ulp of double on [-708, 0] and exactly 0 below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "pathsmc/macros.h"

namespace pathsmc {

PATHSMC_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
PATHSMC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
PATHSMC_HD uint64_t double_bits(double f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(f));
#else
  uint64_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
PATHSMC_HD double bits_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Natural log of x in (0, 1] given as a normal float (the Box–Muller radius argument).
PATHSMC_HD float logf_poly(float x) {
  const uint32_t bits = float_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xff) - 126;  // x = m·2^e, m in [0.5, 1)
  float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);
  // Move m into [sqrt(1/2), sqrt(2)) so the polynomial argument is small.
  // (arithmetic rather than ?: so that the loop around it stays branch-free and vectorizes)
  const int32_t small = m < 0.70710678118654752440f;
  e -= small;
  m = m * static_cast<float>(1 + small) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// sin(2πu) and cos(2πu) for u in [0, 1).
PATHSMC_HD void sincos_2pi_f(float u, float& s, float& c) {
  const float q = static_cast<float>(static_cast<int32_t>(u * 4.0f + 0.5f));  // nearest quarter
  const float t = (u - 0.25f * q) * 6.28318530717958647692f;  // in [-π/4, π/4]
  const float t2 = t * t;
  const float sp = ((-1.9515295891e-4f * t2 + 8.3321608736e-3f) * t2 - 1.6666654611e-1f) * t2 * t + t;
  const float cp = ((2.443315711809948e-5f * t2 - 1.388731625493765e-3f) * t2 +
                    4.166664568298827e-2f) * t2 * t2 - 0.5f * t2 + 1.0f;
  const int32_t quadrant = static_cast<int32_t>(q) & 3;  // angle = t + quadrant·π/2
  const float ss = (quadrant & 1) ? cp : sp;
  const float cc = (quadrant & 1) ? sp : cp;
  s = (quadrant & 2) ? -ss : ss;
  c = ((quadrant + 1) & 2) ? -cc : cc;
}

// Natural log of x in (0, 1] given as a normal double (Cephes' rational approximation on the
// mantissa in [sqrt(1/2), sqrt(2)), within 1 ulp).
PATHSMC_HD double log_poly(double x) {
  const uint64_t bits = double_bits(x);
  int32_t e = static_cast<int32_t>((bits >> 52) & 0x7ff) - 1022;  // x = m·2^e, m in [0.5, 1)
  double m = bits_double((bits & 0x000fffffffffffffull) | 0x3fe0000000000000ull);
  const int32_t small = m < 0.70710678118654752440;
  e -= small;
  m = m * static_cast<double>(1 + small) - 1.0;
  const double z = m * m;
  double p = 1.01875663804580931796e-4;
  p = p * m + 4.97494994976747001425e-1;
  p = p * m + 4.70579119878881725854e0;
  p = p * m + 1.44989225341610930846e1;
  p = p * m + 1.79368678507819816313e1;
  p = p * m + 7.70838733755885391666e0;
  double q = m + 1.12873587189167450590e1;
  q = q * m + 4.52279145837532221105e1;
  q = q * m + 8.29875266912776603211e1;
  q = q * m + 7.11544750618563894466e1;
  q = q * m + 2.31251620126765340583e1;
  const double fe = static_cast<double>(e);
  double y = m * (z * p / q);
  y -= fe * 2.121944400546905827679e-4;
  y -= 0.5 * z;
  return m + y + fe * 0.693359375;
}

// sin(2πu) and cos(2πu) for u in [0, 1), double (Cephes polynomials on [-π/4, π/4]).
PATHSMC_HD void sincos_2pi(double u, double& s, double& c) {
  const double q = floor(u * 4.0 + 0.5);  // nearest quarter turn
  const double t = (u - 0.25 * q) * 6.283185307179586476925286766559;
  const double z = t * t;
  double sp = 1.58962301576546568060e-10;
  sp = sp * z - 2.50507477628578072866e-8;
  sp = sp * z + 2.75573136213857245213e-6;
  sp = sp * z - 1.98412698295895385996e-4;
  sp = sp * z + 8.33333333332211858878e-3;
  sp = sp * z - 1.66666666666666307295e-1;
  sp = t + t * z * sp;
  double cp = -1.13585365213876817300e-11;
  cp = cp * z + 2.08757008419747316778e-9;
  cp = cp * z - 2.75573141792967388112e-7;
  cp = cp * z + 2.48015872888517045348e-5;
  cp = cp * z - 1.38888888888730564116e-3;
  cp = cp * z + 4.16666666666665929218e-2;
  cp = 1.0 - 0.5 * z + z * z * cp;
  const int32_t quadrant = static_cast<int32_t>(q) & 3;  // angle = t + quadrant·π/2
  const double ss = (quadrant & 1) ? cp : sp;
  const double cc = (quadrant & 1) ? sp : cp;
  s = (quadrant & 2) ? -ss : ss;
  c = ((quadrant + 1) & 2) ? -cc : cc;
}

// exp(x) for x <= 0 (NaN and -inf give 0): the weights exp(l − max) of a row.
PATHSMC_HD double exp_nonpos(double x) {
  const bool zero = !(x >= -708.0);  // also catches NaN
  x = zero ? 0.0 : x;
  // k = round(x / ln2); floor() then int32 keeps the loop vectorizable
  const double kf = floor(x * 1.4426950408889634074 + 0.5);
  const int32_t k = static_cast<int32_t>(kf);
  // r = x − k ln2 in two parts (Cody–Waite), |r| <= ln2 / 2
  const double r = (x - kf * 6.93145751953125e-1) - kf * 1.42860682030941723212e-6;
  double p = 1.0 / 6227020800.0;  // Taylor to r^13: error < 1 ulp for |r| <= ln2 / 2
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const double scale = bits_double(static_cast<uint64_t>(static_cast<int64_t>(k) + 1023) << 52);
  return zero ? 0.0 : p * scale;
}

}  // namespace pathsmc
