// CPU kernels of the resampling family: resample, adaptive_resample and its in-place form.
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

#include "checks.h"
#include "cpu/common.h"
#include "pathsmc/fastmath.h"
#include "pathsmc/philox.h"
#include "pathsmc/resampling.h"

namespace pathsmc::cpu {
namespace {

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
                       Scheme scheme, int64_t B, int64_t M, const at::Tensor& logw,
                       const std::optional<at::Generator>& gen) {
  Uniforms u;
  u.row_stride = scheme == Scheme::kSystematic ? 1 : M;
  if (uniforms.has_value()) {
    holder = check_resampling_uniforms(*uniforms, scheme, B, M, logw);
    u.data = holder.data_ptr<double>();
  } else {
    std::tie(u.seed, u.offset) = philox_key(gen);
  }
  return u;
}

constexpr int64_t kChunkN = 16384;  // fixed chunks: sums never depend on the thread count

// One row's weights, computed chunk-parallel: w[j] = exp(l_j - max), prefix sums of the
// chunk totals, the float64 total and sum of squares, and the last live particle.
struct RowWeights {
  double max = -INFINITY, total = 0.0, total_sq = 0.0;
  int64_t last_live = -1;
  std::vector<double> prefix;     // prefix[c] = sum of chunks before c; prefix[nc] = total
  std::vector<int64_t> chunk_last;  // last live particle of each chunk, -1 if none

  bool dead() const { return max == -INFINITY; }

  template <typename weight_t>
  void compute(const weight_t* row, int64_t N, double* w) {
    const int64_t nc = (N + kChunkN - 1) / kChunkN;
    std::vector<double> cmax(nc, -INFINITY), csum(nc), csq(nc);
    chunk_last.assign(nc, -1);
    // The parallel bodies capture by value (pointers and scalars): through captured references
    // the compiler must assume the output stores alias them, which de-vectorizes the loops.
    double* const cmax_p = cmax.data();
    parallel_for(0, nc, 1, [=](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = c * kChunkN; j < std::min(N, (c + 1) * kChunkN); ++j) {
          const double v = static_cast<double>(row[j]);
          m = v > m ? v : m;  // NaN (dead) never wins
        }
        cmax_p[c] = m;
      }
    });
    max = *std::max_element(cmax.begin(), cmax.end());
    TORCH_CHECK_VALUE(max != INFINITY, "logw: contains +inf; log-weights must be finite, -inf or NaN");
    if (dead()) return;
    const double mx = max;
    double* const csum_p = csum.data();
    double* const csq_p = csq.data();
    int64_t* const last_p = chunk_last.data();
    parallel_for(0, nc, 1, [=](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kChunkN, j1 = std::min(N, j0 + kChunkN);
        double s = 0.0, q = 0.0;
        int64_t last = -1;
#pragma omp simd reduction(+ : s, q) reduction(max : last)
        for (int64_t j = j0; j < j1; ++j) {
          const double e = exp_nonpos(static_cast<double>(row[j]) - mx);  // NaN (dead) -> 0
          w[j] = e;
          s += e;
          q += e * e;
          last = std::max(last, e > 0 ? j : int64_t{-1});
        }
        csum_p[c] = s;
        csq_p[c] = q;
        last_p[c] = last;
      }
    });
    prefix.assign(nc + 1, 0.0);
    total_sq = 0.0;
    for (int64_t c = 0; c < nc; ++c) {
      prefix[c + 1] = prefix[c] + csum[c];
      total_sq += csq[c];
      last_live = std::max(last_live, chunk_last[c]);
    }
    total = prefix[nc];
  }
};

// Per-thread scratch for sorted positions (stratified, multinomial, residual).
std::vector<double>& position_scratch(int64_t n) {
  thread_local std::vector<double> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf;
}

// #{i < M : position_i < target}, positions (i + u_i) nondecreasing, evaluated with the exact
// comparison the merge uses, so that chunks computed in parallel tile [0, M) exactly.
int64_t count_below(double target, int64_t M, const Uniforms& u, int64_t b) {
  auto below = [&](int64_t i) { return static_cast<double>(i) + u.get(b, i) < target; };
  int64_t k = static_cast<int64_t>(std::clamp(std::floor(target), 0.0, static_cast<double>(M)));
  while (k > 0 && !below(k - 1)) --k;
  while (k < M && below(k)) ++k;
  return k;
}

// #{i < M : i + u < target} for systematic positions, without a loop over i.
inline int64_t count_below_systematic(double target, double u, int64_t M) {
  int64_t k = static_cast<int64_t>(std::clamp(std::ceil(target - u), 0.0, static_cast<double>(M)));
  // ceil(target - u) can be off by one in floating point; match the exact comparison
  k -= (k > 0 && static_cast<double>(k - 1) + u >= target);
  k += (k < M && static_cast<double>(k) + u < target);
  return k;
}

// Systematic / stratified ancestors of one live row: every chunk of particles owns the
// positions between the counts at its prefix sums. Systematic writes each particle's index at
// the start of its interval and fills the rest by a running max (no data-dependent branches);
// stratified, whose positions need their own uniforms, merges positions and weights.
void merge_sorted_positions(double* w, const RowWeights& rw, int64_t N, int64_t M,
                            bool systematic, const Uniforms& u, int64_t b, int64_t* anc) {
  const int64_t nc = static_cast<int64_t>(rw.chunk_last.size());
  const int64_t c_last = rw.last_live / kChunkN;  // the chunk that absorbs rounding leftovers
  const double scale = static_cast<double>(M) / rw.total;  // positions live in [0, M)
  const double u0 = systematic ? u.get(b, 0) : 0.0;
  auto count = [=](double target) {
    return systematic ? count_below_systematic(target, u0, M)
                      : count_below(target, M, u, b);
  };
  parallel_for(0, nc, 1, [=](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (c > c_last) continue;
      const int64_t i0 = count(rw.prefix[c] * scale);
      const int64_t i1 = c == c_last ? M : count(rw.prefix[c + 1] * scale);
      if (i0 >= i1) continue;
      const int64_t j0 = c * kChunkN, j_end = std::min(N, (c + 1) * kChunkN);
      double cum = rw.prefix[c];
      if (systematic) {
        // Three simple loops instead of one branchy merge: (1) the running sum, scaled to
        // positions, (2) each particle's interval end #{i : i + u < C_j·M/S} (vectorized,
        // in doubles: exact for M < 2^53), (3) each particle's index at its interval start;
        // then a running max fills the intervals. w is overwritten (not needed afterwards).
        double* t = w;
        for (int64_t j = j0; j < j_end; ++j) t[j] = (cum += w[j]) * scale;
        const double md = static_cast<double>(M);
#pragma omp simd
        for (int64_t j = j0; j < j_end; ++j) {
          const double target = t[j];
          double k = std::min(std::max(std::ceil(target - u0), 0.0), md);
          k = (k > 0.0 && (k - 1.0) + u0 >= target) ? k - 1.0 : k;  // ceil's rounding, both ways
          k = (k < md && k + u0 < target) ? k + 1.0 : k;
          t[j] = k;
        }
        std::fill(anc + i0, anc + i1, int64_t{-1});
        int64_t start = i0;  // start of particle j's interval
        for (int64_t j = j0; j < j_end && start < i1; ++j) {
          anc[start] = j;  // a later particle with the same start overwrites: it owns it
          start = std::min(static_cast<int64_t>(t[j]), i1);
        }
        int64_t cur = anc[i0];
        for (int64_t i = i0; i < i1; ++i) anc[i] = cur = std::max(cur, anc[i]);
        // rounding leftovers at the end of the chunk belong to its last live particle
        for (int64_t i = start; i < i1; ++i) anc[i] = rw.chunk_last[c];
        continue;
      }
      // stratified: this chunk's positions (i + u_i), their uniforms drawn in one batch
      std::vector<double>& pos = position_scratch(i1 - i0);
#pragma omp simd
      for (int64_t k = 0; k < i1 - i0; ++k) pos[k] = static_cast<double>(i0 + k) + u.get(b, i0 + k);
      int64_t i = i0;
      for (int64_t j = j0; j < j_end && i < i1; ++j) {
        cum += w[j];
        const double target = cum * scale;
        while (i < i1 && pos[i - i0] < target) anc[i++] = j;
      }
      for (; i < i1; ++i) anc[i] = rw.chunk_last[c];
    }
  });
}

// `count` iid categorical draws from the normalized nondecreasing cdf[0, N) into out, using
// the row's uniforms: explicit ones keep their order (binary searches); in-kernel ones are
// drawn already sorted — normalized exponential spacings, u_(i) = S_i / S_count with S the
// running sum of count + 1 Exp(1) draws — and merged with the cdf in O(N + count) instead of
// count cache-missing binary searches (same law; the draws come out sorted).
void categorical_draws(const double* cdf, int64_t N, int64_t last_live, int64_t count,
                       const Uniforms& u, int64_t b, int64_t* out) {
  if (u.data != nullptr) {
    parallel_for(0, count, 4096, [=](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        out[i] = std::min(upper_bound(cdf, N, u.get(b, i)), last_live);
    });
    return;
  }
  std::vector<double>& pos = position_scratch(count + 1);
  const uint64_t base = static_cast<uint64_t>(b) * static_cast<uint64_t>(count + 1);
#pragma omp simd
  for (int64_t i = 0; i <= count; ++i)
    pos[i] = -log_poly(1.0 - stream_uniform(u.seed, u.offset, base + i));
  double run = 0.0;
  for (int64_t i = 0; i <= count; ++i) pos[i] = (run += pos[i]);
  const double inv = 1.0 / run;
  int64_t j = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double p = pos[i] * inv;
    while (j < last_live && cdf[j] <= p) ++j;
    out[i] = j;
  }
}

// Ancestors of one live row into anc[0, M); w holds exp(l_j - max) and is overwritten.
void resample_row(double* w, const RowWeights& rw, int64_t N, int64_t M, Scheme scheme,
                  const Uniforms& u, int64_t b, int64_t* anc) {
  if (scheme == Scheme::kSystematic || scheme == Scheme::kStratified) {
    merge_sorted_positions(w, rw, N, M, scheme == Scheme::kSystematic, u, b, anc);
    return;
  }
  const double inv_total = 1.0 / rw.total;
  if (scheme == Scheme::kMultinomial) {
    double c = 0.0;  // one sequential prefix: exactly monotone, so dead particles stay unpicked
    for (int64_t j = 0; j < N; ++j) w[j] = (c += w[j]) * inv_total;
    categorical_draws(w, N, rw.last_live, M, u, b, anc);
    return;
  }
  // Residual: floor(M w_j) copies of j, then multinomial draws from the remainders.
  int64_t i = 0;
  double rc = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    const double mw = static_cast<double>(M) * (w[j] * inv_total);
    const double fl = std::floor(mw);
    for (int64_t k = 0; k < static_cast<int64_t>(fl) && i < M; ++k) anc[i++] = j;
    w[j] = (rc += mw - fl);
  }
  const int64_t rest = M - i;
  if (rest <= 0) return;
  const double inv_rc = 1.0 / rc;
  for (int64_t j = 0; j < N; ++j) w[j] *= inv_rc;
  categorical_draws(w, N, rw.last_live, rest, u, b, anc + i);
}

// Rows in parallel when there are enough of them; otherwise rows one after the other, each
// with its chunks in parallel. (at::parallel_for marks even its serial fallback as a parallel
// region, so a row loop must not go through it when the chunks are to run in parallel.)
template <typename F>
void for_each_row(int64_t B, int64_t N, const F& f) {
  if (B < at::get_num_threads() && N >= 2 * kChunkN) {
    for (int64_t b = 0; b < B; ++b) f(b);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 4 * kChunkN / std::max<int64_t>(N, 1));
  parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// Per-thread scratch for the weights of a row (reused across calls: no page faults).
double* row_scratch(int64_t N) {
  thread_local std::vector<double> buf;
  if (static_cast<int64_t>(buf.size()) < N) buf.resize(N);
  return buf.data();
}

at::Tensor resample_cpu(const at::Tensor& logw_in, c10::string_view scheme_name,
                        int64_t num_samples, const std::optional<at::Tensor>& uniforms,
                        const std::optional<at::Generator>& generator) {
  check_logw(logw_in, "resample");
  const int64_t B = logw_in.size(0), N = logw_in.size(1), M = num_samples;
  TORCH_CHECK(M > 0, "resample: num_samples must be positive, got ", M);
  const Scheme scheme = check_scheme(scheme_name);
  const at::Tensor logw = logw_in.contiguous();
  at::Tensor holder;
  const Uniforms u = make_uniforms(uniforms, holder, scheme, B, M, logw, generator);
  at::Tensor anc = at::empty({B, M}, logw.options().dtype(at::kLong));
  int64_t* ap = anc.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::resample", [&] {
    const scalar_t* lw = logw.data_ptr<scalar_t>();
    for_each_row(B, N, [&](int64_t b) {
      int64_t* arow = ap + b * M;
      double* w = row_scratch(N);
      RowWeights rw;
      rw.compute(lw + b * N, N, w);
      if (rw.dead()) {  // dead row: keep the particles
        for (int64_t i = 0; i < M; ++i) arow[i] = i % N;
        return;
      }
      resample_row(w, rw, N, M, scheme, u, b, arow);
    });
  });
  return anc;
}


// The resampling decision of adaptive_resample: (logw_out, ancestors, resampled) per row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_ancestors(
    const at::Tensor& logw_in, double threshold, c10::string_view scheme_name,
    const std::optional<at::Tensor>& uniforms, const std::optional<at::Generator>& generator) {
  const int64_t B = logw_in.size(0), N = logw_in.size(1);
  const Scheme scheme = check_scheme(scheme_name);
  const at::Tensor logw = logw_in.contiguous();
  at::Tensor holder;
  const Uniforms u = make_uniforms(uniforms, holder, scheme, B, N, logw, generator);
  at::Tensor anc = at::empty({B, N}, logw.options().dtype(at::kLong));
  at::Tensor mask = at::empty({B}, logw.options().dtype(at::kBool));
  at::Tensor logw_out = at::empty_like(logw);
  int64_t* ap = anc.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  const double log_n = std::log(static_cast<double>(N));
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::adaptive_resample", [&] {
    const scalar_t* lw = logw.data_ptr<scalar_t>();
    scalar_t* lo = logw_out.data_ptr<scalar_t>();
    for_each_row(B, N, [&](int64_t b) {
      const scalar_t* row = lw + b * N;
      int64_t* arow = ap + b * N;
      double* w = row_scratch(N);
      RowWeights rw;
      rw.compute(row, N, w);
      bool go = false;
      double log_mean = -INFINITY;
      if (!rw.dead()) {
        const double ess = rw.total * rw.total / rw.total_sq;
        go = threshold >= 1.0 || ess < threshold * static_cast<double>(N);
        log_mean = rw.max + std::log(rw.total) - log_n;
      }
      mp[b] = go;
      if (go) {
        resample_row(w, rw, N, N, scheme, u, b, arow);
        std::fill(lo + b * N, lo + (b + 1) * N, static_cast<scalar_t>(log_mean));
      } else {
        for (int64_t j = 0; j < N; ++j) arow[j] = j;
        std::copy(row, row + N, lo + b * N);
      }
    });
  });
  return {logw_out, anc, mask};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> adaptive_resample_cpu(
    at::TensorList states, const at::Tensor& logw_in, double threshold,
    c10::string_view scheme_name, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  check_logw(logw_in, "adaptive_resample");
  const int64_t B = logw_in.size(0), N = logw_in.size(1);
  check_states(states, B, N, logw_in.device(), "adaptive_resample", "(B, N, ...)");
  auto [logw_out, anc, mask] = adaptive_ancestors(logw_in, threshold, scheme_name, uniforms,
                                                  generator);
  const int64_t* anc_p = anc.data_ptr<int64_t>();
  std::vector<at::Tensor> out =
      gather_particles(states, B * N, [=](int64_t p) { return (p / N) * N + anc_p[p]; });
  return {out, logw_out, anc, mask};
}

// Gathers one row of P particles of `bytes` each in place: row[i] <- row[a[i]].
// Non-decreasing ancestors (systematic, stratified, multinomial) need no scratch: copying the
// particles with a[i] > i in increasing order, then those with a[i] < i in decreasing order,
// reads every source before it is overwritten (for a[i] = j < i, a[j] <= j by monotonicity, so
// j is never a target of the first pass). Other ancestors (residual) go through a copy of the
// row. Only particles whose ancestor is not themselves are written.
void gather_row_inplace(char* row, const int64_t* a, int64_t P, int64_t bytes, bool monotone) {
  if (monotone) {
    for (int64_t i = 0; i < P; ++i)
      if (a[i] > i) std::memcpy(row + i * bytes, row + a[i] * bytes, bytes);
    for (int64_t i = P - 1; i >= 0; --i)
      if (a[i] < i) std::memcpy(row + i * bytes, row + a[i] * bytes, bytes);
    return;
  }
  thread_local std::vector<char> scratch;
  if (static_cast<int64_t>(scratch.size()) < P * bytes) scratch.resize(P * bytes);
  std::memcpy(scratch.data(), row, P * bytes);
  for (int64_t i = 0; i < P; ++i)
    if (a[i] != i) std::memcpy(row + i * bytes, scratch.data() + a[i] * bytes, bytes);
}

// adaptive_resample_: the same decision, with each resampled row of every state gathered in
// place (gather_row_inplace): no second copy of the states, as with adaptive_resample (a KV
// cache is large), and at most one row of scratch per thread. Rows run in parallel; rows kept
// are not touched.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_resample_inplace_cpu(
    at::TensorList states, const at::Tensor& logw_in, double threshold,
    c10::string_view scheme_name, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  check_logw(logw_in, "adaptive_resample_");
  const int64_t B = logw_in.size(0), N = logw_in.size(1);
  check_inplace_states(states, B, N, logw_in.device(), "adaptive_resample_");
  auto [logw_out, anc, mask] = adaptive_ancestors(logw_in, threshold, scheme_name, uniforms,
                                                  generator);
  const int64_t* ap = anc.data_ptr<int64_t>();
  const bool* mp = mask.data_ptr<bool>();
  std::vector<int64_t> rows;  // the resampled rows, and whether their ancestors are sorted
  std::vector<char> sorted;
  for (int64_t b = 0; b < B; ++b) {
    if (!mp[b]) continue;
    const int64_t* a = ap + b * N;
    bool mono = true;
    for (int64_t i = 1; i < N && mono; ++i) mono = a[i - 1] <= a[i];
    rows.push_back(b);
    sorted.push_back(mono);
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  for (const auto& s : states) {
    if (s.numel() == 0 || R == 0) continue;
    const int64_t bytes = s.numel() / (B * N) * s.element_size();
    char* base = static_cast<char*>(s.data_ptr());
    parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = rows[r];
        gather_row_inplace(base + b * N * bytes, ap + b * N, N, bytes, sorted[r] != 0);
      }
    });
  }
  return {logw_out, anc, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CPU, m) {
  m.impl("resample", &resample_cpu);
  m.impl("adaptive_resample", &adaptive_resample_cpu);
  m.impl("adaptive_resample_", &adaptive_resample_inplace_cpu);
}

}  // namespace pathsmc::cpu
