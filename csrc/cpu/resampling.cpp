// CPU kernels of the resampling family: resample and adaptive_resample.
//
// Per row: one pass for the max, one for exp(l - max) and its float64 sum, then an O(N + M)
// merge for systematic/stratified (binary searches for multinomial and residual remainders).
// Rows run in parallel; each row is sequential, so results never depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "pathsmc/philox.h"
#include "pathsmc/resampling.h"

namespace pathsmc::cpu {
namespace {

Scheme scheme_or_throw(const std::string& name) {
  Scheme s;
  TORCH_CHECK(parse_scheme(name, &s), "resample: unknown scheme '", name,
              "'; expected systematic, stratified, multinomial or residual");
  return s;
}

// Where a row's uniforms come from: an explicit (B,) or (B, M) float64 tensor, or Philox.
struct Uniforms {
  const double* data = nullptr;  // explicit
  int64_t row_stride = 0;        // 1 for (B,) systematic, M for (B, M)
  uint64_t seed = 0, offset = 0;

  double get(int64_t b, int64_t i) const {
    if (data) return data[b * row_stride + (row_stride == 1 ? 0 : i)];
    const uint64_t idx = row_stride == 1 ? b : static_cast<uint64_t>(b * row_stride + i);
    return stream_uniform(seed, offset, idx);
  }
};

Uniforms make_uniforms(const std::optional<at::Tensor>& uniforms, at::Tensor& holder,
                       Scheme scheme, int64_t B, int64_t M,
                       const std::optional<at::Generator>& gen) {
  Uniforms u;
  u.row_stride = scheme == Scheme::kSystematic ? 1 : M;
  if (uniforms.has_value()) {
    const bool ok = scheme == Scheme::kSystematic
                        ? (uniforms->dim() == 1 && uniforms->size(0) == B)
                        : (uniforms->dim() == 2 && uniforms->size(0) == B && uniforms->size(1) == M);
    TORCH_CHECK(ok, "resample: uniforms must be ",
                scheme == Scheme::kSystematic ? "(B,)" : "(B, M)", " for this scheme, got ",
                uniforms->sizes());
    holder = uniforms->to(at::kDouble).contiguous();
    u.data = holder.data_ptr<double>();
  } else {
    std::tie(u.seed, u.offset) = philox_key(gen);
  }
  return u;
}

// Ancestors of one live row into anc[0, M). `w` holds exp(l_j - max) (N entries) and is
// overwritten with cumulative weights; `buf` is scratch of N doubles for residual.
void resample_row(double* w, int64_t N, double total, int64_t M, Scheme scheme,
                  const Uniforms& u, int64_t b, int64_t* anc, std::vector<double>& buf) {
  int64_t last_live = 0;
  const double inv_total = 1.0 / total;
  for (int64_t j = 0; j < N; ++j) {
    w[j] *= inv_total;
    if (w[j] > 0) last_live = j;
  }
  if (scheme == Scheme::kSystematic || scheme == Scheme::kStratified) {
    const bool sys = scheme == Scheme::kSystematic;
    const double u0 = sys ? u.get(b, 0) : 0.0;
    double c = 0.0;
    int64_t i = 0;
    for (int64_t j = 0; j < last_live && i < M; ++j) {
      c += w[j];
      while (i < M && sorted_position(i, sys ? u0 : u.get(b, i), M) < c) anc[i++] = j;
    }
    for (; i < M; ++i) anc[i] = last_live;  // the last live particle takes what rounding left
    return;
  }
  if (scheme == Scheme::kMultinomial) {
    double c = 0.0;
    for (int64_t j = 0; j < N; ++j) w[j] = (c += w[j]);
    for (int64_t i = 0; i < M; ++i)
      anc[i] = std::min(upper_bound(w, N, u.get(b, i)), last_live);
    return;
  }
  // Residual: floor(M w_j) copies of j, then multinomial draws from the remainders.
  int64_t i = 0;
  double rc = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    const double mw = static_cast<double>(M) * w[j];
    const double fl = std::floor(mw);
    for (int64_t k = 0; k < static_cast<int64_t>(fl) && i < M; ++k) anc[i++] = j;
    buf[j] = (rc += mw - fl);
  }
  const int64_t rest = M - i;
  if (rest <= 0) return;
  const double inv_rc = 1.0 / rc;
  for (int64_t j = 0; j < N; ++j) buf[j] *= inv_rc;
  for (int64_t r = 0; r < rest; ++r)
    anc[i + r] = std::min(upper_bound(buf.data(), N, u.get(b, r)), last_live);
}

// exp(l_j - max) of one row into w; returns (max, sum); max = -inf for a dead row.
template <typename weight_t>
std::pair<double, double> row_exp(const weight_t* row, int64_t N, double* w) {
  double m = -INFINITY;
  for (int64_t j = 0; j < N; ++j) m = std::max(m, clean_logw(row[j]));
  if (m == -INFINITY) return {m, 0.0};
  double s = 0.0;
  for (int64_t j = 0; j < N; ++j) s += (w[j] = std::exp(clean_logw(row[j]) - m));
  return {m, s};
}

at::Tensor resample_cpu(const at::Tensor& logw_in, c10::string_view scheme_name,
                        int64_t num_samples, const std::optional<at::Tensor>& uniforms,
                        const std::optional<at::Generator>& generator) {
  TORCH_CHECK(logw_in.dim() == 2, "resample: logw must be (B, N), got ", logw_in.sizes());
  const int64_t B = logw_in.size(0), N = logw_in.size(1), M = num_samples;
  TORCH_CHECK(N > 0, "resample: logw has an empty population (N = 0)");
  TORCH_CHECK(M > 0, "resample: num_samples must be positive, got ", M);
  const Scheme scheme = scheme_or_throw(std::string(scheme_name));
  const at::Tensor logw = logw_in.contiguous();
  at::Tensor holder;
  const Uniforms u = make_uniforms(uniforms, holder, scheme, B, M, generator);
  at::Tensor anc = at::empty({B, M}, logw.options().dtype(at::kLong));
  int64_t* ap = anc.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::resample", [&] {
    const scalar_t* lw = logw.data_ptr<scalar_t>();
    parallel_rows(B, 3 * N + M, [&](int64_t b0, int64_t b1) {
      std::vector<double> w(N), buf(scheme == Scheme::kResidual ? N : 0);
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* arow = ap + b * M;
        const auto [m, s] = row_exp(lw + b * N, N, w.data());
        if (m == -INFINITY) {  // dead row: keep the particles
          for (int64_t i = 0; i < M; ++i) arow[i] = i % N;
          continue;
        }
        resample_row(w.data(), N, s, M, scheme, u, b, arow, buf);
      }
    });
  });
  return anc;
}

// out[b, i] = in[b, anc[b, i]] for every state tensor, byte-wise (any dtype / trailing shape).
void gather_states(const std::vector<at::Tensor>& states, const at::Tensor& anc,
                   std::vector<at::Tensor>& out) {
  const int64_t B = anc.size(0), N = anc.size(1);
  const int64_t* ap = anc.data_ptr<int64_t>();
  for (const auto& s_in : states) {
    const at::Tensor s = s_in.contiguous();
    at::Tensor o = at::empty_like(s);
    const int64_t bytes = B * N == 0 ? 0 : s.numel() / (B * N) * s.element_size();
    const char* src = static_cast<const char*>(s.data_ptr());
    char* dst = static_cast<char*>(o.data_ptr());
    at::parallel_for(0, B * N, std::max<int64_t>(1, 65536 / std::max<int64_t>(bytes, 1)),
                     [&](int64_t p0, int64_t p1) {
                       for (int64_t p = p0; p < p1; ++p) {
                         const int64_t b = p / N;
                         std::memcpy(dst + p * bytes, src + (b * N + ap[p]) * bytes, bytes);
                       }
                     });
    out.push_back(o);
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> adaptive_resample_cpu(
    at::TensorList states, const at::Tensor& logw_in, double threshold,
    c10::string_view scheme_name, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  TORCH_CHECK(logw_in.dim() == 2, "adaptive_resample: logw must be (B, N), got ",
              logw_in.sizes());
  const int64_t B = logw_in.size(0), N = logw_in.size(1);
  TORCH_CHECK(N > 0, "adaptive_resample: logw has an empty population (N = 0)");
  std::vector<at::Tensor> st;
  for (const auto& s : states) {
    TORCH_CHECK(s.dim() >= 2 && s.size(0) == B && s.size(1) == N,
                "adaptive_resample: every state must be (B, N, ...) matching logw, got ",
                s.sizes());
    st.push_back(s);
  }
  const Scheme scheme = scheme_or_throw(std::string(scheme_name));
  const at::Tensor logw = logw_in.contiguous();
  at::Tensor holder;
  const Uniforms u = make_uniforms(uniforms, holder, scheme, B, N, generator);
  at::Tensor anc = at::empty({B, N}, logw.options().dtype(at::kLong));
  at::Tensor mask = at::empty({B}, logw.options().dtype(at::kBool));
  at::Tensor logw_out = at::empty_like(logw);
  int64_t* ap = anc.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  const double log_n = std::log(static_cast<double>(N));
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::adaptive_resample", [&] {
    const scalar_t* lw = logw.data_ptr<scalar_t>();
    scalar_t* lo = logw_out.data_ptr<scalar_t>();
    parallel_rows(B, 4 * N, [&](int64_t b0, int64_t b1) {
      std::vector<double> w(N), buf(scheme == Scheme::kResidual ? N : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* row = lw + b * N;
        int64_t* arow = ap + b * N;
        const auto [m, s1] = row_exp(row, N, w.data());
        bool go = false;
        double log_mean = -INFINITY;
        if (m != -INFINITY) {
          double s2 = 0.0;
          for (int64_t j = 0; j < N; ++j) s2 += w[j] * w[j];
          const double ess = s1 * s1 / s2;
          go = threshold >= 1.0 || ess < threshold * static_cast<double>(N);
          log_mean = m + std::log(s1) - log_n;
        }
        mp[b] = go;
        if (go) {
          resample_row(w.data(), N, s1, N, scheme, u, b, arow, buf);
          for (int64_t j = 0; j < N; ++j) lo[b * N + j] = static_cast<scalar_t>(log_mean);
        } else {
          for (int64_t j = 0; j < N; ++j) arow[j] = j;
          std::copy(row, row + N, lo + b * N);
        }
      }
    });
  });
  std::vector<at::Tensor> out;
  gather_states(st, anc, out);
  return {out, logw_out, anc, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CPU, m) {
  m.impl("resample", &resample_cpu);
  m.impl("adaptive_resample", &adaptive_resample_cpu);
}

}  // namespace pathsmc::cpu
