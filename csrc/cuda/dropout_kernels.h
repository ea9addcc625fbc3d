// Launchers of the CUDA kernels for y = residual + dropout(act(x + bias)),
// its backward and the keep mask (docs/RNG.md).
//
// No torch includes, here or in dropout_kernels.cu: the kernels compile with
// nvcc alone, which is how CI checks them on machines whose torch has no CUDA
// headers. dropout_cuda.cpp is the torch-facing glue; the arguments and the
// grids are in kernel_args.h, the kernels' code in kernel_body.h.
#pragma once

#include <cuda_runtime_api.h>

#include "kernel_args.h"

namespace dropout_ext {
namespace cuda {

// Each launches on `stream` and returns the first launch error (every
// launch is checked); none synchronises or copies between host and device.
cudaError_t launch_forward(const DropoutArgs& a, int sm_count, cudaStream_t stream);
// With a.partial and a.dbias set, also the bias gradient (two launches).
cudaError_t launch_backward(const DropoutArgs& a, int sm_count, cudaStream_t stream);
cudaError_t launch_mask(const MaskArgs& a, int sm_count, cudaStream_t stream);
// dropout_add_norm: the forward; the backward, then the ordered sums of the
// weight and bias gradients' partial rows where asked for (up to three launches).
cudaError_t launch_norm_forward(const NormArgs& a, int sm_count, cudaStream_t stream);
cudaError_t launch_norm_backward(const NormArgs& a, int sm_count, cudaStream_t stream);
// One thread storing a drawn state: a StateRef's by-value words at its out
// (the draw_state op), or a draw under graph capture (GraphDraw).
cudaError_t launch_store_state(const StateRef& s, cudaStream_t stream);
cudaError_t launch_graph_draw(const GraphDraw& d, cudaStream_t stream);

}  // namespace cuda
}  // namespace dropout_ext
