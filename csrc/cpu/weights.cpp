// CPU kernel of the weights family: normalize (row-wise logsumexp, log mean weight, ESS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cpu/common.h"
#include "pathsmc/fastmath.h"

namespace pathsmc::cpu {
namespace {

template <typename weight_t>
void normalize_rows(const at::Tensor& logw, at::Tensor& lwn, at::Tensor& log_mean,
                    at::Tensor& ess) {
  const int64_t B = logw.size(0), N = logw.size(1);
  const weight_t* lw = logw.data_ptr<weight_t>();
  weight_t* out = lwn.data_ptr<weight_t>();
  weight_t* lm = log_mean.data_ptr<weight_t>();
  weight_t* es = ess.data_ptr<weight_t>();
  const double log_n = std::log(static_cast<double>(N));
  parallel_rows(B, 3 * N, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const weight_t* row = lw + b * N;
      weight_t* orow = out + b * N;
      double m = -INFINITY;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < N; ++j) {
        const double v = static_cast<double>(row[j]);
        m = v > m ? v : m;  // NaN (dead) never wins
      }
      TORCH_CHECK_VALUE(m != INFINITY,
                        "logw: contains +inf; log-weights must be finite, -inf or NaN");
      if (m == -INFINITY) {  // every particle dead: ESS 0, log Ẑ increment -inf
        for (int64_t j = 0; j < N; ++j) orow[j] = -INFINITY;
        lm[b] = -INFINITY;
        es[b] = 0;
        continue;
      }
      double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t j = 0; j < N; ++j) {
        const double e = exp_nonpos(static_cast<double>(row[j]) - m);  // NaN -> 0
        s1 += e;
        s2 += e * e;
      }
      const double lse = m + std::log(s1);
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        const double v = static_cast<double>(row[j]);
        orow[j] = static_cast<weight_t>(v != v ? -INFINITY : v - lse);
      }
      lm[b] = static_cast<weight_t>(lse - log_n);
      es[b] = static_cast<weight_t>(s1 * s1 / s2);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_cpu(const at::Tensor& logw_in) {
  check_logw(logw_in, "normalize");
  const at::Tensor logw = logw_in.contiguous();
  at::Tensor lwn = at::empty_like(logw);
  at::Tensor log_mean = at::empty({logw.size(0)}, logw.options());
  at::Tensor ess = at::empty({logw.size(0)}, logw.options());
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::normalize", [&] {
    normalize_rows<scalar_t>(logw, lwn, log_mean, ess);
  });
  return {lwn, log_mean, ess};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CPU, m) { m.impl("normalize", &normalize_cpu); }

}  // namespace pathsmc::cpu
