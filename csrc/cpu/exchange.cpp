// CPU kernels of the MCMC-exchange family: mala_accept and replica_swap.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/common.h"
#include "pathsmc/gaussian.h"
#include "pathsmc/philox.h"

namespace pathsmc::cpu {
namespace {

template <typename scalar_t, typename weight_t>
void mala_rows(const at::Tensor& x, const at::Tensor& xp, const at::Tensor& lp,
               const at::Tensor& lpp, const at::Tensor& g, const at::Tensor& gp,
               const at::Tensor& step, const double* u, uint64_t seed, uint64_t offset,
               at::Tensor& xo, at::Tensor& lpo, at::Tensor& go, at::Tensor& acc) {
  const int64_t N = x.size(1), D = x.size(2), rows = x.size(0) * N;
  const scalar_t *x_ = x.data_ptr<scalar_t>(), *xp_ = xp.data_ptr<scalar_t>();
  const scalar_t *g_ = g.data_ptr<scalar_t>(), *gp_ = gp.data_ptr<scalar_t>();
  const weight_t *lp_ = lp.data_ptr<weight_t>(), *lpp_ = lpp.data_ptr<weight_t>();
  const double* st = step.data_ptr<double>();
  scalar_t *xo_ = xo.data_ptr<scalar_t>(), *go_ = go.data_ptr<scalar_t>();
  weight_t* lpo_ = lpo.data_ptr<weight_t>();
  bool* acc_ = acc.data_ptr<bool>();
  parallel_rows(rows, 4 * D, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double h = st[r / N];
      const int64_t o = r * D;
      double fwd = 0.0, bwd = 0.0;  // |x' - x - h∇(x)|², |x - x' - h∇(x')|²
      for (int64_t d = 0; d < D; ++d) {
        fwd += mala_sq(xp_[o + d], x_[o + d], g_[o + d], h);
        bwd += mala_sq(x_[o + d], xp_[o + d], gp_[o + d], h);
      }
      const double log_alpha = static_cast<double>(lpp_[r]) - static_cast<double>(lp_[r]) +
                               (fwd - bwd) / (4.0 * h);
      const double ur = u ? u[r] : stream_uniform(seed, offset, static_cast<uint64_t>(r));
      const bool a = std::log(ur) < log_alpha;  // NaN: rejected
      acc_[r] = a;
      std::memcpy(xo_ + o, (a ? xp_ : x_) + o, D * sizeof(scalar_t));
      std::memcpy(go_ + o, (a ? gp_ : g_) + o, D * sizeof(scalar_t));
      lpo_[r] = a ? lpp_[r] : lp_[r];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mala_accept_cpu(
    const at::Tensor& x_in, const at::Tensor& xp_in, const at::Tensor& lp_in,
    const at::Tensor& lpp_in, const at::Tensor& g_in, const at::Tensor& gp_in,
    const at::Tensor& step_in, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  const MalaInputs in = check_mala(x_in, xp_in, lp_in, lpp_in, g_in, gp_in, step_in, uniforms);
  const at::Tensor &x = in.x, &xp = in.x_prop, &g = in.grad, &gp = in.grad_prop, &lp = in.logp,
                   &lpp = in.logp_prop, &step = in.step, &u = in.uniforms;
  uint64_t seed = 0, offset = 0;
  if (!u.defined()) std::tie(seed, offset) = philox_key(generator);
  const double* up = u.defined() ? u.data_ptr<double>() : nullptr;
  at::Tensor xo = at::empty_like(x), go = at::empty_like(g), lpo = at::empty_like(lp);
  at::Tensor acc = at::empty(lp.sizes(), lp.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pathsmc::mala_accept", [&] {
    if (lp.scalar_type() == at::kDouble) {
      mala_rows<scalar_t, double>(x, xp, lp, lpp, g, gp, step, up, seed, offset, xo, lpo, go, acc);
    } else {
      mala_rows<scalar_t, float>(x, xp, lp, lpp, g, gp, step, up, seed, offset, xo, lpo, go, acc);
    }
  });
  return {xo, lpo, go, acc};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> replica_swap_cpu(
    at::TensorList states, const at::Tensor& log_ratio_in, int64_t parity,
    const std::optional<at::Tensor>& uniforms, const std::optional<at::Generator>& generator) {
  const auto [lr, u] = check_replica_swap(log_ratio_in, uniforms);
  const int64_t Km1 = lr.size(0), C = lr.size(1), K = Km1 + 1;
  check_states(states, K, C, log_ratio_in.device(), "replica_swap", "(K, C, ...)");
  uint64_t seed = 0, offset = 0;
  if (!u.defined()) std::tie(seed, offset) = philox_key(generator);
  at::Tensor accepted = at::zeros({Km1, C}, log_ratio_in.options().dtype(at::kBool));
  at::Tensor perm = at::empty({K, C}, log_ratio_in.options().dtype(at::kLong));
  const double* lrp = lr.data_ptr<double>();
  const double* up = u.defined() ? u.data_ptr<double>() : nullptr;
  bool* ap = accepted.data_ptr<bool>();
  int64_t* pp = perm.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) pp[k * C + c] = k;
  for (int64_t k = parity & 1; k < Km1; k += 2) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      const double ur = up ? up[i] : stream_uniform(seed, offset, static_cast<uint64_t>(i));
      if (std::log(ur) < lrp[i]) {  // NaN: rejected
        ap[i] = true;
        pp[k * C + c] = k + 1;
        pp[(k + 1) * C + c] = k;
      }
    }
  }
  std::vector<at::Tensor> out =
      gather_particles(states, K * C, [=](int64_t p) { return pp[p] * C + p % C; });
  return {out, accepted, perm};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CPU, m) {
  m.impl("mala_accept", &mala_accept_cpu);
  m.impl("replica_swap", &replica_swap_cpu);
}

}  // namespace pathsmc::cpu
