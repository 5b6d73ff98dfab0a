// CPU kernels of the backward passes of the step family: em_step_backward and
// kernel_logpdf_backward. One pass over the elements, in chunks of kChunk that stay in L1:
// per-element step sizes and row gradients are spread first so that every loop is flat.
// The per-element math is in csrc/include/pathsmc/step_backward.h (shared with CUDA).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/common.h"
#include "pathsmc/gaussian.h"
#include "pathsmc/step_backward.h"

namespace pathsmc::cpu {
namespace {

constexpr int64_t kChunk = 256;

struct EmBwdArgs {
  double dt, sigma, fwd_coef, fwd_linear;
  std::vector<double> coefs;
  const double* row_dt;     // (B,) or nullptr
  const double* row_sigma;  // (B,) or nullptr
  std::array<bool, 4> mask;  // x, drift, refs, noise
};

template <typename T>
void em_step_backward_rows(const EmStepBackwardInputs& in, const EmBwdArgs& args, at::Tensor& gx_o,
                           at::Tensor& ga_o, std::vector<at::Tensor>& gb_o, at::Tensor& gn_o) {
  const int64_t N = in.x.size(1), D = in.x.size(2), rows = in.x.size(0) * N;
  const int64_t K = static_cast<int64_t>(in.refs.size());
  const T* xp = in.x.data_ptr<T>();
  const T* ap = in.drift.data_ptr<T>();
  const T* xnp = in.x_new.data_ptr<T>();
  const T* np = in.noise.defined() ? in.noise.data_ptr<T>() : nullptr;
  const T* gxp = in.grad_x_new.defined() ? in.grad_x_new.data_ptr<T>() : nullptr;
  const double* gwp = in.grad_logw.defined() ? in.grad_logw.data_ptr<double>() : nullptr;
  std::vector<const T*> bp(K);
  std::vector<T*> gbp(K, nullptr);
  for (int64_t k = 0; k < K; ++k) {
    bp[k] = in.refs[k].data_ptr<T>();
    if (args.mask[2]) gbp[k] = gb_o[k].data_ptr<T>();
  }
  T* gxo = args.mask[0] ? gx_o.data_ptr<T>() : nullptr;
  T* gao = args.mask[1] ? ga_o.data_ptr<T>() : nullptr;
  T* gno = args.mask[3] ? gn_o.data_ptr<T>() : nullptr;
  const bool weighted = gwp != nullptr, fwd = args.fwd_coef != 0.0;
  const bool per_row = args.row_dt || args.row_sigma;
  const T lam = static_cast<T>(args.fwd_linear), c_f = static_cast<T>(args.fwd_coef);

  parallel_rows(rows, D * (4 + 2 * K), [&, gxo, gao, gno](int64_t r0, int64_t r1) {
    alignas(64) double hd[kChunk], sd[kChunk];
    alignas(64) T hv[kChunk], sv[kChunk], hsv[kChunk], gwv[kChunk], epsv[kChunk], wv[kChunk],
        gxf[kChunk], zeros[kChunk];
    std::fill_n(zeros, kChunk, T(0));
    auto fill_steps = [&](int64_t from, int64_t count, int64_t b) {
      const RowStep st = RowStep::of(b, args.dt, args.sigma, args.row_dt, args.row_sigma);
      std::fill_n(hd + from, count, st.h);
      std::fill_n(sd + from, count, st.s);
      std::fill_n(hv + from, count, static_cast<T>(st.h));
      std::fill_n(sv + from, count, static_cast<T>(st.s));
      std::fill_n(hsv + from, count, static_cast<T>(st.h / st.s));
    };
    if (!per_row) fill_steps(0, kChunk, 0);
    if (!weighted) {
      std::fill_n(gwv, kChunk, T(0));
      std::fill_n(epsv, kChunk, T(0));
    }
    for (int64_t e0 = r0 * D; e0 < r1 * D; e0 += kChunk) {
      const int64_t len = std::min(kChunk, r1 * D - e0);
      if (per_row || weighted) {
        for (int64_t i = 0; i < len;) {  // runs of elements of one row
          const int64_t r = (e0 + i) / D, run = std::min(len - i, (r + 1) * D - (e0 + i));
          if (per_row) fill_steps(i, run, r / N);
          if (weighted) std::fill_n(gwv + i, run, static_cast<T>(gwp[r]));
          i += run;
        }
      }
      const T *x = xp + e0, *a = ap + e0, *xn = xnp + e0;
      const T* gx = gxp ? gxp + e0 : zeros;
      const T* eps = epsv;
      std::fill_n(wv, len, T(0));
      std::fill_n(gxf, len, T(0));
      if (weighted) {
        if (np) {
          eps = np + e0;
        } else {
          for (int64_t i = 0; i < len; ++i)
            epsv[i] = static_cast<T>(em_recover_noise(static_cast<double>(xn[i]),
                                                      static_cast<double>(x[i]),
                                                      static_cast<double>(a[i]), hd[i], sd[i]));
        }
        for (int64_t k = 0; k < K; ++k) {
          const T* b = bp[k] + e0;
          const T c = static_cast<T>(args.coefs[k]);
          if (gbp[k]) {
            T* gb = gbp[k] + e0;
            for (int64_t i = 0; i < len; ++i)
              gb[i] = em_bwd_ref<T>(gwv[i], a[i], b[i], hsv[i], eps[i], c, wv[i]);
          } else {
            for (int64_t i = 0; i < len; ++i)
              (void)em_bwd_ref<T>(gwv[i], a[i], b[i], hsv[i], eps[i], c, wv[i]);
          }
        }
        if (fwd) {
          for (int64_t i = 0; i < len; ++i)
            gxf[i] = em_bwd_fwd<T>(gwv[i], a[i], xn[i], lam, hv[i], hsv[i], eps[i], c_f, wv[i]);
        }
      }
      if (gxo) {
        T* o = gxo + e0;
        for (int64_t i = 0; i < len; ++i) o[i] = em_bwd_x<T>(gx[i], gxf[i]);
      }
      if (gao) {
        T* o = gao + e0;
        for (int64_t i = 0; i < len; ++i) o[i] = em_bwd_drift<T>(gx[i], wv[i], hv[i], hsv[i]);
      }
      if (gno) {
        T* o = gno + e0;
        for (int64_t i = 0; i < len; ++i) o[i] = em_bwd_noise<T>(gx[i], gwv[i], eps[i], wv[i], sv[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor> em_step_backward_cpu(
    const std::optional<at::Tensor>& grad_x_new, const std::optional<at::Tensor>& grad_logw,
    const at::Tensor& x_in, const at::Tensor& drift_in, const std::optional<at::Tensor>& noise_in,
    const at::Tensor& x_new_in, double dt, double sigma, at::TensorList ref_drifts,
    at::ArrayRef<double> ref_coefs, double fwd_coef, double fwd_linear,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& row_dt,
    const std::optional<at::Tensor>& row_sigma) {
  const EmStepBackwardInputs in =
      check_em_step_backward(grad_x_new, grad_logw, x_in, drift_in, noise_in, x_new_in, sigma,
                             ref_drifts, ref_coefs, row_dt, row_sigma);
  const at::Tensor& x = in.x;
  auto out = [&](bool need) { return need ? at::empty_like(x) : at::empty({0}, x.options()); };
  at::Tensor gx = out(output_mask[0]), ga = out(output_mask[1]), gn = out(output_mask[3]);
  std::vector<at::Tensor> gb;
  if (output_mask[2])  // without grad_logw the reference drifts get no gradient: zeros
    for (size_t k = 0; k < in.refs.size(); ++k)
      gb.push_back(in.grad_logw.defined() ? at::empty_like(x) : at::zeros_like(x));
  const EmBwdArgs args{dt,
                       sigma,
                       fwd_coef,
                       fwd_linear,
                       std::vector<double>(ref_coefs.begin(), ref_coefs.end()),
                       in.row_dt.defined() ? in.row_dt.data_ptr<double>() : nullptr,
                       in.row_sigma.defined() ? in.row_sigma.data_ptr<double>() : nullptr,
                       output_mask};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pathsmc::em_step_backward", [&] {
    em_step_backward_rows<scalar_t>(in, args, gx, ga, gb, gn);
  });
  return {gx, ga, gb, gn};
}

template <typename T>
void kernel_logpdf_backward_rows(const KernelLogpdfBackwardInputs& in, double h, double sigma,
                                 double coef, double lam, std::array<bool, 3> mask,
                                 at::Tensor& gy_o, at::Tensor& gbase_o, at::Tensor& gdrift_o) {
  const int64_t rows = in.y.size(0) * in.y.size(1), D = in.y.size(2);
  const T* yp = in.y.data_ptr<T>();
  const T* bp = in.base.data_ptr<T>();
  const T* dp = in.drift.defined() ? in.drift.data_ptr<T>() : nullptr;
  const double* gp = in.grad.data_ptr<double>();
  T* gyo = mask[0] ? gy_o.data_ptr<T>() : nullptr;
  T* gbo = mask[1] ? gbase_o.data_ptr<T>() : nullptr;
  T* gdo = (mask[2] && dp) ? gdrift_o.data_ptr<T>() : nullptr;
  const T scale = static_cast<T>(-coef / (sigma * sigma * h));
  const T base_scale = static_cast<T>(1.0 + lam * h), hh = static_cast<T>(h);
  const T f_base = static_cast<T>(-(1.0 + lam * h)), f_drift = static_cast<T>(-h);
  parallel_rows(rows, 4 * D, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * D;
      const T g = static_cast<T>(gp[r]) * scale;
      for (int64_t d = 0; d < D; ++d) {
        const T dr = dp ? dp[o + d] : T(0);
        const T gz = kernel_logpdf_bwd_y<T>(g, yp[o + d], bp[o + d], dr, base_scale, hh);
        if (gyo) gyo[o + d] = gz;
        if (gbo) gbo[o + d] = gz * f_base;
        if (gdo) gdo[o + d] = gz * f_drift;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_logpdf_backward_cpu(
    const at::Tensor& grad, const at::Tensor& y_in, const at::Tensor& base_in,
    const std::optional<at::Tensor>& drift_in, double dt, double sigma, double coef,
    double linear, std::array<bool, 3> output_mask) {
  const KernelLogpdfBackwardInputs in =
      check_kernel_logpdf_backward(grad, y_in, base_in, drift_in, dt, sigma);
  const at::Tensor& y = in.y;
  auto out = [&](bool need) { return need ? at::empty_like(y) : at::empty({0}, y.options()); };
  at::Tensor gy = out(output_mask[0]), gb = out(output_mask[1]);
  at::Tensor gd = out(output_mask[2] && in.drift.defined());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pathsmc::kernel_logpdf_backward", [&] {
    kernel_logpdf_backward_rows<scalar_t>(in, dt, sigma, coef, linear, output_mask, gy, gb, gd);
  });
  return {gy, gb, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CPU, m) {
  m.impl("em_step_backward", &em_step_backward_cpu);
  m.impl("kernel_logpdf_backward", &kernel_logpdf_backward_cpu);
}

}  // namespace pathsmc::cpu
