// Launchers of the CUDA kernels for y = residual + dropout(act(x + bias)),
// its backward and the keep mask (docs/RNG.md).
//
// No torch includes, here or in dropout_kernels.cu: the kernels compile with
// nvcc alone, which is how CI checks them on machines whose torch has no CUDA
// headers. dropout_cuda.cpp is the thin torch-facing glue.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dropout_ext {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

constexpr int kMaxDims = 8;

// A structured (broadcast) mask: the small keep mask, and for each dimension
// of the input its size and the element stride into that mask (0 along
// broadcast dimensions).
struct StructuredMask {
  const bool* keep = nullptr;  // nullptr: one Philox draw per element
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
};

// What every kernel needs to draw keep bits: (seed, offset) are read from
// device memory, so a captured CUDA graph sees the values of each replay.
struct RngArgs {
  const int64_t* seed_offset = nullptr;  // device [seed, offset] or [seed, offset, p bits]
  uint32_t threshold = 0;                // keep iff word >= threshold
  bool drop_all = false;                 // p == 1
  // p is the binary64 in seed_offset[2]: the kernels derive the threshold
  // and the scale from it (the host's arithmetic, in double), and the
  // threshold, drop_all and the args' scale above are not used.
  bool p_on_device = false;
};

struct ForwardArgs {
  DType dtype = DType::kFloat;
  int act = 0;  // dropout_ext::Act
  const void* x = nullptr;
  const void* bias = nullptr;      // [H] or nullptr
  const void* residual = nullptr;  // like x, or nullptr
  void* out = nullptr;
  int64_t n = 0;
  int64_t H = 1;  // last dimension (the bias length)
  double scale = 1.0;
  RngArgs rng;
  StructuredMask mask;
};

struct BackwardArgs {
  DType dtype = DType::kFloat;
  int act = 0;
  const void* grad = nullptr;
  const void* x = nullptr;     // saved input, for the activation's derivative
  const void* bias = nullptr;  // with x
  void* dx = nullptr;
  // With the bias gradient: per-row-block column sums of the unrounded dx in
  // the math type (float, or double for double), [row_blocks, H].
  void* partial = nullptr;
  int64_t rows_per_block = 0;
  int64_t n = 0;
  int64_t H = 1;
  double scale = 1.0;
  RngArgs rng;
  StructuredMask mask;
};

// Row blocks the bias-gradient kernel uses for this shape (the partial
// buffer's first dimension is ceil(rows / rows_per_block)).
int64_t bias_grad_rows_per_block(int64_t rows, int64_t H, int sm_count);

cudaError_t launch_forward(const ForwardArgs& a, int sm_count, cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs& a, int sm_count, cudaStream_t stream);
cudaError_t launch_mask(bool* out, int64_t n, const RngArgs& rng, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace dropout_ext
