// Helpers shared by the CUDA kernels: the Philox state from a torch.Generator (graph-safe),
// launch sizes, and group (sub-warp) reductions with a fixed tree (deterministic).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>

namespace pathsmc::cuda {

constexpr int kThreads = 256;

// The generator's (seed, offset) as a PhiloxCudaState: inside CUDA-graph capture the offset is
// read from device memory at replay time, so every replay draws fresh noise. The generator must
// live on the tensors' device (a captured kernel reads its offset from that device's memory).
inline at::PhiloxCudaState philox_state(const std::optional<at::Generator>& gen,
                                        const at::Device& device) {
  auto* g = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      gen, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  TORCH_CHECK(g->device() == device, "generator: expected a generator on ", device,
              " (the tensors' device), got one on ", g->device());
  std::lock_guard<std::mutex> lock(g->mutex_);
  return g->philox_cuda_state(4);
}

// Every op uses one Philox counter per subsequence and reserves 4 offsets (philox_state), the
// convention of ATen's and curand's kernels, whose counter is offset / 4: using offset / 4 too
// keeps pathsmc's draws disjoint from torch.rand/randn on the same generator (with the raw
// offset as counter, a later torch.randn at offset 4·O would replay this op's draws).
__device__ __forceinline__ void unpack_philox(const at::PhiloxCudaState& s, uint64_t& seed,
                                              uint64_t& offset) {
  const auto t = at::cuda::philox::unpack(s);
  seed = std::get<0>(t);
  offset = std::get<1>(t) / 4;
}

inline unsigned int grid_for(int64_t work, int threads = kThreads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, int64_t{1} << 30));
}

// Lanes per row of D elements for the row-wise kernels: enough elements per lane to amortize,
// never more than a warp.
inline int lanes_per_row(int64_t D) { return D <= 8 ? 1 : (D <= 128 ? 4 : 32); }

// Threads the device keeps resident: fewer rows × 32 lanes than this leaves it underused, and
// the row-wise kernels then cut long rows into segments of one block each.
inline int64_t resident_threads() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return static_cast<int64_t>(p->multiProcessorCount) * p->maxThreadsPerMultiProcessor;
}

// Sum over a group of G consecutive lanes (G a power of two <= 32); every lane gets the sum.
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int o = G / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, G);
  return v;
}

#define PATHSMC_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

}  // namespace pathsmc::cuda
