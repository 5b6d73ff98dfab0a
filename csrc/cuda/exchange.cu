// CUDA kernels of the MCMC-exchange family: mala_accept and replica_swap.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "pathsmc/gaussian.h"
#include "pathsmc/philox.h"

namespace pathsmc::cuda {

// resampling.cu: gather states along their first two dims by an index tensor.
std::vector<at::Tensor> gather_particles(at::TensorList states, const at::Tensor& idx, int64_t N,
                                         int64_t C, bool replica);

namespace {

// A group of G lanes per row: float64 sums of the two proposal residuals, the decision by the
// group leader's uniform, then every lane copies its part of the chosen row.
template <typename scalar_t, typename weight_t, int G>
__global__ void __launch_bounds__(kThreads) mala_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ xp,
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ gp,
    const weight_t* __restrict__ lp, const weight_t* __restrict__ lpp,
    const double* __restrict__ step, const double* __restrict__ uniforms,
    const at::PhiloxCudaState rng, scalar_t* __restrict__ xo, scalar_t* __restrict__ go,
    weight_t* __restrict__ lpo, bool* __restrict__ acc, int64_t rows, int64_t N, int64_t D) {
  uint64_t seed = 0, offset = 0;
  if (uniforms == nullptr) unpack_philox(rng, seed, offset);
  const int lane = threadIdx.x % G;
  const int64_t rows_per_block = kThreads / G;
  for (int64_t first = blockIdx.x * rows_per_block; first < rows;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t r = first + threadIdx.x / G;
    const bool valid = r < rows;
    const double h = valid ? step[r / N] : 1.0;
    double fwd = 0.0, bwd = 0.0;
    if (valid) {
      for (int64_t d = lane; d < D; d += G) {
        const int64_t e = r * D + d;
        fwd += mala_sq(static_cast<double>(xp[e]), static_cast<double>(x[e]),
                       static_cast<double>(g[e]), h);
        bwd += mala_sq(static_cast<double>(x[e]), static_cast<double>(xp[e]),
                       static_cast<double>(gp[e]), h);
      }
    }
    fwd = group_sum<G>(fwd);
    bwd = group_sum<G>(bwd);
    if (!valid) continue;
    const double log_alpha =
        static_cast<double>(lpp[r]) - static_cast<double>(lp[r]) + (fwd - bwd) / (4.0 * h);
    const double u = uniforms ? uniforms[r] : stream_uniform(seed, offset, static_cast<uint64_t>(r));
    const bool a = log(u) < log_alpha;  // NaN: rejected
    const scalar_t* xs = a ? xp : x;
    const scalar_t* gs = a ? gp : g;
    for (int64_t d = lane; d < D; d += G) {
      xo[r * D + d] = xs[r * D + d];
      go[r * D + d] = gs[r * D + d];
    }
    if (lane == 0) {
      acc[r] = a;
      lpo[r] = a ? lpp[r] : lp[r];
    }
  }
}

// Few long rows: three passes over segments of kMalaSegment elements, one block each.
// 1. each segment's float64 residual sums (fixed-order block reduction) into `partial`;
constexpr int64_t kMalaSegment = 16 * kThreads;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mala_segment_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ xp,
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ gp,
    const double* __restrict__ step, double* __restrict__ partial, int64_t rows, int64_t N,
    int64_t D, int64_t segs) {
  __shared__ double warp_sums[kThreads / 32][2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t unit = blockIdx.x; unit < rows * segs; unit += gridDim.x) {
    const int64_t r = unit / segs, seg = unit % segs;
    const double h = step[r / N];
    const int64_t d1 = min(D, (seg + 1) * kMalaSegment);
    double fwd = 0.0, bwd = 0.0;
    for (int64_t d = seg * kMalaSegment + threadIdx.x; d < d1; d += kThreads) {
      const int64_t e = r * D + d;
      fwd += mala_sq(static_cast<double>(xp[e]), static_cast<double>(x[e]),
                     static_cast<double>(g[e]), h);
      bwd += mala_sq(static_cast<double>(x[e]), static_cast<double>(xp[e]),
                     static_cast<double>(gp[e]), h);
    }
    fwd = group_sum<32>(fwd);
    bwd = group_sum<32>(bwd);
    if (lane == 0) {
      warp_sums[warp][0] = fwd;
      warp_sums[warp][1] = bwd;
    }
    __syncthreads();
    if (threadIdx.x < 2) {
      double t = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w][threadIdx.x];
      partial[unit * 2 + threadIdx.x] = t;
    }
    __syncthreads();  // warp_sums is reused by the next unit
  }
}

// 2. per row: the segments' sums in order, the decision, the log-density and the flag;
template <typename weight_t>
__global__ void __launch_bounds__(kThreads) mala_decide_kernel(
    const double* __restrict__ partial, const weight_t* __restrict__ lp,
    const weight_t* __restrict__ lpp, const double* __restrict__ step,
    const double* __restrict__ uniforms, const at::PhiloxCudaState rng,
    weight_t* __restrict__ lpo, bool* __restrict__ acc, int64_t rows, int64_t N, int64_t segs) {
  uint64_t seed = 0, offset = 0;
  if (uniforms == nullptr) unpack_philox(rng, seed, offset);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double fwd = 0.0, bwd = 0.0;
    for (int64_t seg = 0; seg < segs; ++seg) {
      fwd += partial[(r * segs + seg) * 2];
      bwd += partial[(r * segs + seg) * 2 + 1];
    }
    const double h = step[r / N];
    const double log_alpha =
        static_cast<double>(lpp[r]) - static_cast<double>(lp[r]) + (fwd - bwd) / (4.0 * h);
    const double u = uniforms ? uniforms[r] : stream_uniform(seed, offset, static_cast<uint64_t>(r));
    const bool a = log(u) < log_alpha;  // NaN: rejected
    acc[r] = a;
    lpo[r] = a ? lpp[r] : lp[r];
  }
}

// 3. every element of the chosen row (state and gradient).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mala_copy_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ xp,
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ gp,
    const bool* __restrict__ acc, scalar_t* __restrict__ xo, scalar_t* __restrict__ go,
    int64_t total, int64_t D) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool a = acc[e / D];
    xo[e] = a ? xp[e] : x[e];
    go[e] = a ? gp[e] : g[e];
  }
}

template <typename scalar_t, typename weight_t>
void launch_mala(const at::Tensor& x, const at::Tensor& xp, const at::Tensor& g,
                 const at::Tensor& gp, const at::Tensor& lp, const at::Tensor& lpp,
                 const at::Tensor& step, const double* up, const at::PhiloxCudaState& rng,
                 at::Tensor& xo, at::Tensor& go, at::Tensor& lpo, at::Tensor& acc) {
  const int64_t N = x.size(1), D = x.size(2), rows = x.size(0) * N;
  const int G = lanes_per_row(D);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (G == 32 && D >= 2 * kMalaSegment && rows * 32 < resident_threads()) {
    const int64_t segs = (D + kMalaSegment - 1) / kMalaSegment;
    at::Tensor partial = at::empty({rows * segs * 2}, lp.options().dtype(at::kDouble));
    const unsigned int seg_grid =
        static_cast<unsigned int>(std::min<int64_t>(rows * segs, 1 << 30));
    mala_segment_kernel<scalar_t><<<seg_grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        gp.data_ptr<scalar_t>(), step.data_ptr<double>(), partial.data_ptr<double>(), rows, N,
        D, segs);
    PATHSMC_CUDA_CHECK_LAUNCH();
    mala_decide_kernel<weight_t><<<grid_for(rows), kThreads, 0, stream>>>(
        partial.data_ptr<double>(), lp.data_ptr<weight_t>(), lpp.data_ptr<weight_t>(),
        step.data_ptr<double>(), up, rng, lpo.data_ptr<weight_t>(), acc.data_ptr<bool>(), rows,
        N, segs);
    PATHSMC_CUDA_CHECK_LAUNCH();
    mala_copy_kernel<scalar_t><<<grid_for(rows * D), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        gp.data_ptr<scalar_t>(), acc.data_ptr<bool>(), xo.data_ptr<scalar_t>(),
        go.data_ptr<scalar_t>(), rows * D, D);
    PATHSMC_CUDA_CHECK_LAUNCH();
    return;
  }
  const unsigned int grid = grid_for(rows * G);
  auto kernel = G == 1 ? mala_kernel<scalar_t, weight_t, 1>
                       : (G == 4 ? mala_kernel<scalar_t, weight_t, 4> : mala_kernel<scalar_t, weight_t, 32>);
  kernel<<<grid, kThreads, 0, stream>>>(
      x.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
      gp.data_ptr<scalar_t>(), lp.data_ptr<weight_t>(), lpp.data_ptr<weight_t>(),
      step.data_ptr<double>(), up, rng, xo.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(),
      lpo.data_ptr<weight_t>(), acc.data_ptr<bool>(), rows, N, D);
  PATHSMC_CUDA_CHECK_LAUNCH();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mala_accept_cuda(
    const at::Tensor& x_in, const at::Tensor& xp_in, const at::Tensor& lp_in,
    const at::Tensor& lpp_in, const at::Tensor& g_in, const at::Tensor& gp_in,
    const at::Tensor& step_in, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  const MalaInputs in = check_mala(x_in, xp_in, lp_in, lpp_in, g_in, gp_in, step_in, uniforms);
  const c10::cuda::CUDAGuard guard(x_in.device());  // after the checks: their device messages
  const at::Tensor &x = in.x, &xp = in.x_prop, &g = in.grad, &gp = in.grad_prop, &lp = in.logp,
                   &lpp = in.logp_prop, &step = in.step, &u = in.uniforms;
  const int64_t B = x.size(0), N = x.size(1);
  const at::PhiloxCudaState rng =
      u.defined() ? at::PhiloxCudaState() : philox_state(generator, x.device());
  at::Tensor xo = at::empty_like(x), go = at::empty_like(g), lpo = at::empty_like(lp);
  at::Tensor acc = at::empty(lp.sizes(), lp.options().dtype(at::kBool));
  if (B * N == 0) return {xo, lpo, go, acc};
  const double* up = u.defined() ? u.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pathsmc::mala_accept", [&] {
    if (lp.scalar_type() == at::kDouble) {
      launch_mala<scalar_t, double>(x, xp, g, gp, lp, lpp, step, up, rng, xo, go, lpo, acc);
    } else {
      launch_mala<scalar_t, float>(x, xp, g, gp, lp, lpp, step, up, rng, xo, go, lpo, acc);
    }
  });
  return {xo, lpo, go, acc};
}

// Thread per (level k, chain c): the decision of the pair that level k belongs to this round,
// evaluated identically by both members, gives perm and accepted without a second pass.
__global__ void swap_decide_kernel(const double* __restrict__ log_ratio,
                                   const double* __restrict__ uniforms,
                                   const at::PhiloxCudaState rng, int64_t K, int64_t C,
                                   int parity, int64_t* __restrict__ perm,
                                   bool* __restrict__ accepted) {
  uint64_t seed = 0, offset = 0;
  if (uniforms == nullptr) unpack_philox(rng, seed, offset);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < K * C;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = p / C, c = p % C;
    auto swaps = [&](int64_t pair) {  // pair (pair, pair + 1) attempted and accepted?
      if (pair < 0 || pair >= K - 1 || (pair & 1) != parity) return false;
      const int64_t i = pair * C + c;
      const double u = uniforms ? uniforms[i] : stream_uniform(seed, offset, static_cast<uint64_t>(i));
      return log(u) < log_ratio[i];  // NaN: rejected
    };
    const bool up = swaps(k), down = swaps(k - 1);
    perm[p] = up ? k + 1 : (down ? k - 1 : k);
    if (k < K - 1) accepted[p] = up;
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> replica_swap_cuda(
    at::TensorList states, const at::Tensor& log_ratio_in, int64_t parity,
    const std::optional<at::Tensor>& uniforms, const std::optional<at::Generator>& generator) {
  const auto [lr, u] = check_replica_swap(log_ratio_in, uniforms);
  const int64_t Km1 = lr.size(0), C = lr.size(1), K = Km1 + 1;
  check_states(states, K, C, log_ratio_in.device(), "replica_swap", "(K, C, ...)");
  const c10::cuda::CUDAGuard guard(log_ratio_in.device());
  const at::PhiloxCudaState rng =
      u.defined() ? at::PhiloxCudaState() : philox_state(generator, lr.device());
  at::Tensor accepted = at::empty({Km1, C}, log_ratio_in.options().dtype(at::kBool));
  at::Tensor perm = at::empty({K, C}, log_ratio_in.options().dtype(at::kLong));
  if (C > 0) {
    swap_decide_kernel<<<grid_for(K * C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        lr.data_ptr<double>(), u.defined() ? u.data_ptr<double>() : nullptr, rng, K, C,
        static_cast<int>(parity & 1), perm.data_ptr<int64_t>(), accepted.data_ptr<bool>());
    PATHSMC_CUDA_CHECK_LAUNCH();
  }
  return {gather_particles(states, perm, 0, C, true), accepted, perm};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CUDA, m) {
  m.impl("mala_accept", &mala_accept_cuda);
  m.impl("replica_swap", &replica_swap_cuda);
}

}  // namespace pathsmc::cuda
