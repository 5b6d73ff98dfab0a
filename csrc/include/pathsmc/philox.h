// Counter-based Philox4x32-10 and the conversions to uniforms and normals.
//
// The same (seed, subsequence, offset) gives the same 128 bits on CPU and CUDA, so the noise
// of an op depends only on the generator state and the element index, never on the thread
// count or the launch shape. Counter/key layout is ATen's philox_engine: counter =
// (offset_lo, offset_hi, subsequence_lo, subsequence_hi), key = (seed_lo, seed_hi).
#pragma once

#include <cmath>
#include <cstdint>

#include "pathsmc/fastmath.h"
#include "pathsmc/macros.h"

namespace pathsmc {

struct Philox4 {
  uint32_t v[4];
};

PATHSMC_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// 10 rounds of Philox4x32 on one 128-bit counter: a pure function, no state.
PATHSMC_HD Philox4 philox4x32_10(uint64_t seed, uint64_t subsequence, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = static_cast<uint32_t>(subsequence), c3 = static_cast<uint32_t>(subsequence >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform float in [0, 1) from the top 24 bits.
PATHSMC_HD float uniform_float(uint32_t w) { return static_cast<float>(w >> 8) * 0x1p-24f; }
// Uniform float in (0, 1] from all 32 bits: safe for log, and the smallest value 2^-32 puts the
// Box–Muller tail cut at 6.66σ (24 bits would cut at 5.77σ).
PATHSMC_HD float uniform_float_pos(uint32_t w) {
  return (static_cast<float>(w) + 1.0f) * 0x1p-32f;
}
// Uniform double in [0, 1) from 53 bits of two words.
PATHSMC_HD double uniform_double(uint32_t a, uint32_t b) {
  const uint64_t m = (static_cast<uint64_t>(a >> 5) << 26) | (b >> 6);
  return static_cast<double>(m) * 0x1p-53;
}
PATHSMC_HD double uniform_double_pos(uint32_t a, uint32_t b) {
  const uint64_t m = (static_cast<uint64_t>(a >> 5) << 26) | (b >> 6);
  return static_cast<double>(m + 1) * 0x1p-53;
}

// The i-th double uniform of a stream: two per Philox call.
PATHSMC_HD double stream_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  const Philox4 r = philox4x32_10(seed, i >> 1, offset);
  return (i & 1) ? uniform_double(r.v[2], r.v[3]) : uniform_double(r.v[0], r.v[1]);
}

// Box–Muller: (u1 in (0,1], u2 in [0,1)) -> two independent standard normals. The float
// version uses the polynomial log/sincos of fastmath.h: vectorizable on the CPU, identical
// formulas on the GPU.
PATHSMC_HD void box_muller(float u1, float u2, float& z0, float& z1) {
  const float r = sqrtf(-2.0f * logf_poly(u1));
  float s, c;
  sincos_2pi_f(u2, s, c);
  z0 = r * c;
  z1 = r * s;
}
PATHSMC_HD void box_muller(double u1, double u2, double& z0, double& z1) {
  const double r = sqrt(-2.0 * log_poly(u1));
  double s, c;
  sincos_2pi(u2, s, c);
  z0 = r * c;
  z1 = r * s;
}

// Normals per Philox call: 4 in float32 (24-bit uniforms), 2 in float64 (53-bit uniforms).
template <typename T> struct NormalBlock;
template <> struct NormalBlock<float> {
  static constexpr int kPerCall = 4;
  PATHSMC_HD static void draw(uint64_t seed, uint64_t offset, uint64_t block, float* z) {
    const Philox4 r = philox4x32_10(seed, block, offset);
    box_muller(uniform_float_pos(r.v[0]), uniform_float(r.v[1]), z[0], z[1]);
    box_muller(uniform_float_pos(r.v[2]), uniform_float(r.v[3]), z[2], z[3]);
  }
};
template <> struct NormalBlock<double> {
  static constexpr int kPerCall = 2;
  PATHSMC_HD static void draw(uint64_t seed, uint64_t offset, uint64_t block, double* z) {
    const Philox4 r = philox4x32_10(seed, block, offset);
    box_muller(uniform_double_pos(r.v[0], r.v[1]), uniform_double(r.v[2], r.v[3]), z[0], z[1]);
  }
};

}  // namespace pathsmc
