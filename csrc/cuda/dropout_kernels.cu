// The CUDA kernels: each __global__ function is a thin entry that hands
// blockIdx/threadIdx/gridDim to the per-thread code of kernel_body.h and
// norm_body.h, which the host driver (csrc/cuda_host) runs on the CPU as
// well, and the launchers run the launch sequences they describe.
#include <cuda_runtime.h>

#include <utility>

#include "kernel_body.h"
#include "norm_body.h"
#include "dropout_kernels.h"

namespace dropout_ext {
namespace cuda {
namespace {

// The minimum of blocks per SM is the one the grid is planned for
// (kernel_args.h): ptxas then keeps the registers within what that many
// blocks can hold.
template <typename K, int kPhase>
__device__ __forceinline__ void synced_phase(const typename K::Params& p, const Idx& idx, typename K::Shared& shared,
                                             typename K::Local& local, int64_t round) {
  if constexpr (kPhase != 0) __syncthreads();
  K::template phase<kPhase>(p, idx, shared, local, round);
}

template <typename K, int... kPhase>
__device__ __forceinline__ void run_round(const typename K::Params& p, const Idx& idx, typename K::Shared& shared,
                                          typename K::Local& local, int64_t round,
                                          std::integer_sequence<int, kPhase...>) {
  (synced_phase<K, kPhase>(p, idx, shared, local, round), ...);
}

template <typename K>
__global__ void __launch_bounds__(kThreads, K::kBlocksPerSm) kernel_entry(const typename K::Params p) {
  __shared__ typename K::Shared shared;
  const Idx idx{blockIdx.x, blockIdx.y, threadIdx.x, gridDim.x, gridDim.y};
  if constexpr (has_local<K>::value) {
    typename K::Local local;
    const int64_t rounds = K::rounds(p, idx);
    for (int64_t round = 0; round < rounds; ++round) {
      if (round != 0) __syncthreads();  // the last phase's shared reads before the next round's writes
      run_round<K>(p, idx, shared, local, round, std::make_integer_sequence<int, K::kPhases>{});
    }
  } else {
    K::template phase<0>(p, idx, shared);
    if constexpr (K::kPhases > 1) {
      __syncthreads();
      K::template phase<1>(p, idx, shared);
    }
    static_assert(K::kPhases <= 2, "add the phases here");
  }
}

struct DeviceRunner {
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <typename K>
  bool launch(const typename K::Params& p, Grid2 grid) {
    // Checked before dim3 narrows the grid to 32 bits, which could wrap an
    // oversized plan into a valid-looking one.
    if (launch_refusal(grid, kThreads, shared_bytes<K>()) != nullptr) {
      error = cudaErrorInvalidConfiguration;
      return false;
    }
    const dim3 blocks(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y));
    kernel_entry<K><<<blocks, kThreads, 0, stream>>>(p);
    error = cudaGetLastError();
    return error == cudaSuccess;
  }
};

}  // namespace

cudaError_t launch_store_state(const StateRef& s, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_store_state(r, s);
  return r.error;
}

cudaError_t launch_graph_draw(const GraphDraw& d, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_store_state(r, d);
  return r.error;
}

cudaError_t launch_forward(const DropoutArgs& a, int sm_count, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_forward(r, a, sm_count);
  return r.error;
}

cudaError_t launch_backward(const DropoutArgs& a, int sm_count, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_backward(r, a, sm_count);
  return r.error;
}

cudaError_t launch_mask(const MaskArgs& a, int sm_count, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_mask(r, a, sm_count);
  return r.error;
}

cudaError_t launch_norm_forward(const NormArgs& a, int sm_count, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_norm_forward(r, a, sm_count);
  return r.error;
}

cudaError_t launch_norm_backward(const NormArgs& a, int sm_count, cudaStream_t stream) {
  DeviceRunner r{stream};
  run_norm_backward(r, a, sm_count);
  return r.error;
}

}  // namespace cuda
}  // namespace dropout_ext
