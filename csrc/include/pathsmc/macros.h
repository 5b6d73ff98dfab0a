// Host+device qualifiers for the math shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PATHSMC_HD __host__ __device__ __forceinline__
#else
#define PATHSMC_HD inline
#endif
