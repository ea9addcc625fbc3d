// The torch-facing glue of the CUDA kernels: argument checks, allocation,
// the current stream and device, and the CUDA registrations of the ops whose
// schemas live in ops.cpp. The kernels themselves (dropout_kernels.cu) see no
// torch header.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_common.h"
#include "dropout_kernels.h"

namespace dropout_ext {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "dropout_ext: no CUDA kernel for dtype ", t);
  return cuda::DType::kFloat;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// (seed, offset) stay in device memory: the kernels read them there, so a
// CUDA graph that captured the draw sees each replay's values. A host rng
// (an explicit seed=) is copied over on the current stream.
at::Tensor rng_on_device(const at::Tensor& rng, const at::Tensor& like) {
  return rng.device() == like.device() ? rng.contiguous() : rng.to(like.device());
}

// p_on_device: the rng the caller passed carries p on the GPU; reading it on
// the host would synchronise, so the kernels read it there.
cuda::RngArgs rng_args(const at::Tensor& rng_dev, double p, bool p_on_device) {
  const MaskParams mp = make_mask_params(0, 0, p);
  cuda::RngArgs r;
  r.seed_offset = rng_dev.const_data_ptr<int64_t>();
  r.threshold = mp.threshold;
  r.drop_all = mp.drop_all;
  r.p_on_device = p_on_device;
  return r;
}

bool p_on_device(const at::Tensor& rng) { return rng_carries_p(rng) && !rng.device().is_cpu(); }

double scale_of(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

int64_t last_dim(const at::Tensor& t) { return t.dim() >= 1 ? std::max<int64_t>(t.size(-1), 1) : 1; }

// A structured mask: its small keep mask, drawn by the mask kernel, and the
// strides that broadcast it; the kernels never see a full-size mask.
struct Structured {
  at::Tensor keep;
  cuda::StructuredMask view;
};

Structured structured_mask(const at::Tensor& input, at::IntArrayRef mask_shape, const at::Tensor& rng_dev,
                           double p, bool device_p) {
  Structured s;
  const std::vector<int64_t> mshape = resolve_mask_shape(input, mask_shape);
  if (is_full_mask(input, mshape)) return s;
  TORCH_CHECK_VALUE(input.dim() <= cuda::kMaxDims, "dropout_ext: a structured mask supports up to ",
                    cuda::kMaxDims, " dimensions, got ", input.dim());
  s.keep = at::empty(mshape, input.options().dtype(at::kBool));
  C10_CUDA_CHECK(cuda::launch_mask(s.keep.data_ptr<bool>(), s.keep.numel(), rng_args(rng_dev, p, device_p),
                                   sm_count(), current_stream()));
  const std::vector<int64_t> strides = mask_strides(input, mshape);
  s.view.keep = s.keep.const_data_ptr<bool>();
  s.view.ndim = static_cast<int>(input.dim());
  for (int64_t d = 0; d < input.dim(); ++d) {
    s.view.sizes[d] = input.size(d);
    s.view.strides[d] = strides[d];
  }
  return s;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor fused_dropout_cuda(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const at::Tensor& rng, double p,
                              c10::string_view activation, at::IntArrayRef mask_shape) {
  check_forward(input, bias, residual, rng, p);
  const bool device_p = p_on_device(rng);
  p = host_p(rng, p);
  const Act act = parse_activation(activation);
  resolve_mask_shape(input, mask_shape);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return like_input(input, out);
  const at::Tensor rng_dev = rng_on_device(rng, x);
  const Structured s = structured_mask(x, mask_shape, rng_dev, p, device_p);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  cuda::ForwardArgs a;
  a.dtype = kernel_dtype(x.scalar_type());
  a.act = static_cast<int>(act);
  a.x = x.const_data_ptr();
  a.bias = ptr_or_null(b);
  a.residual = ptr_or_null(r);
  a.out = out.data_ptr();
  a.n = x.numel();
  a.H = last_dim(x);
  a.scale = scale_of(p);
  a.rng = rng_args(rng_dev, p, device_p);
  a.mask = s.view;
  C10_CUDA_CHECK(cuda::launch_forward(a, sm_count(), current_stream()));
  return like_input(input, out);
}

std::tuple<at::Tensor, at::Tensor> fused_dropout_backward_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const at::Tensor& rng, double p, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad) {
  const Act act = check_backward(grad, input, bias, rng, p, activation, bias_grad);
  const bool device_p = p_on_device(rng);
  p = host_p(rng, p);
  resolve_mask_shape(grad, mask_shape);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  const bool needs_x = act != Act::kIdentity;
  const at::Tensor x = needs_x ? input->contiguous() : at::Tensor();
  const at::Tensor b = (needs_x && bias.has_value()) ? bias->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor dbias = bias_grad ? at::empty({g.size(-1)}, g.options()) : at::empty({0}, g.options());
  const int64_t n = g.numel();
  if (n == 0) {
    if (bias_grad) dbias.zero_();
    return {like_input(grad, dx), dbias};
  }
  const at::Tensor rng_dev = rng_on_device(rng, g);
  const Structured s = structured_mask(g, mask_shape, rng_dev, p, device_p);
  cuda::BackwardArgs a;
  a.dtype = kernel_dtype(g.scalar_type());
  a.act = static_cast<int>(act);
  a.grad = g.const_data_ptr();
  a.x = ptr_or_null(x);
  a.bias = ptr_or_null(b);
  a.dx = dx.data_ptr();
  a.n = n;
  a.H = last_dim(g);
  a.scale = scale_of(p);
  a.rng = rng_args(rng_dev, p, device_p);
  a.mask = s.view;
  at::Tensor partial;
  if (bias_grad) {
    // Column sums per row block in the math type, then one ordered sum over
    // the blocks: the same bias gradient on every run.
    const int64_t rows = n / a.H;
    a.rows_per_block = cuda::bias_grad_rows_per_block(rows, a.H, sm_count());
    const int64_t blocks = (rows + a.rows_per_block - 1) / a.rows_per_block;
    const at::ScalarType acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    partial = at::empty({blocks, a.H}, g.options().dtype(acc));
    a.partial = partial.data_ptr();
  }
  C10_CUDA_CHECK(cuda::launch_backward(a, sm_count(), current_stream()));
  if (bias_grad) dbias.copy_(partial.sum(0));
  return {like_input(grad, dx), dbias};
}

at::Tensor dropout_mask_cuda(const at::Tensor& rng, at::IntArrayRef shape, double p) {
  check_mask_args(rng, shape, p);
  const c10::cuda::CUDAGuard guard(rng.device());
  at::Tensor out = at::empty(shape, rng.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const at::Tensor rng_dev = rng.contiguous();
  C10_CUDA_CHECK(cuda::launch_mask(out.data_ptr<bool>(), out.numel(),
                                   rng_args(rng_dev, host_p(rng, p), p_on_device(rng)), sm_count(),
                                   current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dropout_ext, CUDA, m) {
  m.impl("fused_dropout", &fused_dropout_cuda);
  m.impl("fused_dropout_backward", &fused_dropout_backward_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
}

}  // namespace dropout_ext
