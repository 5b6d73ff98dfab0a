// Gaussian log-density pieces of the Euler–Maruyama step weight (DESIGN.md, "The step weight").
//
// With s = σ√h and x' = x + a·h + s·ε, every log-density in Δ is written through its
// standardized residual, which avoids the cancellation of x' − (x + b·h) in float32:
//   proposal  N(x'; x + a h, s²):        z = ε
//   reference N(x'; x + b h, s²):        z = (a − b)·h/s + ε
//   forward   N(x;  x' + λ x' h, s²):     z = (a·h + λ·x'·h)/s + ε   (sign irrelevant: squared)
// so Δ = −½ Σ_k c_k Σ z_k² − ½ c_f Σ z_f² + ½ Σ ε² − D (log s + ½ log 2π)(Σ c_k + c_f − 1).
#pragma once

#include <cmath>
#include <cstdint>

#include "pathsmc/macros.h"

namespace pathsmc {

constexpr double kHalfLog2Pi = 0.91893853320467274178032973640562;

// −D·(log s + ½ log 2π): the normalizing constant of one D-dimensional log N(·; ·, s² I).
PATHSMC_HD double gaussian_log_norm(int64_t d, double s) {
  return -static_cast<double>(d) * (log(s) + kHalfLog2Pi);
}

// Step size h and noise scale s = σ√h of one row: the op's scalars, or per-row overrides
// (e.g. a MALA step size adapted per problem).
struct RowStep {
  double h, s;
  PATHSMC_HD static RowStep of(int64_t b, double dt, double sigma, const double* row_dt,
                               const double* row_sigma) {
    const double h = row_dt ? row_dt[b] : dt;
    const double sg = row_sigma ? row_sigma[b] : sigma;
    return RowStep{h, sg * sqrt(h)};
  }
};

// 0 for a finite x' and NaN for a non-finite one: added to the proposal sum, it makes a
// particle whose state became inf/NaN dead (NaN log-weight) without a branch or host sync.
template <typename T>
PATHSMC_HD double nonfinite_to_nan(T x_new) {
  return static_cast<double>(x_new) * 0.0;
}

template <typename T>
PATHSMC_HD T ref_residual(T a, T b, T h_over_s, T eps) {
  return (a - b) * h_over_s + eps;
}

template <typename T>
PATHSMC_HD T fwd_residual(T a, T x_new, T lam, T h_over_s, T eps) {
  return (a + lam * x_new) * h_over_s + eps;
}

// Standardized residual of kernel_logpdf: (y − base − (drift + λ·base)·h)/s, in double.
PATHSMC_HD double kernel_residual(double y, double base, double drift, double lam, double h,
                                  double inv_s) {
  return (y - base - (drift + lam * base) * h) * inv_s;
}

// log q(y|x) of the MALA proposal N(y; x + step·g, 2·step·I), without the normalizer
// (it cancels in the acceptance ratio): one element's contribution.
PATHSMC_HD double mala_sq(double y, double x, double g, double step) {
  const double r = y - x - step * g;
  return r * r;
}

}  // namespace pathsmc
