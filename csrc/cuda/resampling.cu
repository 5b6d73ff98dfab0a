// CUDA kernels of the resampling family: resample, adaptive_resample and its in-place form.
//
// Many rows, many blocks per row, no host sync:
//   1. chunk maxima of the log-weights       (grid: chunks x rows)
//   2. row maxima                             (warp per row)
//   3. chunk scans of w = exp(l - max) in float64, chunk totals, sums of squares, last live
//   4. row totals: prefix of the chunk totals, ESS, log Ẑ, which rows resample (thread per row)
//   5. ancestors: each output position binary-searches the cumulative weights (balanced even
//      when one particle takes every offspring); residual first scans, per row in one block,
//      the running count of the floor(M w) copies, and its copy slots binary-search that.
// The cumulative weight of particle j is prefix[chunk(j)] + local_scan[j]. Dead particles
// (w = 0) must never be picked, so their cumulative weight must equal their predecessor's
// exactly: a block sum-scan does not guarantee that (a thread's sequential sums and the
// tree-reduced prefixes of its neighbours round differently), so the sum-scan is followed by an
// exact max-scan over the live items (dead items repeat the last live value), and a chunk's
// total is its own last value, which keeps the weights monotone across chunk boundaries too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <string>
#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "pathsmc/fastmath.h"
#include "pathsmc/philox.h"
#include "pathsmc/resampling.h"

namespace pathsmc::cuda {
namespace {

constexpr int kItems = 16;
constexpr int64_t kChunk = kThreads * kItems;  // particles per chunk (one block)

struct RowState {
  double* max;        // (B,)
  double* total;      // (B,)
  int64_t* last_live; // (B,)
  bool* go;           // (B,) row resamples
  double* log_mean;   // (B,)
};

__device__ __forceinline__ double clean(double v) { return isnan(v) ? -INFINITY : v; }

struct MaxOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <typename weight_t>
__global__ void __launch_bounds__(kThreads) chunk_max_kernel(const weight_t* __restrict__ lw,
                                                             double* __restrict__ cmax,
                                                             int64_t B, int64_t N, int64_t nc) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t c = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    double m = -INFINITY;
    for (int64_t j = c * kChunk + threadIdx.x; j < min(N, (c + 1) * kChunk); j += kThreads)
      m = fmax(m, clean(lw[b * N + j]));
    m = Reduce(tmp).Reduce(m, [](double x, double y) { return fmax(x, y); });
    if (threadIdx.x == 0) cmax[b * nc + c] = m;
    __syncthreads();
  }
}

// One warp per row (max is exact in any order, so lanes may split the chunks).
__global__ void row_max_kernel(const double* __restrict__ cmax, RowState rs, int64_t B,
                               int64_t nc) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t b = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; b < B;
       b += warps) {  // b is the same for the 32 lanes of a warp
    double m = -INFINITY;
    for (int64_t c = lane; c < nc; c += 32) m = fmax(m, cmax[b * nc + c]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) rs.max[b] = m;
  }
}

// Local inclusive scans of w within each chunk, and per-chunk total, sum of squares, last live.
template <typename weight_t>
__global__ void __launch_bounds__(kThreads) chunk_scan_kernel(
    const weight_t* __restrict__ lw, const RowState rs, double* __restrict__ cum,
    double* __restrict__ ctotal, double* __restrict__ csq, int64_t* __restrict__ clast,
    int64_t B, int64_t N, int64_t nc) {
  using Scan = cub::BlockScan<double, kThreads>;
  using Reduce = cub::BlockReduce<double, kThreads>;
  using ReduceI = cub::BlockReduce<int64_t, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
    typename ReduceI::TempStorage reduce_i;
  } tmp;
  const int64_t c = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const double m = rs.max[b];
    const int64_t j0 = c * kChunk + static_cast<int64_t>(threadIdx.x) * kItems;
    double w[kItems];
    bool live[kItems];
    double sq = 0.0;
    int64_t last = -1;
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const int64_t j = j0 + q;
      w[q] = (j < N && m != -INFINITY) ? exp_nonpos(static_cast<double>(lw[b * N + j]) - m) : 0.0;
      live[q] = w[q] > 0;
      sq += w[q] * w[q];
      last = live[q] ? j : last;
    }
    Scan(tmp.scan).InclusiveSum(w, w);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kItems; ++q) w[q] = live[q] ? w[q] : 0.0;
    Scan(tmp.scan).InclusiveScan(w, w, MaxOp());  // exact: dead items repeat the last live value
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kItems; ++q)
      if (j0 + q < N) cum[b * N + j0 + q] = w[q];
    // The chunk total is the last scanned value itself (not a separate reduction), which keeps
    // the global cumulative weights monotone across chunks.
    if (threadIdx.x == kThreads - 1) ctotal[b * nc + c] = w[kItems - 1];
    sq = Reduce(tmp.reduce).Sum(sq);
    __syncthreads();
    last = ReduceI(tmp.reduce_i).Reduce(last, [](int64_t x, int64_t y) { return x > y ? x : y; });
    if (threadIdx.x == 0) {
      csq[b * nc + c] = sq;
      clast[b * nc + c] = last;
    }
    __syncthreads();
  }
}

// Row totals; ctotal becomes the exclusive prefix of the chunk totals.
__global__ void row_total_kernel(double* __restrict__ ctotal, const double* __restrict__ csq,
                                 const int64_t* __restrict__ clast, RowState rs, int64_t B,
                                 int64_t N, int64_t nc, double threshold) {
  for (int64_t b = blockIdx.x * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double run = 0.0, sq = 0.0;
    int64_t last = -1;
    for (int64_t c = 0; c < nc; ++c) {
      const double t = ctotal[b * nc + c];
      ctotal[b * nc + c] = run;
      run += t;
      sq += csq[b * nc + c];
      last = max(last, clast[b * nc + c]);
    }
    // +inf log-weights are invalid (the CPU raises; a kernel cannot): such rows, like dead
    // rows, keep their particles and report ESS 0, log Ẑ = +inf.
    const bool invalid = rs.max[b] == INFINITY;
    const bool dead = rs.max[b] == -INFINITY || invalid || last < 0;
    rs.total[b] = run;
    rs.last_live[b] = last;
    rs.log_mean[b] = invalid ? INFINITY
                     : dead  ? -INFINITY
                             : rs.max[b] + log(run) - log(static_cast<double>(N));
    const double ess = dead ? 0.0 : run * run / sq;
    rs.go[b] = !dead && (threshold >= 1.0 || ess < threshold * static_cast<double>(N));
  }
}

struct Uniforms {
  const double* data;  // explicit, or nullptr for Philox
  int64_t row_stride;  // 1 for systematic (B,), M otherwise
  at::PhiloxCudaState rng;

  __device__ double get(uint64_t seed, uint64_t offset, int64_t b, int64_t i) const {
    const int64_t idx = row_stride == 1 ? b : b * row_stride + i;
    return data ? data[idx] : stream_uniform(seed, offset, static_cast<uint64_t>(idx));
  }
};

// Residual, part 1 (one block per row): the running count of the floor(M w_j) copies into
// `cnt` (search_kernel finds each copy slot's particle by binary search, so a particle with many
// copies is not written by one thread), and the cumulative remainders into `cum` (overwriting
// the weight scan).
template <typename weight_t>
__global__ void __launch_bounds__(kThreads) residual_copies_kernel(
    const weight_t* __restrict__ lw, const RowState rs, double* __restrict__ cum,
    int64_t* __restrict__ det_count, double* __restrict__ rem_total, int64_t* __restrict__ cnt,
    int64_t B, int64_t N, int64_t M) {
  using ScanI = cub::BlockScan<int64_t, kThreads>;
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ union {
    typename ScanI::TempStorage scan_i;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int64_t carry_n;
  __shared__ double carry_r;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    if (!rs.go[b]) continue;  // uniform over the block
    if (threadIdx.x == 0) {
      carry_n = 0;
      carry_r = 0.0;
    }
    __syncthreads();
    const double m = rs.max[b], inv_total = 1.0 / rs.total[b];
    for (int64_t t0 = 0; t0 < N; t0 += kThreads) {
      const int64_t j = t0 + threadIdx.x;
      const double mw = j < N ? static_cast<double>(M) *
                                    (exp_nonpos(static_cast<double>(lw[b * N + j]) - m) * inv_total)
                              : 0.0;
      const double fl = floor(mw);
      int64_t n = static_cast<int64_t>(fl), start, tile_n;
      ScanI(tmp.scan_i).ExclusiveSum(n, start, tile_n);
      __syncthreads();
      double r = mw - fl, rcum, tile_r;
      Scan(tmp.scan).InclusiveSum(r, rcum);
      __syncthreads();
      // Exact max-scan over the items with a remainder (see the file comment): the others
      // repeat the last value, so they are never picked.
      Scan(tmp.scan).InclusiveScan(r > 0 ? rcum : 0.0, rcum, MaxOp(), tile_r);
      const int64_t base = carry_n;
      const double rbase = carry_r;
      if (j < N) {
        cnt[b * N + j] = base + start + n;  // copies of particles 0..j
        cum[b * N + j] = rbase + rcum;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        carry_n = base + tile_n;
        carry_r = rbase + tile_r;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      det_count[b] = min(carry_n, M);
      rem_total[b] = carry_r;
    }
    __syncthreads();
  }
}

// Ancestors by binary search of each position in the cumulative weights of its row.
__global__ void search_kernel(const double* __restrict__ cum, const double* __restrict__ prefix,
                              const RowState rs, const Uniforms u,
                              const int64_t* __restrict__ det_count,
                              const double* __restrict__ rem_total,
                              const int64_t* __restrict__ cnt, int64_t* __restrict__ anc,
                              int64_t B, int64_t N, int64_t M, int64_t nc, int scheme_id) {
  uint64_t seed = 0, offset = 0;
  if (u.data == nullptr) unpack_philox(u.rng, seed, offset);
  const Scheme scheme = static_cast<Scheme>(scheme_id);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < B * M;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = p / M, i = p % M;
    if (!rs.go[b]) {  // dead row or ESS above threshold: keep the particles
      anc[p] = i % N;
      continue;
    }
    const double* row = cum + b * N;
    const double* pre = prefix ? prefix + b * nc : nullptr;
    double pos, scale;
    if (scheme == Scheme::kResidual && i < det_count[b]) {  // a floor(M w_j) copy slot
      const int64_t* row_cnt = cnt + b * N;
      int64_t lo = 0, hi = N - 1;  // the first j whose running count exceeds i
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (row_cnt[mid] > i) hi = mid; else lo = mid + 1;
      }
      anc[p] = lo;
      continue;
    }
    if (scheme == Scheme::kResidual) {
      pos = u.get(seed, offset, b, i - det_count[b]);
      scale = 1.0 / rem_total[b];
    } else if (scheme == Scheme::kMultinomial) {
      pos = u.get(seed, offset, b, i);  // u < C_j / total, as the CPU kernel compares
      scale = 1.0 / rs.total[b];
    } else {
      pos = static_cast<double>(i) + u.get(seed, offset, b, i);
      scale = static_cast<double>(M) / rs.total[b];
    }
    int64_t lo = 0, hi = N;  // first j with pos < C_j * scale
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const double c = (pre ? pre[mid / kChunk] : 0.0) + row[mid];
      if (pos < c * scale) hi = mid; else lo = mid + 1;
    }
    anc[p] = min(lo, rs.last_live[b]);
  }
}

// Runs the pipeline; returns ancestors (B, M) and fills rs (go, log_mean, ...).
at::Tensor ancestors(const at::Tensor& logw, Scheme scheme, int64_t M,
                     const std::optional<at::Tensor>& uniforms,
                     const std::optional<at::Generator>& generator, double threshold,
                     at::Tensor& row_buf, at::Tensor& go) {
  const int64_t B = logw.size(0), N = logw.size(1);
  const int64_t nc = (N + kChunk - 1) / kChunk;
  auto dopt = logw.options().dtype(at::kDouble);
  auto iopt = logw.options().dtype(at::kLong);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor anc = at::empty({B, M}, iopt);
  row_buf = at::empty({3, B}, dopt);  // max, total, log_mean
  at::Tensor last_live = at::empty({B}, iopt);
  go = at::empty({B}, logw.options().dtype(at::kBool));
  if (B == 0) return anc;
  at::Tensor cum = at::empty({B, N}, dopt);
  at::Tensor cstat = at::empty({2, B, nc}, dopt);  // chunk max / total (then prefix), chunk sq
  at::Tensor clast = at::empty({B, nc}, iopt);
  RowState rs{row_buf[0].data_ptr<double>(), row_buf[1].data_ptr<double>(),
              last_live.data_ptr<int64_t>(), go.data_ptr<bool>(), row_buf[2].data_ptr<double>()};
  double* cmax = cstat[0].data_ptr<double>();
  double* csq = cstat[1].data_ptr<double>();

  Uniforms u{nullptr, scheme == Scheme::kSystematic ? 1 : M, at::PhiloxCudaState()};
  at::Tensor u_holder;
  if (uniforms.has_value()) {
    u_holder = check_resampling_uniforms(*uniforms, scheme, B, M, logw);
    u.data = u_holder.data_ptr<double>();
  } else {
    u.rng = philox_state(generator, logw.device());
  }

  const dim3 chunk_grid(static_cast<unsigned int>(nc),
                        static_cast<unsigned int>(std::min<int64_t>(B, 65535)));
  const unsigned int row_grid = grid_for(B);
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "pathsmc::resample", [&] {
    const scalar_t* lw = logw.data_ptr<scalar_t>();
    chunk_max_kernel<scalar_t><<<chunk_grid, kThreads, 0, stream>>>(lw, cmax, B, N, nc);
    PATHSMC_CUDA_CHECK_LAUNCH();
    row_max_kernel<<<grid_for(B * 32), kThreads, 0, stream>>>(cmax, rs, B, nc);
    PATHSMC_CUDA_CHECK_LAUNCH();
    // cmax is reused for the chunk totals (it is no longer needed)
    chunk_scan_kernel<scalar_t><<<chunk_grid, kThreads, 0, stream>>>(
        lw, rs, cum.data_ptr<double>(), cmax, csq, clast.data_ptr<int64_t>(), B, N, nc);
    PATHSMC_CUDA_CHECK_LAUNCH();
    row_total_kernel<<<row_grid, kThreads, 0, stream>>>(cmax, csq, clast.data_ptr<int64_t>(), rs,
                                                        B, N, nc, threshold);
    PATHSMC_CUDA_CHECK_LAUNCH();
    at::Tensor det_count, rem_total, cnt;
    const double* prefix = cmax;
    if (scheme == Scheme::kResidual) {
      det_count = at::empty({B}, iopt);
      rem_total = at::empty({B}, dopt);
      cnt = at::empty({B, N}, iopt);
      residual_copies_kernel<scalar_t>
          <<<static_cast<unsigned int>(std::min<int64_t>(B, 65535)), kThreads, 0, stream>>>(
              lw, rs, cum.data_ptr<double>(), det_count.data_ptr<int64_t>(),
              rem_total.data_ptr<double>(), cnt.data_ptr<int64_t>(), B, N, M);
      PATHSMC_CUDA_CHECK_LAUNCH();
      prefix = nullptr;  // cum now holds whole-row cumulative remainders
    }
    search_kernel<<<grid_for(B * M), kThreads, 0, stream>>>(
        cum.data_ptr<double>(), prefix, rs, u,
        det_count.defined() ? det_count.data_ptr<int64_t>() : nullptr,
        rem_total.defined() ? rem_total.data_ptr<double>() : nullptr,
        cnt.defined() ? cnt.data_ptr<int64_t>() : nullptr, anc.data_ptr<int64_t>(), B, N, M, nc,
        static_cast<int>(scheme));
    PATHSMC_CUDA_CHECK_LAUNCH();
  });
  return anc;
}

at::Tensor resample_cuda(const at::Tensor& logw_in, c10::string_view scheme_name,
                         int64_t num_samples, const std::optional<at::Tensor>& uniforms,
                         const std::optional<at::Generator>& generator) {
  check_logw(logw_in, "resample");
  TORCH_CHECK(num_samples > 0, "resample: num_samples must be positive, got ", num_samples);
  const c10::cuda::CUDAGuard guard(logw_in.device());
  const Scheme scheme = check_scheme(scheme_name);
  at::Tensor row_buf, go;
  // threshold 1: every live row resamples; dead rows get arange(M) % N
  return ancestors(logw_in.contiguous(), scheme, num_samples, uniforms, generator, 1.0, row_buf,
                   go);
}

// out[p] = in[source(p)] for every state, in vector units of up to 16 bytes.
template <typename vec_t>
__global__ void gather_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst,
                              const int64_t* __restrict__ idx, int64_t P, int64_t per, int64_t N,
                              int64_t C, bool replica) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < P * per;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = t / per, v = t % per;
    // adaptive_resample: particle (b, i) <- (b, anc[b, i]); replica_swap: (k, c) <- (perm, c)
    const int64_t s = replica ? idx[p] * C + p % C : (p / N) * N + idx[p];
    dst[t] = src[s * per + v];
  }
}

}  // namespace

// Shared with exchange.cu: gather every state along its first two dims by an index tensor.
std::vector<at::Tensor> gather_particles(at::TensorList states, const at::Tensor& idx, int64_t N,
                                         int64_t C, bool replica) {
  std::vector<at::Tensor> out;
  const int64_t P = idx.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  for (const auto& s_in : states) {
    const at::Tensor s = s_in.contiguous();
    at::Tensor o = at::empty_like(s);
    out.push_back(o);
    if (P == 0 || s.numel() == 0) continue;
    const int64_t bytes = s.numel() / P * s.element_size();
    const auto addr = reinterpret_cast<uintptr_t>(s.data_ptr()) | reinterpret_cast<uintptr_t>(o.data_ptr());
    int vec = 16;
    while (vec > 1 && (bytes % vec != 0 || addr % vec != 0)) vec /= 2;
    const int64_t per = bytes / vec;
    const unsigned int grid = grid_for(P * per);
#define PATHSMC_GATHER(T)                                                                   \
  gather_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(s.data_ptr()),      \
                                                  static_cast<T*>(o.data_ptr()),            \
                                                  idx.data_ptr<int64_t>(), P, per, N, C, replica)
    switch (vec) {
      case 16: PATHSMC_GATHER(uint4); break;
      case 8: PATHSMC_GATHER(uint2); break;
      case 4: PATHSMC_GATHER(uint32_t); break;
      case 2: PATHSMC_GATHER(uint16_t); break;
      default: PATHSMC_GATHER(uint8_t); break;
    }
#undef PATHSMC_GATHER
    PATHSMC_CUDA_CHECK_LAUNCH();
  }
  return out;
}

namespace {

// The decision of adaptive_resample(_): (logw_out, ancestors, resampled); resampled rows
// restart from log Ẑ, others keep their weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_decision(
    const at::Tensor& logw_in, double threshold, c10::string_view scheme_name,
    const std::optional<at::Tensor>& uniforms, const std::optional<at::Generator>& generator) {
  const Scheme scheme = check_scheme(scheme_name);
  const at::Tensor logw = logw_in.contiguous();
  at::Tensor row_buf, go;
  at::Tensor anc = ancestors(logw, scheme, logw.size(1), uniforms, generator, threshold,
                             row_buf, go);
  const at::Tensor log_mean = row_buf[2].to(logw.scalar_type()).unsqueeze(1);
  return {at::where(go.unsqueeze(1), log_mean, logw), anc, go};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> adaptive_resample_cuda(
    at::TensorList states, const at::Tensor& logw_in, double threshold,
    c10::string_view scheme_name, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  check_logw(logw_in, "adaptive_resample");
  const int64_t N = logw_in.size(1);
  check_states(states, logw_in.size(0), N, logw_in.device(), "adaptive_resample",
               "(B, N, ...)");
  const c10::cuda::CUDAGuard guard(logw_in.device());
  auto [logw_out, anc, go] = adaptive_decision(logw_in, threshold, scheme_name, uniforms,
                                               generator);
  return {gather_particles(states, anc, N, 0, false), logw_out, anc, go};
}

// In place: each state is gathered into a temporary of its own size and copied back, so the
// extra memory is one state, not a second copy of all of them (the CPU kernel needs one row).
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaptive_resample_inplace_cuda(
    at::TensorList states, const at::Tensor& logw_in, double threshold,
    c10::string_view scheme_name, const std::optional<at::Tensor>& uniforms,
    const std::optional<at::Generator>& generator) {
  check_logw(logw_in, "adaptive_resample_");
  const int64_t N = logw_in.size(1);
  check_inplace_states(states, logw_in.size(0), N, logw_in.device(), "adaptive_resample_");
  const c10::cuda::CUDAGuard guard(logw_in.device());
  auto [logw_out, anc, go] = adaptive_decision(logw_in, threshold, scheme_name, uniforms,
                                               generator);
  for (const auto& s : states) {
    if (s.numel() == 0) continue;
    at::Tensor gathered = gather_particles({s}, anc, N, 0, false)[0];
    s.copy_(gathered);  // same stream: the temporary is freed only after the copy
  }
  return {logw_out, anc, go};
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsmc, CUDA, m) {
  m.impl("resample", &resample_cuda);
  m.impl("adaptive_resample", &adaptive_resample_cuda);
  m.impl("adaptive_resample_", &adaptive_resample_inplace_cuda);
}

}  // namespace pathsmc::cuda
