// CUDA kernel of the weights family: normalize. One block per row: block max, float64 sums of
// exp(l - max) and its square (fixed reduction tree), then the normalized log-weights.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "checks.h"
#include "cuda/common.cuh"
#include "pathsmc/fastmath.h"

namespace pathsmc::cuda {
namespace {

__device__ __forceinline__ double clean(double v) { return isnan(v) ? -INFINITY : v; }

template <typename weight_t>
__global__ void __launch_bounds__(kThreads) normalize_kernel(const weight_t* __restrict__ lw,
                                                             weight_t* __restrict__ lwn,
                                                             weight_t* __restrict__ log_mean,
                                                             weight_t* __restrict__ ess,
                                                             int64_t B, int64_t N) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ double shared_max, shared_lse;
  const double log_n = log(static_cast<double>(N));
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const weight_t* row = lw + b * N;
    double m = -INFINITY;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) m = fmax(m, clean(row[j]));
    m = Reduce(tmp).Reduce(m, [](double a, double c) { return fmax(a, c); });
    if (threadIdx.x == 0) shared_max = m;
    __syncthreads();
    m = shared_max;
    double s1 = 0.0, s2 = 0.0;
    if (m != -INFINITY && m != INFINITY) {
      for (int64_t j = threadIdx.x; j < N; j += kThreads) {
        const double e = exp_nonpos(static_cast<double>(row[j]) - m);
        s1 += e;
        s2 += e * e;
      }
    }
    s1 = Reduce(tmp).Sum(s1);
    __syncthreads();
    s2 = Reduce(tmp).Sum(s2);
    if (threadIdx.x == 0) {
      // +inf log-weights are invalid (the CPU raises; a kernel cannot): reported like a dead
      // row with log Ẑ = +inf, so that the drivers flag it instead of propagating NaN.
      const bool dead = m == -INFINITY || m == INFINITY;
      const double lse = dead ? -INFINITY : m + log(s1);
      shared_lse = lse;
      log_mean[b] = static_cast<weight_t>(m == INFINITY ? INFINITY : lse - log_n);
      ess[b] = static_cast<weight_t>(dead ? 0.0 : s1 * s1 / s2);
    }
    __syncthreads();
    const double lse = shared_lse;
    for (int64_t j = threadIdx.x; j < N; j += kThreads)
      lwn[b * N + j] = static_cast<weight_t>(lse == -INFINITY ? -INFINITY : clean(row[j]) - lse);
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_cuda(const at::Tensor& logw_in) {
  check_logw(logw_in, "normalize");
  const c10::cuda::CUDAGuard guard(logw_in.device());
  const at::Tensor logw = logw_in.contiguous();
  const int64_t B = logw.size(0), N = logw.size(1);
  at::Tensor lwn = at::empty_like(logw);
  at::Tensor log_mean = at::empty({B}, logw.options());
  at::Tensor ess = at::empty({B}, logw.options());
  if (B == 0) return {lwn, log_mean, ess};
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(B, 65535));
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::normalize", [&] {
    normalize_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logw.data_ptr<scalar_t>(), lwn.data_ptr<scalar_t>(), log_mean.data_ptr<scalar_t>(),
        ess.data_ptr<scalar_t>(), B, N);
    PATHSMC_CUDA_CHECK_LAUNCH();
  });
  return {lwn, log_mean, ess};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CUDA, m) { m.impl("normalize", &normalize_cuda); }

}  // namespace pathsmc::cuda
