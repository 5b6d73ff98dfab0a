// Resampling math shared by the CPU and CUDA kernels.
//
// Ancestors are the inverse CDF of the normalized weights: a_i is the first j whose cumulative
// weight C_j exceeds the i-th position p_i. Systematic positions are (i + u)/M, stratified
// (i + u_i)/M: both sorted, so one merge of positions and cumulative weights (or, in parallel,
// the count #{i : p_i < C_j} of each particle) is O(N + M).
#pragma once

#include <cstdint>
#include <string_view>

#include "pathsmc/macros.h"

namespace pathsmc {

enum class Scheme : int { kSystematic = 0, kStratified = 1, kMultinomial = 2, kResidual = 3 };

// Host only: the scheme names of the Python API.
inline bool parse_scheme(std::string_view name, Scheme* out) {
  if (name == "systematic") { *out = Scheme::kSystematic; return true; }
  if (name == "stratified") { *out = Scheme::kStratified; return true; }
  if (name == "multinomial") { *out = Scheme::kMultinomial; return true; }
  if (name == "residual") { *out = Scheme::kResidual; return true; }
  return false;
}

// First index in the nondecreasing array c[0, n) whose value exceeds p (n if none).
PATHSMC_HD int64_t upper_bound(const double* c, int64_t n, double p) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (c[mid] > p) hi = mid; else lo = mid + 1;
  }
  return lo;
}

}  // namespace pathsmc
