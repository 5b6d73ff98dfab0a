// Helpers shared by the CPU kernels: the Philox key from a torch.Generator, dtype dispatch of
// the log-weights, and the row-parallel loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>

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
