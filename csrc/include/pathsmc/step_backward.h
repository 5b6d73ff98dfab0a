// Per-element math of the backward passes of em_step and kernel_logpdf (em_step_backward,
// kernel_logpdf_backward), shared by the CPU and CUDA kernels. pathsmc._autograd keeps the
// same formulas in PyTorch (the reference of the tests and the double backward).
//
// em_step, with s = σ√h, x' = x + a·h + s·ε and the standardized residuals of gaussian.h
//   z_k = (a − b_k)·h/s + ε,   z_f = (a + λ·x')·h/s + ε,
// has Δ = ½|ε|² − ½ Σ_k c_k |z_k|² − ½ c_f |z_f|² + const. With upstream gradients gx (of x')
// and gw (of logw', one per row, broadcast over D) and the weight's pull
//   w = gw · (Σ_k c_k z_k + c_f (1 + λh) z_f),
// the gradients are
//   ∂/∂b_k = gw · c_k · z_k · h/s
//   ∂/∂x   = gx − gw · c_f · λ · z_f · h/s
//   ∂/∂a   = gx · h − w · h/s
//   ∂/∂ε   = gx · s + gw · ε − w
// (the noise is held fixed: ∂/∂x and ∂/∂a do not see ε; x' depends on x, a and ε).
#pragma once

#include "pathsmc/gaussian.h"
#include "pathsmc/macros.h"

namespace pathsmc {

// ε recovered from x' when the forward drew it in-kernel: (x' − x − a·h)/s, in float64.
PATHSMC_HD double em_recover_noise(double x_new, double x, double a, double h, double s) {
  return (x_new - x - a * h) / s;
}

// Reference kernel k: returns ∂/∂b_k and adds its share c_k·gw·z_k to the pull w.
template <typename T>
PATHSMC_HD T em_bwd_ref(T gw, T a, T b, T h_over_s, T eps, T c, T& w) {
  const T gz = gw * ref_residual<T>(a, b, h_over_s, eps);
  w += c * gz;
  return gz * (c * h_over_s);
}

// Forward kernel: returns its part of ∂/∂x and adds c_f·(1 + λh)·gw·z_f to the pull w.
template <typename T>
PATHSMC_HD T em_bwd_fwd(T gw, T a, T x_new, T lam, T h, T h_over_s, T eps, T c_f, T& w) {
  const T gz = gw * fwd_residual<T>(a, x_new, lam, h_over_s, eps);
  w += gz * (c_f * (static_cast<T>(1) + lam * h));
  return gz * (-c_f * lam * h_over_s);
}

template <typename T>
PATHSMC_HD T em_bwd_x(T gx, T gx_fwd) {
  return gx + gx_fwd;
}

template <typename T>
PATHSMC_HD T em_bwd_drift(T gx, T w, T h, T h_over_s) {
  return gx * h - w * h_over_s;
}

template <typename T>
PATHSMC_HD T em_bwd_noise(T gx, T gw, T eps, T w, T s) {
  return gx * s + gw * eps - w;
}

// kernel_logpdf: out = logw + coef·(−½|z|² + const), z = (y − base·(1 + λh) − drift·h)/s.
// Returns ∂out/∂y = g·(−coef/s²)·(s·z) for the row's upstream gradient g (g_scaled =
// g·(−coef/s²), base_scale = 1 + λh); then ∂/∂base = −(1 + λh)·∂/∂y, ∂/∂drift = −h·∂/∂y.
template <typename T>
PATHSMC_HD T kernel_logpdf_bwd_y(T g_scaled, T y, T base, T drift, T base_scale, T h) {
  return g_scaled * (y - base * base_scale - drift * h);
}

}  // namespace pathsmc
