// Argument checks shared by the CPU and CUDA entry points of every op (host code only).
// The Python wrappers give friendlier errors first; these keep torch.ops.pathsmc.* safe when
// called directly. Each returns the contiguous tensors the kernels read.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "pathsmc/resampling.h"

namespace pathsmc {

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op,
                       const char* name, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              op, ": ", name, " must match ", like_name, " in shape, dtype and device; got ",
              t.sizes(), " ", t.scalar_type(), " vs ", like.sizes(), " ", like.scalar_type());
}

inline void check_rows(const at::Tensor& w, const at::Tensor& x, const char* op,
                       const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == x.size(1) &&
                  w.device() == x.device(),
              op, ": ", name, " must be (B, N) matching the states, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", w.scalar_type());
}

struct EmStepInputs {
  at::Tensor x, drift, logw, noise;  // logw / noise undefined when absent
  std::vector<at::Tensor> refs;
  at::Tensor row_dt, row_sigma;      // float64 (B,) or undefined
};

// Optional per-row (B,) override of a scalar parameter, as float64.
inline at::Tensor check_row_param(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                  const char* name) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0) && t->device() == x.device(), "em_step: ",
              name, " must be (B,) on x's device, got ", t->sizes());
  return t->to(at::kDouble).contiguous();
}

inline EmStepInputs check_em_step(const at::Tensor& x, const at::Tensor& drift,
                                  const std::optional<at::Tensor>& logw, double sigma,
                                  at::TensorList ref_drifts, at::ArrayRef<double> ref_coefs,
                                  const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Tensor>& row_dt,
                                  const std::optional<at::Tensor>& row_sigma) {
  TORCH_CHECK(x.dim() == 3, "em_step: x must be (B, N, D), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) > 0, "em_step: x has an empty event (D = 0)");
  check_same(drift, x, "em_step", "drift", "x");
  TORCH_CHECK(ref_drifts.size() == ref_coefs.size(),
              "em_step: ref_coefs must have one entry per ref_drifts tensor");
  EmStepInputs in{x.contiguous(), drift.contiguous(), {}, {}, {}, {}, {}};
  in.row_dt = check_row_param(row_dt, x, "row_dt");
  in.row_sigma = check_row_param(row_sigma, x, "row_sigma");
  for (const auto& r : ref_drifts) {
    check_same(r, x, "em_step", "every ref_drifts tensor", "x");
    in.refs.push_back(r.contiguous());
  }
  if (noise.has_value()) {
    check_same(*noise, x, "em_step", "noise", "x");
    in.noise = noise->contiguous();
  }
  if (logw.has_value()) {
    check_rows(*logw, x, "em_step", "logw");
    TORCH_CHECK(sigma > 0 || in.row_sigma.defined(),
                "em_step: sigma must be > 0 when logw is given");
    in.logw = logw->contiguous();
  }
  return in;
}

struct KernelLogpdfInputs {
  at::Tensor y, base, drift, logw;  // drift undefined when absent
};

inline KernelLogpdfInputs check_kernel_logpdf(const at::Tensor& y, const at::Tensor& base,
                                              const std::optional<at::Tensor>& drift,
                                              double dt, double sigma, const at::Tensor& logw) {
  TORCH_CHECK(y.dim() == 3, "kernel_logpdf: y must be (B, N, D), got ", y.sizes());
  TORCH_CHECK_VALUE(y.size(2) > 0, "kernel_logpdf: y has an empty event (D = 0)");
  check_same(base, y, "kernel_logpdf", "base", "y");
  check_rows(logw, y, "kernel_logpdf", "logw");
  TORCH_CHECK(sigma > 0 && dt > 0, "kernel_logpdf: dt and sigma must be > 0");
  KernelLogpdfInputs in{y.contiguous(), base.contiguous(), {}, logw.contiguous()};
  if (drift.has_value()) {
    check_same(*drift, y, "kernel_logpdf", "drift", "y");
    in.drift = drift->contiguous();
  }
  return in;
}

struct EmStepBackwardInputs {
  at::Tensor grad_x_new, grad_logw, x, drift, noise, x_new;  // grads / noise: undefined if absent
  std::vector<at::Tensor> refs;
  at::Tensor row_dt, row_sigma;  // float64 (B,) or undefined
};

// The backward of em_step: the forward's tensors plus the upstream gradients; grad_logw comes
// back as float64 (B, N) (one value per row of D elements: a small copy).
inline EmStepBackwardInputs check_em_step_backward(
    const std::optional<at::Tensor>& grad_x_new, const std::optional<at::Tensor>& grad_logw,
    const at::Tensor& x, const at::Tensor& drift, const std::optional<at::Tensor>& noise,
    const at::Tensor& x_new, double sigma, at::TensorList ref_drifts,
    at::ArrayRef<double> ref_coefs, const std::optional<at::Tensor>& row_dt,
    const std::optional<at::Tensor>& row_sigma) {
  const char* op = "em_step_backward";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, D), got ", x.sizes());
  check_same(drift, x, op, "drift", "x");
  check_same(x_new, x, op, "x_new", "x");
  TORCH_CHECK(ref_drifts.size() == ref_coefs.size(), op,
              ": ref_coefs must have one entry per ref_drifts tensor");
  EmStepBackwardInputs in;
  in.x = x.contiguous();
  in.drift = drift.contiguous();
  in.x_new = x_new.contiguous();
  in.row_dt = check_row_param(row_dt, x, "row_dt");
  in.row_sigma = check_row_param(row_sigma, x, "row_sigma");
  TORCH_CHECK(sigma > 0 || in.row_sigma.defined(), op, ": sigma must be > 0");
  for (const auto& r : ref_drifts) {
    check_same(r, x, op, "every ref_drifts tensor", "x");
    in.refs.push_back(r.contiguous());
  }
  if (noise.has_value()) {
    check_same(*noise, x, op, "noise", "x");
    in.noise = noise->contiguous();
  }
  if (grad_x_new.has_value()) {
    check_same(*grad_x_new, x, op, "grad_x_new", "x");
    in.grad_x_new = grad_x_new->contiguous();
  }
  if (grad_logw.has_value()) {
    check_rows(*grad_logw, x, op, "grad_logw");
    in.grad_logw = grad_logw->to(at::kDouble).contiguous();
  }
  return in;
}

struct KernelLogpdfBackwardInputs {
  at::Tensor grad, y, base, drift;  // grad: float64 (B, N); drift undefined when absent
};

inline KernelLogpdfBackwardInputs check_kernel_logpdf_backward(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& base,
    const std::optional<at::Tensor>& drift, double dt, double sigma) {
  const char* op = "kernel_logpdf_backward";
  TORCH_CHECK(y.dim() == 3, op, ": y must be (B, N, D), got ", y.sizes());
  check_same(base, y, op, "base", "y");
  check_rows(grad, y, op, "grad");
  TORCH_CHECK(sigma > 0 && dt > 0, op, ": dt and sigma must be > 0");
  KernelLogpdfBackwardInputs in{grad.to(at::kDouble).contiguous(), y.contiguous(),
                                base.contiguous(), {}};
  if (drift.has_value()) {
    check_same(*drift, y, op, "drift", "y");
    in.drift = drift->contiguous();
  }
  return in;
}

struct MalaInputs {
  at::Tensor x, x_prop, logp, logp_prop, grad, grad_prop, step, uniforms;  // uniforms: float64
};

inline MalaInputs check_mala(const at::Tensor& x, const at::Tensor& x_prop,
                             const at::Tensor& logp, const at::Tensor& logp_prop,
                             const at::Tensor& grad, const at::Tensor& grad_prop,
                             const at::Tensor& step, const std::optional<at::Tensor>& uniforms) {
  TORCH_CHECK(x.dim() == 3, "mala_accept: x must be (B, N, D), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) > 0, "mala_accept: x has an empty event (D = 0)");
  check_same(x_prop, x, "mala_accept", "x_prop", "x");
  check_same(grad, x, "mala_accept", "grad", "x");
  check_same(grad_prop, x, "mala_accept", "grad_prop", "x");
  check_rows(logp, x, "mala_accept", "logp");
  check_same(logp_prop, logp, "mala_accept", "logp_prop", "logp");
  TORCH_CHECK(step.numel() == x.size(0) && step.device() == x.device(),
              "mala_accept: step must have one entry per row (B,) on x's device");
  MalaInputs in{x.contiguous(),        x_prop.contiguous(), logp.contiguous(),
                logp_prop.contiguous(), grad.contiguous(),   grad_prop.contiguous(),
                step.to(at::kDouble).contiguous(), {}};
  if (uniforms.has_value()) {
    TORCH_CHECK(uniforms->sizes() == logp.sizes() && uniforms->device() == x.device(),
                "mala_accept: uniforms must be (B, N) on x's device");
    in.uniforms = uniforms->to(at::kDouble).contiguous();
  }
  return in;
}

inline Scheme check_scheme(c10::string_view name) {
  Scheme s;
  TORCH_CHECK_VALUE(parse_scheme(std::string(name), &s), "resample: unknown scheme '",
                    std::string(name),
                    "'; expected systematic, stratified, multinomial or residual");
  return s;
}

inline void check_logw(const at::Tensor& logw, const char* op) {
  TORCH_CHECK(logw.dim() == 2, op, ": logw must be (B, N), got ", logw.sizes());
  TORCH_CHECK(logw.size(1) > 0, op, ": logw has an empty population (N = 0)");
  TORCH_CHECK(logw.scalar_type() == at::kFloat || logw.scalar_type() == at::kDouble, op,
              ": logw must be float32 or float64, got ", logw.scalar_type());
}

// Explicit resampling uniforms as float64: (B,) for systematic, (B, M) otherwise.
inline at::Tensor check_resampling_uniforms(const at::Tensor& u, Scheme scheme, int64_t B,
                                            int64_t M, const at::Tensor& logw) {
  const bool systematic = scheme == Scheme::kSystematic;
  const bool ok = systematic ? (u.dim() == 1 && u.size(0) == B)
                             : (u.dim() == 2 && u.size(0) == B && u.size(1) == M);
  TORCH_CHECK(ok && u.device() == logw.device(), "resample: uniforms must be ",
              systematic ? "(B,)" : "(B, M)", " on logw's device for this scheme, got ",
              u.sizes());
  return u.to(at::kDouble).contiguous();
}

// Every state tensor is (rows, cols, ...) on `device`: particles (B, N) or replicas (K, C).
inline void check_states(at::TensorList states, int64_t rows, int64_t cols,
                         const at::Device& device, const char* op, const char* layout) {
  for (const auto& s : states)
    TORCH_CHECK(s.dim() >= 2 && s.size(0) == rows && s.size(1) == cols && s.device() == device,
                op, ": every state must be ", layout, " on the same device, got ", s.sizes(),
                " on ", s.device());
}

// States gathered in place: (rows, cols, ...) on `device`, and contiguous.
inline void check_inplace_states(at::TensorList states, int64_t rows, int64_t cols,
                                 const at::Device& device, const char* op) {
  check_states(states, rows, cols, device, op, "(B, N, ...)");
  for (size_t i = 0; i < states.size(); ++i)
    TORCH_CHECK(states[i].is_contiguous(), op, ": states[", i,
                "] must be contiguous (it is gathered in place)");
}

// log_ratio (K-1, C) with K >= 2, and its optional uniforms, as float64.
inline std::pair<at::Tensor, at::Tensor> check_replica_swap(
    const at::Tensor& log_ratio, const std::optional<at::Tensor>& uniforms) {
  TORCH_CHECK(log_ratio.dim() == 2 && log_ratio.size(0) >= 1,
              "replica_swap: log_ratio must be (K-1, C) with K >= 2, got ", log_ratio.sizes());
  at::Tensor u;
  if (uniforms.has_value()) {
    TORCH_CHECK(uniforms->sizes() == log_ratio.sizes() && uniforms->device() == log_ratio.device(),
                "replica_swap: uniforms must be (K-1, C) like log_ratio");
    u = uniforms->to(at::kDouble).contiguous();
  }
  return {log_ratio.to(at::kDouble).contiguous(), u};
}

}  // namespace pathsmc
