// Helpers shared by the CPU kernels: the Philox key from a torch.Generator, dtype dispatch of
// the log-weights, and the row-parallel loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace pathsmc::cpu {

// (seed, offset) of the Philox stream for one op call. The CPU generator advances by one
// 64-bit draw per call, so successive calls get fresh noise and a seeded generator repeats.
inline std::pair<uint64_t, uint64_t> philox_key(const std::optional<at::Generator>& gen) {
  auto* g = at::get_generator_or_default<at::CPUGeneratorImpl>(
      gen, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(g->mutex_);
  return {g->random64(), 0};
}

// at::parallel_for over torch's intra-op threads (csrc/cpu/parallel.cpp, built with OpenMP).
// Like at::parallel_for, a call inside another runs inline on the calling thread.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f);

// Rows of `work_per_row` elements each, split so that a task has >= ~32k elements.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t work_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
  parallel_for(0, rows, grain, f);
}

// out[p] = in[source(p)] over the first two dims (P = dim0 · dim1 "particles") of every state
// tensor, byte-wise: any dtype and trailing shape. `source` maps a flat particle index to the
// flat index it copies (a small lambda capturing by value).
template <typename Source>
std::vector<at::Tensor> gather_particles(at::TensorList states, int64_t P, const Source& source) {
  std::vector<at::Tensor> out;
  for (const auto& s_in : states) {
    const at::Tensor s = s_in.contiguous();
    at::Tensor o = at::empty_like(s);
    const int64_t bytes = P == 0 ? 0 : s.numel() / P * s.element_size();
    const char* src = static_cast<const char*>(s.data_ptr());
    char* dst = static_cast<char*>(o.data_ptr());
    parallel_for(0, P, std::max<int64_t>(1, 65536 / std::max<int64_t>(bytes, 1)),
                 [=](int64_t p0, int64_t p1) {
                   for (int64_t p = p0; p < p1; ++p)
                     std::memcpy(dst + p * bytes, src + source(p) * bytes, bytes);
                 });
    out.push_back(o);
  }
  return out;
}

template <typename T>
bool any_posinf(const T* p, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= (p[i] == static_cast<T>(INFINITY));
  return bad != 0;
}

// Log-weights must not hold +inf (NaN is a dead particle, -inf a zero weight).
inline void check_no_posinf_cpu(const at::Tensor& w, const char* name) {
  const bool bad = w.scalar_type() == at::kDouble ? any_posinf(w.data_ptr<double>(), w.numel())
                                                  : any_posinf(w.data_ptr<float>(), w.numel());
  TORCH_CHECK_VALUE(!bad, name, ": contains +inf; log-weights must be finite, -inf or NaN");
}

// Dead particles: NaN log-weights count as -inf.
inline double clean_logw(double v) { return std::isnan(v) ? -INFINITY : v; }

}  // namespace pathsmc::cpu
