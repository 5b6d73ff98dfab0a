// CUDA kernels of the backward passes of the step family: em_step_backward and
// kernel_logpdf_backward. Element-wise (no reduction): one thread per element in a grid-stride
// loop, reading the row's upstream weight gradient and step size; opmath arithmetic (float for
// half/bfloat16/float, double for double). Same per-element math as the CPU
// (csrc/include/pathsmc/step_backward.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "pathsmc/gaussian.h"
#include "pathsmc/step_backward.h"

namespace pathsmc::cuda {
namespace {

constexpr int kMaxRefs = 8;  // as em_step (csrc/cuda/step.cu): pointers go by value

template <typename scalar_t>
struct EmBwdArgs {
  const scalar_t* x;
  const scalar_t* drift;
  const scalar_t* x_new;
  const scalar_t* noise;       // nullptr: recovered from x'
  const scalar_t* grad_x_new;  // nullptr: zero
  const double* grad_logw;     // (B, N) float64, nullptr: zero
  const scalar_t* refs[kMaxRefs];
  scalar_t* g_refs[kMaxRefs];  // nullptr entries: not wanted
  double coefs[kMaxRefs];
  int K;
  scalar_t* g_x;  // nullptr: not wanted (the same for g_drift, g_noise)
  scalar_t* g_drift;
  scalar_t* g_noise;
  int64_t numel, N, D;
  double dt, sigma, fwd_coef, fwd_linear;
  const double* row_dt;
  const double* row_sigma;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) em_step_backward_kernel(const EmBwdArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool weighted = a.grad_logw != nullptr, fwd = a.fwd_coef != 0.0;
  const acc_t lam = static_cast<acc_t>(a.fwd_linear), c_f = static_cast<acc_t>(a.fwd_coef);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < a.numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / a.D;
    const RowStep st = RowStep::of(r / a.N, a.dt, a.sigma, a.row_dt, a.row_sigma);
    const acc_t h = static_cast<acc_t>(st.h), s = static_cast<acc_t>(st.s);
    const acc_t hs = static_cast<acc_t>(st.h / st.s);
    const acc_t gx = a.grad_x_new ? static_cast<acc_t>(a.grad_x_new[e]) : acc_t(0);
    const acc_t dr = static_cast<acc_t>(a.drift[e]);
    acc_t gw = 0, eps = 0, w = 0, gxf = 0;
    if (weighted) {
      gw = static_cast<acc_t>(a.grad_logw[r]);
      const acc_t xn = static_cast<acc_t>(a.x_new[e]);
      eps = a.noise ? static_cast<acc_t>(a.noise[e])
                    : static_cast<acc_t>(em_recover_noise(
                          static_cast<double>(a.x_new[e]), static_cast<double>(a.x[e]),
                          static_cast<double>(a.drift[e]), st.h, st.s));
#pragma unroll
      for (int k = 0; k < kMaxRefs; ++k) {
        if (k >= a.K) break;
        const acc_t g = em_bwd_ref<acc_t>(gw, dr, static_cast<acc_t>(a.refs[k][e]), hs, eps,
                                          static_cast<acc_t>(a.coefs[k]), w);
        if (a.g_refs[k]) a.g_refs[k][e] = static_cast<scalar_t>(g);
      }
      if (fwd) gxf = em_bwd_fwd<acc_t>(gw, dr, xn, lam, h, hs, eps, c_f, w);
    }
    if (a.g_x) a.g_x[e] = static_cast<scalar_t>(em_bwd_x<acc_t>(gx, gxf));
    if (a.g_drift) a.g_drift[e] = static_cast<scalar_t>(em_bwd_drift<acc_t>(gx, w, h, hs));
    if (a.g_noise) a.g_noise[e] = static_cast<scalar_t>(em_bwd_noise<acc_t>(gx, gw, eps, w, s));
  }
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor> em_step_backward_cuda(
    const std::optional<at::Tensor>& grad_x_new, const std::optional<at::Tensor>& grad_logw,
    const at::Tensor& x_in, const at::Tensor& drift_in, const std::optional<at::Tensor>& noise_in,
    const at::Tensor& x_new_in, double dt, double sigma, at::TensorList ref_drifts,
    at::ArrayRef<double> ref_coefs, double fwd_coef, double fwd_linear,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& row_dt,
    const std::optional<at::Tensor>& row_sigma) {
  TORCH_CHECK(static_cast<int>(ref_drifts.size()) <= kMaxRefs, "em_step_backward: at most ",
              kMaxRefs, " ref_drifts on CUDA, got ", ref_drifts.size());
  const EmStepBackwardInputs in =
      check_em_step_backward(grad_x_new, grad_logw, x_in, drift_in, noise_in, x_new_in, sigma,
                             ref_drifts, ref_coefs, row_dt, row_sigma);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor& x = in.x;
  auto out = [&](bool need) { return need ? at::empty_like(x) : at::empty({0}, x.options()); };
  at::Tensor gx = out(output_mask[0]), ga = out(output_mask[1]), gn = out(output_mask[3]);
  std::vector<at::Tensor> gb;
  if (output_mask[2])  // without grad_logw the reference drifts get no gradient: zeros
    for (size_t k = 0; k < in.refs.size(); ++k)
      gb.push_back(in.grad_logw.defined() ? at::empty_like(x) : at::zeros_like(x));
  if (x.numel() == 0) return {gx, ga, gb, gn};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pathsmc::em_step_backward", [&] {
        EmBwdArgs<scalar_t> a{};
        a.x = x.data_ptr<scalar_t>();
        a.drift = in.drift.data_ptr<scalar_t>();
        a.x_new = in.x_new.data_ptr<scalar_t>();
        a.noise = in.noise.defined() ? in.noise.data_ptr<scalar_t>() : nullptr;
        a.grad_x_new = in.grad_x_new.defined() ? in.grad_x_new.data_ptr<scalar_t>() : nullptr;
        a.grad_logw = in.grad_logw.defined() ? in.grad_logw.data_ptr<double>() : nullptr;
        a.K = static_cast<int>(in.refs.size());
        for (int k = 0; k < a.K; ++k) {
          a.refs[k] = in.refs[k].data_ptr<scalar_t>();
          a.g_refs[k] = output_mask[2] ? gb[k].data_ptr<scalar_t>() : nullptr;
          a.coefs[k] = ref_coefs[k];
        }
        a.g_x = output_mask[0] ? gx.data_ptr<scalar_t>() : nullptr;
        a.g_drift = output_mask[1] ? ga.data_ptr<scalar_t>() : nullptr;
        a.g_noise = output_mask[3] ? gn.data_ptr<scalar_t>() : nullptr;
        a.numel = x.numel();
        a.N = x.size(1);
        a.D = x.size(2);
        a.dt = dt;
        a.sigma = sigma;
        a.fwd_coef = fwd_coef;
        a.fwd_linear = fwd_linear;
        a.row_dt = in.row_dt.defined() ? in.row_dt.data_ptr<double>() : nullptr;
        a.row_sigma = in.row_sigma.defined() ? in.row_sigma.data_ptr<double>() : nullptr;
        em_step_backward_kernel<scalar_t>
            <<<grid_for(a.numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
        PATHSMC_CUDA_CHECK_LAUNCH();
      });
  return {gx, ga, gb, gn};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kernel_logpdf_backward_kernel(
    const double* __restrict__ grad, const scalar_t* __restrict__ y,
    const scalar_t* __restrict__ base, const scalar_t* __restrict__ drift,
    scalar_t* __restrict__ gy, scalar_t* __restrict__ gbase, scalar_t* __restrict__ gdrift,
    int64_t numel, int64_t D, double h, double scale, double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t base_scale = static_cast<acc_t>(1.0 + lam * h), hh = static_cast<acc_t>(h);
  const acc_t f_base = static_cast<acc_t>(-(1.0 + lam * h)), f_drift = static_cast<acc_t>(-h);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t g = static_cast<acc_t>(grad[e / D]) * static_cast<acc_t>(scale);
    const acc_t dr = drift ? static_cast<acc_t>(drift[e]) : acc_t(0);
    const acc_t gz = kernel_logpdf_bwd_y<acc_t>(g, static_cast<acc_t>(y[e]),
                                                static_cast<acc_t>(base[e]), dr, base_scale, hh);
    if (gy) gy[e] = static_cast<scalar_t>(gz);
    if (gbase) gbase[e] = static_cast<scalar_t>(gz * f_base);
    if (gdrift) gdrift[e] = static_cast<scalar_t>(gz * f_drift);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_logpdf_backward_cuda(
    const at::Tensor& grad, const at::Tensor& y_in, const at::Tensor& base_in,
    const std::optional<at::Tensor>& drift_in, double dt, double sigma, double coef,
    double linear, std::array<bool, 3> output_mask) {
  const KernelLogpdfBackwardInputs in =
      check_kernel_logpdf_backward(grad, y_in, base_in, drift_in, dt, sigma);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor& y = in.y;
  auto out = [&](bool need) { return need ? at::empty_like(y) : at::empty({0}, y.options()); };
  const bool has_drift = in.drift.defined();
  at::Tensor gy = out(output_mask[0]), gb = out(output_mask[1]);
  at::Tensor gd = out(output_mask[2] && has_drift);
  if (y.numel() == 0) return {gy, gb, gd};
  const double scale = -coef / (sigma * sigma * dt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "pathsmc::kernel_logpdf_backward", [&] {
        kernel_logpdf_backward_kernel<scalar_t>
            <<<grid_for(y.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                in.grad.data_ptr<double>(), y.data_ptr<scalar_t>(), in.base.data_ptr<scalar_t>(),
                has_drift ? in.drift.data_ptr<scalar_t>() : nullptr,
                output_mask[0] ? gy.data_ptr<scalar_t>() : nullptr,
                output_mask[1] ? gb.data_ptr<scalar_t>() : nullptr,
                output_mask[2] && has_drift ? gd.data_ptr<scalar_t>() : nullptr, y.numel(),
                y.size(2), dt, scale, linear);
        PATHSMC_CUDA_CHECK_LAUNCH();
      });
  return {gy, gb, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CUDA, m) {
  m.impl("em_step_backward", &em_step_backward_cuda);
  m.impl("kernel_logpdf_backward", &kernel_logpdf_backward_cuda);
}

}  // namespace pathsmc::cuda
