// The CUDA kernels: each __global__ function is a thin entry that hands
// blockIdx/threadIdx/gridDim to the per-thread code of kernel_body.h, which
// the host driver (csrc/cuda_host/driver.cpp) runs on the CPU as well, and
// the launchers run the launch sequences kernel_body.h describes.
#include <cuda_runtime.h>

#include "kernel_body.h"
#include "dropout_kernels.h"

namespace dropout_ext {
namespace cuda {
namespace {

// The minimum of blocks per SM is the one the grid is planned for
// (kernel_args.h): ptxas then keeps the registers within what that many
// blocks can hold.
template <typename K>
__global__ void __launch_bounds__(kThreads, K::kBlocksPerSm) kernel_entry(const typename K::Params p) {
  __shared__ typename K::Shared shared;
  const Idx idx{blockIdx.x, blockIdx.y, threadIdx.x, gridDim.x, gridDim.y};
  K::template phase<0>(p, idx, shared);
  if constexpr (K::kPhases > 1) {
    __syncthreads();
    K::template phase<1>(p, idx, shared);
  }
  static_assert(K::kPhases <= 2, "add the phases here");
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

}  // namespace cuda
}  // namespace dropout_ext
