// The one translation unit compiled with OpenMP: at::parallel_for is header code over OpenMP
// pragmas, so without -fopenmp it silently runs on one thread, while -fopenmp everywhere
// slowed the vectorized `omp simd` loops of the kernels. They call this instead.
#include <ATen/Parallel.h>

#include "cpu/common.h"

namespace pathsmc::cpu {

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f) {
  at::parallel_for(begin, end, grain, f);
}

}  // namespace pathsmc::cpu
