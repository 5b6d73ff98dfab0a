// CPU kernels of the step family: em_step and kernel_logpdf.
// One pass over memory per row of D elements; noise drawn in chunks from the Philox stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/common.h"
#include "pathsmc/gaussian.h"
#include "pathsmc/philox.h"

namespace pathsmc::cpu {
namespace {

constexpr int64_t kChunk = 256;  // elements of noise generated at a time (multiple of 4)

// Normals of Philox blocks [g0, g0 + nb) into out[0, 4·nb), in three simple loops (counters,
// Box–Muller, interleave) that the compiler vectorizes.
void normal_blocks_float(
    uint64_t seed, uint64_t offset, int64_t g0, int64_t nb, float* __restrict out) {
  constexpr int64_t kMax = kChunk / 4 + 1;
  alignas(64) uint32_t w[4][kMax];
  alignas(64) float z[4][kMax];
  for (int64_t i = 0; i < nb; ++i) {
    const Philox4 r = philox4x32_10(seed, static_cast<uint64_t>(g0 + i), offset);
    w[0][i] = r.v[0]; w[1][i] = r.v[1]; w[2][i] = r.v[2]; w[3][i] = r.v[3];
  }
  for (int64_t i = 0; i < nb; ++i) {
    box_muller(uniform_float_pos(w[0][i]), uniform_float(w[1][i]), z[0][i], z[1][i]);
    box_muller(uniform_float_pos(w[2][i]), uniform_float(w[3][i]), z[2][i], z[3][i]);
  }
  for (int64_t i = 0; i < nb; ++i)
    for (int k = 0; k < 4; ++k) out[4 * i + k] = z[k][i];
}

// The float64 twin: 2 normals per block from 53-bit uniforms.
void normal_blocks_double(uint64_t seed, uint64_t offset, int64_t g0, int64_t nb,
                          double* __restrict__ out) {
  constexpr int64_t kMax = kChunk / 2 + 1;
  alignas(64) uint32_t w[4][kMax];
  alignas(64) double z[2][kMax];
  for (int64_t i = 0; i < nb; ++i) {
    const Philox4 r = philox4x32_10(seed, static_cast<uint64_t>(g0 + i), offset);
    w[0][i] = r.v[0]; w[1][i] = r.v[1]; w[2][i] = r.v[2]; w[3][i] = r.v[3];
  }
  for (int64_t i = 0; i < nb; ++i)
    box_muller(uniform_double_pos(w[0][i], w[1][i]), uniform_double(w[2][i], w[3][i]), z[0][i],
               z[1][i]);
  for (int64_t i = 0; i < nb; ++i) {
    out[2 * i] = z[0][i];
    out[2 * i + 1] = z[1][i];
  }
}

// Standard normals for flat elements [e0, e0 + len), len <= kChunk, of the stream
// (seed, offset): element e is lane e % kPer of Philox block e / kPer.
template <typename T>
void fill_normals(uint64_t seed, uint64_t offset, int64_t e0, int64_t len, T* out) {
  constexpr int kPer = NormalBlock<T>::kPerCall;
  const int64_t g0 = e0 / kPer, g1 = (e0 + len + kPer - 1) / kPer;
  alignas(64) T tmp[kChunk + 2 * kPer];
  if constexpr (std::is_same_v<T, float>) {
    normal_blocks_float(seed, offset, g0, g1 - g0, tmp);
  } else {
    normal_blocks_double(seed, offset, g0, g1 - g0, tmp);
  }
  std::memcpy(out, tmp + (e0 - g0 * kPer), len * sizeof(T));
}

struct StepArgs {
  double dt, sigma, fwd_coef, fwd_linear;
  std::vector<double> coefs;
  uint64_t seed, offset;
  const double* row_dt;     // (B,) overrides of dt, or nullptr
  const double* row_sigma;  // (B,) overrides of sigma, or nullptr
};

template <typename scalar_t, typename weight_t>
void em_step_rows(const at::Tensor& x, const at::Tensor& drift, const std::vector<at::Tensor>& refs,
                  const at::Tensor* noise, const at::Tensor* logw, at::Tensor& x_out,
                  at::Tensor* logw_out, const StepArgs& args) {
  const int64_t rows = x.size(0) * x.size(1), D = x.size(2);
  const int64_t K = static_cast<int64_t>(refs.size());
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = drift.data_ptr<scalar_t>();
  const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
  std::vector<const scalar_t*> bp(K);
  for (int64_t k = 0; k < K; ++k) bp[k] = refs[k].data_ptr<scalar_t>();
  scalar_t* xo = x_out.data_ptr<scalar_t>();
  const bool weighted = logw != nullptr;
  const weight_t* lw = weighted ? logw->data_ptr<weight_t>() : nullptr;
  weight_t* lwo = weighted ? logw_out->data_ptr<weight_t>() : nullptr;
  const bool fwd = args.fwd_coef != 0.0;

  const int64_t N = x.size(1);
  const scalar_t lam = static_cast<scalar_t>(args.fwd_linear);
  double coef_total = args.fwd_coef;
  for (double c : args.coefs) coef_total += c;

  // Short rows: whole groups of rows in flat, vectorized loops (per-element weight
  // contributions, then tiny per-row sums); the per-row loop below would spend its time on
  // loop overheads. Step sizes are spread per element so per-row dt/sigma take the same path.
  if (D < kChunk / 4) {
    const int64_t group = kChunk / D;
    parallel_rows(rows, D * (2 + K), [=](int64_t r0, int64_t r1) {
      alignas(64) scalar_t eps_buf[kChunk], hv[kChunk], sv[kChunk], hsv[kChunk];
      alignas(64) double contrib[kChunk], log_norm[kChunk];
      const bool per_row = args.row_dt || args.row_sigma;
      int64_t filled_b = -1;  // the problem whose step sizes fill the arrays (-1: none yet)
      auto fill = [&](int64_t from, int64_t count, int64_t b) {
        const RowStep st = RowStep::of(b, args.dt, args.sigma, args.row_dt, args.row_sigma);
        std::fill_n(hv + from * D, count * D, static_cast<scalar_t>(st.h));
        std::fill_n(sv + from * D, count * D, static_cast<scalar_t>(st.s));
        std::fill_n(hsv + from * D, count * D,
                    static_cast<scalar_t>(weighted ? st.h / st.s : 0.0));
        std::fill_n(log_norm + from, count,
                    weighted ? gaussian_log_norm(D, st.s) * (coef_total - 1.0) : 0.0);
      };
      if (!per_row) fill(0, group, 0);  // one step size: fill once
      for (int64_t g0 = r0; g0 < r1; g0 += group) {
        const int64_t g1 = std::min(r1, g0 + group), base = g0 * D, len = (g1 - g0) * D;
        if (per_row && !(g0 / N == (g1 - 1) / N && g0 / N == filled_b)) {
          for (int64_t r = g0; r < g1;) {  // runs of rows of the same problem
            const int64_t b = r / N, r_end = std::min(g1, (b + 1) * N);
            fill(r - g0, r_end - r, b);
            r = r_end;
          }
          filled_b = g0 / N == (g1 - 1) / N ? g0 / N : -1;
        }
        const scalar_t* eps = np ? np + base : eps_buf;
        if (!np) fill_normals<scalar_t>(args.seed, args.offset, base, len, eps_buf);
        const scalar_t *xr = xp + base, *ar = ap + base;
        scalar_t* xw = xo + base;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) xw[i] = xr[i] + ar[i] * hv[i] + sv[i] * eps[i];
        if (!weighted) continue;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i)
          contrib[i] = 0.5 * static_cast<double>(eps[i]) * eps[i] + nonfinite_to_nan(xw[i]);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* br = bp[k] + base;
          const double half_c = 0.5 * args.coefs[k];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            const scalar_t z = ref_residual<scalar_t>(ar[i], br[i], hsv[i], eps[i]);
            contrib[i] -= half_c * static_cast<double>(z) * z;
          }
        }
        if (fwd) {
          const double half_c = 0.5 * args.fwd_coef;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            const scalar_t z = fwd_residual<scalar_t>(ar[i], xw[i], lam, hsv[i], eps[i]);
            contrib[i] -= half_c * static_cast<double>(z) * z;
          }
        }
        for (int64_t r = g0; r < g1; ++r) {
          const double* c = contrib + (r - g0) * D;
          double delta = log_norm[r - g0];
          for (int64_t d = 0; d < D; ++d) delta += c[d];
          lwo[r] = static_cast<weight_t>(static_cast<double>(lw[r]) + delta);
        }
      }
    });
    return;
  }

  parallel_rows(rows, D * (2 + K), [=](int64_t r0, int64_t r1) {
    std::vector<scalar_t> eps_buf(np ? 0 : kChunk);
    std::vector<double> ss_ref(K);
    // Small rows draw their noise together, kChunk elements at a time (the draw vectorizes
    // over elements, not rows); a row longer than kChunk draws its own chunks.
    const int64_t group = (np || D >= kChunk) ? 1 : kChunk / D;
    int64_t group_start = r0, group_end = r0;
    for (int64_t r = r0; r < r1; ++r) {
      if (group > 1 && r == group_end) {
        group_start = r;
        group_end = std::min(r1, r + group);
        fill_normals<scalar_t>(args.seed, args.offset, r * D, (group_end - r) * D,
                               eps_buf.data());
      }
      const RowStep st = RowStep::of(r / N, args.dt, args.sigma, args.row_dt, args.row_sigma);
      const scalar_t h = static_cast<scalar_t>(st.h), s = static_cast<scalar_t>(st.s);
      const scalar_t h_over_s = static_cast<scalar_t>(weighted ? st.h / st.s : 0.0);
      double ss_prop = 0.0, ss_fwd = 0.0;
      std::fill(ss_ref.begin(), ss_ref.end(), 0.0);
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t len = std::min(kChunk, D - d0);
        const int64_t base = r * D + d0;
        const scalar_t* eps;
        if (np) {
          eps = np + base;
        } else if (group > 1) {
          eps = eps_buf.data() + (r - group_start) * D;
        } else {
          fill_normals<scalar_t>(args.seed, args.offset, base, len, eps_buf.data());
          eps = eps_buf.data();
        }
        const scalar_t* xr = xp + base;
        const scalar_t* ar = ap + base;
        scalar_t* xor_ = xo + base;
        for (int64_t d = 0; d < len; ++d) xor_[d] = xr[d] + ar[d] * h + s * eps[d];
        if (!weighted) continue;
        // float64 sums over D; omp simd lets them vectorize (fixed lane order: deterministic)
        double acc_prop = 0.0;
#pragma omp simd reduction(+ : acc_prop)
        for (int64_t d = 0; d < len; ++d)
          acc_prop += static_cast<double>(eps[d]) * eps[d] + nonfinite_to_nan(xor_[d]);
        ss_prop += acc_prop;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* br = bp[k] + base;
          double acc = 0.0;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < len; ++d) {
            const scalar_t z = ref_residual<scalar_t>(ar[d], br[d], h_over_s, eps[d]);
            acc += static_cast<double>(z) * z;
          }
          ss_ref[k] += acc;
        }
        if (fwd) {
          double acc = 0.0;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < len; ++d) {
            const scalar_t z = fwd_residual<scalar_t>(ar[d], xor_[d], lam, h_over_s, eps[d]);
            acc += static_cast<double>(z) * z;
          }
          ss_fwd += acc;
        }
      }
      if (!weighted) continue;
      const double log_norm = gaussian_log_norm(D, st.s) * (coef_total - 1.0);
      double delta = 0.5 * ss_prop - 0.5 * args.fwd_coef * ss_fwd + log_norm;
      for (int64_t k = 0; k < K; ++k) delta -= 0.5 * args.coefs[k] * ss_ref[k];
      lwo[r] = static_cast<weight_t>(static_cast<double>(lw[r]) + delta);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> em_step_cpu(
    const at::Tensor& x_in, const at::Tensor& drift_in, const std::optional<at::Tensor>& logw_in,
    double dt, double sigma, at::TensorList ref_drifts, at::ArrayRef<double> ref_coefs,
    double fwd_coef, double fwd_linear, const std::optional<at::Tensor>& noise_in,
    const std::optional<at::Generator>& generator, const std::optional<at::Tensor>& row_dt,
    const std::optional<at::Tensor>& row_sigma) {
  const EmStepInputs in = check_em_step(x_in, drift_in, logw_in, sigma, ref_drifts, ref_coefs,
                                        noise_in, row_dt, row_sigma);
  const at::Tensor &x = in.x, &drift = in.drift, &logw = in.logw, &noise = in.noise;
  const std::vector<at::Tensor>& refs = in.refs;
  StepArgs args{dt, sigma, fwd_coef, fwd_linear,
                std::vector<double>(ref_coefs.begin(), ref_coefs.end()), 0, 0,
                in.row_dt.defined() ? in.row_dt.data_ptr<double>() : nullptr,
                in.row_sigma.defined() ? in.row_sigma.data_ptr<double>() : nullptr};
  if (!noise.defined()) std::tie(args.seed, args.offset) = philox_key(generator);

  at::Tensor x_out = at::empty_like(x);
  at::Tensor logw_out = logw.defined() ? at::empty_like(logw)
                                       : at::empty({0}, x.options().dtype(at::kDouble));
  if (logw.defined()) check_no_posinf_cpu(logw, "logw");
  const at::Tensor* np = noise.defined() ? &noise : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pathsmc::em_step", [&] {
    if (!logw.defined()) {
      em_step_rows<scalar_t, double>(x, drift, refs, np, nullptr, x_out, nullptr, args);
    } else if (logw.scalar_type() == at::kDouble) {
      em_step_rows<scalar_t, double>(x, drift, refs, np, &logw, x_out, &logw_out, args);
    } else {
      em_step_rows<scalar_t, float>(x, drift, refs, np, &logw, x_out, &logw_out, args);
    }
  });
  return {x_out, logw_out};
}

template <typename scalar_t, typename weight_t>
void kernel_logpdf_rows(const at::Tensor& y, const at::Tensor& base, const at::Tensor* drift,
                        const at::Tensor& logw, at::Tensor& out, double h, double s, double coef,
                        double lam) {
  const int64_t rows = y.size(0) * y.size(1), D = y.size(2);
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* bp = base.data_ptr<scalar_t>();
  const scalar_t* dp = drift ? drift->data_ptr<scalar_t>() : nullptr;
  const weight_t* lw = logw.data_ptr<weight_t>();
  weight_t* lo = out.data_ptr<weight_t>();
  const double inv_s = 1.0 / s, log_norm = gaussian_log_norm(D, s);
  parallel_rows(rows, D, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * D;
      double ss = 0.0;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) {
        const double dr = dp ? static_cast<double>(dp[o + d]) : 0.0;
        const double z = kernel_residual(yp[o + d], bp[o + d], dr, lam, h, inv_s);
        ss += z * z;
      }
      lo[r] = static_cast<weight_t>(static_cast<double>(lw[r]) + coef * (-0.5 * ss + log_norm));
    }
  });
}

at::Tensor kernel_logpdf_cpu(const at::Tensor& y_in, const at::Tensor& base_in,
                             const std::optional<at::Tensor>& drift_in, double dt, double sigma,
                             const at::Tensor& logw_in, double coef, double linear) {
  const KernelLogpdfInputs in = check_kernel_logpdf(y_in, base_in, drift_in, dt, sigma, logw_in);
  const at::Tensor &y = in.y, &base = in.base, &drift = in.drift, &logw = in.logw;
  at::Tensor out = at::empty_like(logw);
  const at::Tensor* dp = drift.defined() ? &drift : nullptr;
  const double s = sigma * std::sqrt(dt);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pathsmc::kernel_logpdf", [&] {
    if (logw.scalar_type() == at::kDouble) {
      kernel_logpdf_rows<scalar_t, double>(y, base, dp, logw, out, dt, s, coef, linear);
    } else {
      kernel_logpdf_rows<scalar_t, float>(y, base, dp, logw, out, dt, s, coef, linear);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CPU, m) {
  m.impl("em_step", &em_step_cpu);
  m.impl("kernel_logpdf", &kernel_logpdf_cpu);
}

}  // namespace pathsmc::cpu
