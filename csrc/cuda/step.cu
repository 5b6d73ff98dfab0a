// CUDA kernels of the step family: em_step and kernel_logpdf.
//
// A group of G lanes owns one row of D elements (G = 1 for tiny D, 4, or a full warp); lanes
// walk the row in Philox blocks (4 float or 2 double normals each, drawn in registers), write
// x' and keep float64 partial sums that a fixed shuffle tree reduces: no atomics, so the
// result is deterministic. Same per-element math as the CPU (csrc/include/pathsmc).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "pathsmc/gaussian.h"
#include "pathsmc/philox.h"

namespace pathsmc::cuda {
namespace {

constexpr int kMaxRefs = 8;

template <typename scalar_t>
struct StepArgs {
  const scalar_t* x;
  const scalar_t* drift;
  const scalar_t* refs[kMaxRefs];
  double coefs[kMaxRefs];
  int K;
  const scalar_t* noise;  // nullptr: draw in-kernel
  scalar_t* x_out;
  int64_t rows, N, D;
  double dt, sigma, fwd_coef, fwd_linear, coef_total;
  const double* row_dt;     // (B,) overrides, or nullptr
  const double* row_sigma;
};

// Float64 sums of one row's squared residuals: proposal, forward kernel, each reference.
struct StepSums {
  double prop = 0.0, fwd = 0.0, ref[kMaxRefs] = {};
};

// One thread's share of a row: Philox blocks g = g_first, g_first + stride, ... < g_end (each
// block's elements outside the row are skipped); writes x' and adds to the sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void step_elements(const StepArgs<scalar_t>& a, int64_t row,
                                              int64_t g_first, int64_t g_end, int64_t stride,
                                              const RowStep& st, bool weighted, uint64_t seed,
                                              uint64_t offset, StepSums& ss) {
  constexpr int kPer = NormalBlock<acc_t>::kPerCall;
  const acc_t h = static_cast<acc_t>(st.h), s = static_cast<acc_t>(st.s);
  const acc_t h_over_s = static_cast<acc_t>(weighted ? st.h / st.s : 0.0);
  const acc_t lam = static_cast<acc_t>(a.fwd_linear);
  const bool fwd = a.fwd_coef != 0.0;
  const int64_t e0 = row * a.D, e1 = e0 + a.D;
  for (int64_t g = g_first; g < g_end; g += stride) {
    acc_t z[kPer];
    if (a.noise == nullptr) NormalBlock<acc_t>::draw(seed, offset, static_cast<uint64_t>(g), z);
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t e = g * kPer + q;
      if (e < e0 || e >= e1) continue;
      const acc_t eps = a.noise ? static_cast<acc_t>(a.noise[e]) : z[q];
      const acc_t dr = static_cast<acc_t>(a.drift[e]);
      const scalar_t xn = static_cast<scalar_t>(static_cast<acc_t>(a.x[e]) + dr * h + s * eps);
      a.x_out[e] = xn;
      if (!weighted) continue;
      ss.prop += static_cast<double>(eps) * eps + nonfinite_to_nan(xn);  // inf/NaN x': dead
#pragma unroll
      for (int k = 0; k < kMaxRefs; ++k) {
        if (k >= a.K) break;
        const acc_t zr = ref_residual<acc_t>(dr, static_cast<acc_t>(a.refs[k][e]), h_over_s, eps);
        ss.ref[k] += static_cast<double>(zr) * zr;
      }
      if (fwd) {
        const acc_t zf = fwd_residual<acc_t>(dr, static_cast<acc_t>(xn), lam, h_over_s, eps);
        ss.fwd += static_cast<double>(zf) * zf;
      }
    }
  }
}

// The log-weight increment of a row from its complete sums (the formula of DESIGN.md).
template <typename scalar_t>
__device__ __forceinline__ double step_delta(const StepArgs<scalar_t>& a, const RowStep& st,
                                             const StepSums& ss) {
  double delta = 0.5 * ss.prop - 0.5 * a.fwd_coef * ss.fwd +
                 gaussian_log_norm(a.D, st.s) * (a.coef_total - 1.0);
#pragma unroll
  for (int k = 0; k < kMaxRefs; ++k) {
    if (k >= a.K) break;
    delta -= 0.5 * a.coefs[k] * ss.ref[k];
  }
  return delta;
}

// Rows of G lanes each (G = 1, 4 or 32): the path for many rows.
template <typename scalar_t, typename weight_t, int G>
__global__ void __launch_bounds__(kThreads) em_step_kernel(const StepArgs<scalar_t> a,
                                                           const weight_t* __restrict__ lw,
                                                           weight_t* __restrict__ lwo,
                                                           const at::PhiloxCudaState rng) {
  using acc_t = at::opmath_type<scalar_t>;  // float for float/half/bfloat16, double for double
  constexpr int kPer = NormalBlock<acc_t>::kPerCall;
  uint64_t seed = 0, offset = 0;
  if (a.noise == nullptr) unpack_philox(rng, seed, offset);
  const bool weighted = lw != nullptr;
  const int lane = threadIdx.x % G;
  const int64_t rows_per_block = kThreads / G;
  for (int64_t first = blockIdx.x * rows_per_block; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = first + threadIdx.x / G;
    const RowStep st =
        RowStep::of(row < a.rows ? row / a.N : 0, a.dt, a.sigma, a.row_dt, a.row_sigma);
    StepSums ss;
    if (row < a.rows) {
      const int64_t e0 = row * a.D, e1 = e0 + a.D;
      step_elements<scalar_t, acc_t>(a, row, e0 / kPer + lane, (e1 + kPer - 1) / kPer, G, st,
                                     weighted, seed, offset, ss);
    }
    if (!weighted) continue;  // the same for every lane: no divergent shuffle below
    ss.prop = group_sum<G>(ss.prop);
    ss.fwd = group_sum<G>(ss.fwd);
#pragma unroll
    for (int k = 0; k < kMaxRefs; ++k) {
      if (k >= a.K) break;
      ss.ref[k] = group_sum<G>(ss.ref[k]);
    }
    if (row < a.rows && lane == 0)
      lwo[row] = static_cast<weight_t>(static_cast<double>(lw[row]) + step_delta(a, st, ss));
  }
}

// Few long rows (a handful of images, say): a warp per row would leave most of the GPU idle,
// so each row is cut into segments of kSegmentBlocks Philox blocks, one thread block each.
// A segment's sums go to `partial` (fixed-order block reduction), and em_step_finish_kernel
// adds a row's segments in order: deterministic, no atomics.
constexpr int64_t kSegmentBlocks = 4 * kThreads;
constexpr int kSums = 2 + kMaxRefs;  // prop, fwd, refs: the stride of `partial`

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) em_step_segment_kernel(
    const StepArgs<scalar_t> a, bool weighted, int64_t segs, double* __restrict__ partial,
    const at::PhiloxCudaState rng) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPer = NormalBlock<acc_t>::kPerCall;
  __shared__ double warp_sums[kThreads / 32][kSums];
  uint64_t seed = 0, offset = 0;
  if (a.noise == nullptr) unpack_philox(rng, seed, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t unit = blockIdx.x; unit < a.rows * segs; unit += gridDim.x) {
    const int64_t row = unit / segs, seg = unit % segs;
    const RowStep st = RowStep::of(row / a.N, a.dt, a.sigma, a.row_dt, a.row_sigma);
    const int64_t e0 = row * a.D, e1 = e0 + a.D;
    const int64_t g_begin = e0 / kPer + seg * kSegmentBlocks;
    const int64_t g_end = min(g_begin + kSegmentBlocks, (e1 + kPer - 1) / kPer);
    StepSums ss;
    step_elements<scalar_t, acc_t>(a, row, g_begin + threadIdx.x, g_end, kThreads, st, weighted,
                                   seed, offset, ss);
    if (!weighted) continue;  // the same for the whole block
    double v[kSums];
    v[0] = ss.prop;
    v[1] = ss.fwd;
#pragma unroll
    for (int k = 0; k < kMaxRefs; ++k) v[2 + k] = ss.ref[k];
#pragma unroll
    for (int k = 0; k < kSums; ++k) {
      if (k >= 2 + a.K) break;  // unused reference slots stay unread (the same for the block)
      const double w = group_sum<32>(v[k]);
      if (lane == 0) warp_sums[warp][k] = w;
    }
    __syncthreads();
    if (threadIdx.x < 2 + a.K) {
      double t = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w][threadIdx.x];
      partial[unit * kSums + threadIdx.x] = t;
    }
    __syncthreads();  // warp_sums is reused by the next unit
  }
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kThreads) em_step_finish_kernel(
    const StepArgs<scalar_t> a, int64_t segs, const double* __restrict__ partial,
    const weight_t* __restrict__ lw, weight_t* __restrict__ lwo) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    StepSums ss;
    for (int64_t seg = 0; seg < segs; ++seg) {
      const double* p = partial + (row * segs + seg) * kSums;
      ss.prop += p[0];
      ss.fwd += p[1];
      for (int k = 0; k < a.K; ++k) ss.ref[k] += p[2 + k];
    }
    const RowStep st = RowStep::of(row / a.N, a.dt, a.sigma, a.row_dt, a.row_sigma);
    lwo[row] = static_cast<weight_t>(static_cast<double>(lw[row]) + step_delta(a, st, ss));
  }
}

template <typename scalar_t, typename weight_t>
void launch_em_step(const StepArgs<scalar_t>& a, const weight_t* lw, weight_t* lwo,
                    const at::PhiloxCudaState& rng, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPer = NormalBlock<acc_t>::kPerCall;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int g = lanes_per_row(a.D);
  if (g == 32 && a.D >= 8 * kThreads * kPer && a.rows * 32 < resident_threads()) {
    // Blocks touching a row: at most D / kPer + 2 (a row need not start on a block boundary).
    const int64_t segs = (a.D / kPer + 2 + kSegmentBlocks - 1) / kSegmentBlocks;
    const bool weighted = lw != nullptr;
    at::Tensor partial = at::empty({weighted ? a.rows * segs * kSums : 0},
                                   options.dtype(at::kDouble));
    const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(a.rows * segs, 1 << 30));
    em_step_segment_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        a, weighted, segs, weighted ? partial.data_ptr<double>() : nullptr, rng);
    PATHSMC_CUDA_CHECK_LAUNCH();
    if (weighted) {
      em_step_finish_kernel<scalar_t, weight_t><<<grid_for(a.rows), kThreads, 0, stream>>>(
          a, segs, partial.data_ptr<double>(), lw, lwo);
      PATHSMC_CUDA_CHECK_LAUNCH();
    }
    return;
  }
  const unsigned int grid = grid_for(a.rows * g);
  if (g == 1) {
    em_step_kernel<scalar_t, weight_t, 1><<<grid, kThreads, 0, stream>>>(a, lw, lwo, rng);
  } else if (g == 4) {
    em_step_kernel<scalar_t, weight_t, 4><<<grid, kThreads, 0, stream>>>(a, lw, lwo, rng);
  } else {
    em_step_kernel<scalar_t, weight_t, 32><<<grid, kThreads, 0, stream>>>(a, lw, lwo, rng);
  }
  PATHSMC_CUDA_CHECK_LAUNCH();
}

std::tuple<at::Tensor, at::Tensor> em_step_cuda(
    const at::Tensor& x_in, const at::Tensor& drift_in, const std::optional<at::Tensor>& logw_in,
    double dt, double sigma, at::TensorList ref_drifts, at::ArrayRef<double> ref_coefs,
    double fwd_coef, double fwd_linear, const std::optional<at::Tensor>& noise_in,
    const std::optional<at::Generator>& generator, const std::optional<at::Tensor>& row_dt,
    const std::optional<at::Tensor>& row_sigma) {
  TORCH_CHECK(static_cast<int>(ref_drifts.size()) <= kMaxRefs, "em_step: at most ", kMaxRefs,
              " ref_drifts on CUDA, got ", ref_drifts.size());
  const EmStepInputs in = check_em_step(x_in, drift_in, logw_in, sigma, ref_drifts, ref_coefs,
                                        noise_in, row_dt, row_sigma);
  const c10::cuda::CUDAGuard guard(x_in.device());  // after the checks: their device messages
  const at::Tensor &x = in.x, &drift = in.drift, &logw = in.logw, &noise = in.noise;
  const std::vector<at::Tensor>& refs = in.refs;
  at::Tensor x_out = at::empty_like(x);
  at::Tensor logw_out = logw.defined() ? at::empty_like(logw)
                                       : at::empty({0}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return {x_out, logw_out};
  const at::PhiloxCudaState rng =
      noise.defined() ? at::PhiloxCudaState() : philox_state(generator, x.device());
  double coef_total = fwd_coef;
  for (double c : ref_coefs) coef_total += c;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pathsmc::em_step", [&] {
    StepArgs<scalar_t> a{};
    a.x = x.data_ptr<scalar_t>();
    a.drift = drift.data_ptr<scalar_t>();
    a.K = static_cast<int>(refs.size());
    for (int k = 0; k < a.K; ++k) {
      a.refs[k] = refs[k].data_ptr<scalar_t>();
      a.coefs[k] = ref_coefs[k];
    }
    a.noise = noise.defined() ? noise.data_ptr<scalar_t>() : nullptr;
    a.x_out = x_out.data_ptr<scalar_t>();
    a.rows = x.size(0) * x.size(1);
    a.N = x.size(1);
    a.D = x.size(2);
    a.dt = dt;
    a.sigma = sigma;
    a.fwd_coef = fwd_coef;
    a.fwd_linear = fwd_linear;
    a.coef_total = coef_total;
    a.row_dt = in.row_dt.defined() ? in.row_dt.data_ptr<double>() : nullptr;
    a.row_sigma = in.row_sigma.defined() ? in.row_sigma.data_ptr<double>() : nullptr;
    if (!logw.defined()) {
      launch_em_step<scalar_t, double>(a, nullptr, nullptr, rng, x.options());
    } else if (logw.scalar_type() == at::kDouble) {
      launch_em_step<scalar_t, double>(a, logw.data_ptr<double>(), logw_out.data_ptr<double>(),
                                       rng, x.options());
    } else {
      launch_em_step<scalar_t, float>(a, logw.data_ptr<float>(), logw_out.data_ptr<float>(), rng,
                                      x.options());
    }
  });
  return {x_out, logw_out};
}

template <typename scalar_t, typename weight_t, int G>
__global__ void __launch_bounds__(kThreads) kernel_logpdf_kernel(
    const scalar_t* __restrict__ y, const scalar_t* __restrict__ base,
    const scalar_t* __restrict__ drift, const weight_t* __restrict__ lw,
    weight_t* __restrict__ out, int64_t rows, int64_t D, double h, double inv_s, double coef,
    double lam, double log_norm) {
  const int lane = threadIdx.x % G;
  const int64_t rows_per_block = kThreads / G;
  for (int64_t first = blockIdx.x * rows_per_block; first < rows;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = first + threadIdx.x / G;
    double ss = 0.0;
    if (row < rows) {
      for (int64_t d = lane; d < D; d += G) {
        const int64_t e = row * D + d;
        const double dr = drift ? static_cast<double>(drift[e]) : 0.0;
        const double z = kernel_residual(static_cast<double>(y[e]), static_cast<double>(base[e]),
                                         dr, lam, h, inv_s);
        ss += z * z;
      }
    }
    ss = group_sum<G>(ss);
    if (row < rows && lane == 0)
      out[row] = static_cast<weight_t>(static_cast<double>(lw[row]) + coef * (-0.5 * ss + log_norm));
  }
}

// Few long rows: segments of kThreads·kSegmentElements elements, one block each, partial sums
// to `partial` in a fixed order, added per row by kernel_logpdf_finish_kernel (as em_step).
constexpr int64_t kSegmentElements = 16 * kThreads;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kernel_logpdf_segment_kernel(
    const scalar_t* __restrict__ y, const scalar_t* __restrict__ base,
    const scalar_t* __restrict__ drift, int64_t rows, int64_t D, int64_t segs, double h,
    double inv_s, double lam, double* __restrict__ partial) {
  __shared__ double warp_sums[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t unit = blockIdx.x; unit < rows * segs; unit += gridDim.x) {
    const int64_t row = unit / segs, seg = unit % segs;
    const int64_t d1 = min(D, (seg + 1) * kSegmentElements);
    double ss = 0.0;
    for (int64_t d = seg * kSegmentElements + threadIdx.x; d < d1; d += kThreads) {
      const int64_t e = row * D + d;
      const double dr = drift ? static_cast<double>(drift[e]) : 0.0;
      const double z = kernel_residual(static_cast<double>(y[e]), static_cast<double>(base[e]),
                                       dr, lam, h, inv_s);
      ss += z * z;
    }
    ss = group_sum<32>(ss);
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
      double t = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w];
      partial[unit] = t;
    }
    __syncthreads();  // warp_sums is reused by the next unit
  }
}

template <typename weight_t>
__global__ void __launch_bounds__(kThreads) kernel_logpdf_finish_kernel(
    const double* __restrict__ partial, int64_t rows, int64_t segs,
    const weight_t* __restrict__ lw, weight_t* __restrict__ out, double coef, double log_norm) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double ss = 0.0;
    for (int64_t seg = 0; seg < segs; ++seg) ss += partial[row * segs + seg];
    out[row] = static_cast<weight_t>(static_cast<double>(lw[row]) + coef * (-0.5 * ss + log_norm));
  }
}

template <typename scalar_t, typename weight_t>
void launch_kernel_logpdf(const at::Tensor& y, const at::Tensor& base, const at::Tensor& drift,
                          const at::Tensor& logw, at::Tensor& out, double h, double s,
                          double coef, double lam) {
  const int64_t rows = y.size(0) * y.size(1), D = y.size(2);
  const scalar_t* dp = drift.defined() ? drift.data_ptr<scalar_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int g = lanes_per_row(D);
  if (g == 32 && D >= 2 * kSegmentElements && rows * 32 < resident_threads()) {
    const int64_t segs = (D + kSegmentElements - 1) / kSegmentElements;
    at::Tensor partial = at::empty({rows * segs}, logw.options().dtype(at::kDouble));
    const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(rows * segs, 1 << 30));
    kernel_logpdf_segment_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), dp, rows, D, segs, h, 1.0 / s, lam,
        partial.data_ptr<double>());
    PATHSMC_CUDA_CHECK_LAUNCH();
    kernel_logpdf_finish_kernel<weight_t><<<grid_for(rows), kThreads, 0, stream>>>(
        partial.data_ptr<double>(), rows, segs, logw.data_ptr<weight_t>(),
        out.data_ptr<weight_t>(), coef, gaussian_log_norm(D, s));
    PATHSMC_CUDA_CHECK_LAUNCH();
    return;
  }
  const unsigned int grid = grid_for(rows * g);
#define PATHSMC_LAUNCH_KLP(G)                                                                 \
  kernel_logpdf_kernel<scalar_t, weight_t, G><<<grid, kThreads, 0, stream>>>(                 \
      y.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), dp, logw.data_ptr<weight_t>(),       \
      out.data_ptr<weight_t>(), rows, D, h, 1.0 / s, coef, lam, gaussian_log_norm(D, s))
  if (g == 1) {
    PATHSMC_LAUNCH_KLP(1);
  } else if (g == 4) {
    PATHSMC_LAUNCH_KLP(4);
  } else {
    PATHSMC_LAUNCH_KLP(32);
  }
#undef PATHSMC_LAUNCH_KLP
  PATHSMC_CUDA_CHECK_LAUNCH();
}

at::Tensor kernel_logpdf_cuda(const at::Tensor& y_in, const at::Tensor& base_in,
                              const std::optional<at::Tensor>& drift_in, double dt, double sigma,
                              const at::Tensor& logw_in, double coef, double linear) {
  const KernelLogpdfInputs in = check_kernel_logpdf(y_in, base_in, drift_in, dt, sigma, logw_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor &y = in.y, &base = in.base, &drift = in.drift, &logw = in.logw;
  at::Tensor out = at::empty_like(logw);
  if (logw.numel() == 0) return out;
  const double s = sigma * std::sqrt(dt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pathsmc::kernel_logpdf", [&] {
    if (logw.scalar_type() == at::kDouble) {
      launch_kernel_logpdf<scalar_t, double>(y, base, drift, logw, out, dt, s, coef, linear);
    } else {
      launch_kernel_logpdf<scalar_t, float>(y, base, drift, logw, out, dt, s, coef, linear);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CUDA, m) {
  m.impl("em_step", &em_step_cuda);
  m.impl("kernel_logpdf", &kernel_logpdf_cuda);
}

}  // namespace pathsmc::cuda
