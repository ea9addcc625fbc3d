// The CUDA registrations of the ops (schemas in csrc/ops.cpp): the
// shared op bodies of ops_impl.h run with a device guard on the input's
// device, on its current stream, every launch checked. The state is read by
// the kernels from device memory: no host sync, no host-to-device copy.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <tuple>

#include "dropout_kernels.h"
#include "ops_impl.h"

namespace dropout_ext {
namespace {

struct CudaExec {
  c10::cuda::CUDAGuard guard(const at::Device& device) const { return c10::cuda::CUDAGuard(device); }
  // Reading p from device memory would sync: the kernels sanitise it
  // instead. A state on the CPU is read on the host anyway.
  void check_p(const std::optional<at::Tensor>& state) const {
    if (state.has_value() && state->is_cpu()) host_mask_params(state);
  }
  // philox_cuda_state reserves the generator's next counters: host values,
  // turned into the state here and passed by value (one launch), or under
  // graph capture pointers that every replay refreshes, turned into the
  // state by a one-thread launch that the graph replays before the kernels.
  StateRef draw(const at::Tensor& input, double p, const std::optional<at::Generator>& generator,
                int64_t* out) const {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(input.get_device()));
    at::PhiloxCudaState ps;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      ps = gen->philox_cuda_state(4);
    }
    if (!ps.captured_) {
      int64_t seed, offset;
      drawn_words(ps.seed_.val, ps.offset_.val, seed, offset);
      return cuda::drawn_by_value(seed, offset, p, out);
    }
    GraphDraw d;
    d.gen_seed = ps.seed_.ptr;
    d.gen_offset = ps.offset_.ptr;
    d.gen_offset_intragraph = ps.offset_intragraph_;
    d.p_bits = p_to_bits(p);
    d.out = out;
    C10_CUDA_CHECK(cuda::launch_graph_draw(d, stream()));
    StateRef s;
    s.kind = StateRef::kMemory;
    s.words = out;
    return s;
  }
  // A state drawn by value reaches memory with the first kernel; alone, it
  // needs a launch of its own (a state given by value has nowhere to go).
  void store_state(const StateRef& s) const {
    if (s.kind == StateRef::kValue && s.out != nullptr) C10_CUDA_CHECK(cuda::launch_store_state(s, stream()));
  }
  // Read under the guard: the current device's.
  int sm_count() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
  void forward(const cuda::DropoutArgs& a, int sms) const { C10_CUDA_CHECK(cuda::launch_forward(a, sms, stream())); }
  void backward(const cuda::DropoutArgs& a, int sms) const {
    C10_CUDA_CHECK(cuda::launch_backward(a, sms, stream()));
  }
  void mask(const cuda::MaskArgs& a, int sms) const { C10_CUDA_CHECK(cuda::launch_mask(a, sms, stream())); }
  void norm_forward(const cuda::NormArgs& a, int sms) const {
    C10_CUDA_CHECK(cuda::launch_norm_forward(a, sms, stream()));
  }
  void norm_backward(const cuda::NormArgs& a, int sms) const {
    C10_CUDA_CHECK(cuda::launch_norm_backward(a, sms, stream()));
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_dropout_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    const std::optional<at::Tensor>& mask_bits, bool pack_mask, std::optional<double> p,
    const std::optional<at::Generator>& generator, at::OptionalIntArrayRef place) {
  return cuda::fused_dropout_op(CudaExec{}, input, bias, residual, state, activation, mask_shape, mask_bits,
                                pack_mask, p, generator, place);
}

std::tuple<at::Tensor, at::Tensor> fused_dropout_backward_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad, const std::optional<at::Tensor>& mask_bits, at::OptionalIntArrayRef place) {
  return cuda::fused_dropout_backward_op(CudaExec{}, grad, input, bias, state, activation, mask_shape, bias_grad,
                                         mask_bits, place);
}

at::Tensor dropout_mask_cuda(const at::Tensor& state, at::IntArrayRef shape,
                             at::OptionalIntArrayRef place) {
  return cuda::dropout_mask_op(CudaExec{}, state, shape, place);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state, c10::string_view norm, double eps,
    bool residual_in_fp32, std::optional<double> p, const std::optional<at::Generator>& generator,
    at::OptionalIntArrayRef place) {
  return cuda::dropout_add_norm_op(CudaExec{}, input, residual, weight, bias, state, norm, eps, residual_in_fp32, p,
                                   generator, place);
}

at::Tensor draw_state_cuda(const at::Tensor& input, double p, const std::optional<at::Generator>& generator) {
  return cuda::draw_state_op(CudaExec{}, input, p, generator);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_backward_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& state, c10::string_view norm, std::array<bool, 4> output_mask,
    at::OptionalIntArrayRef place) {
  return cuda::dropout_add_norm_backward_op(CudaExec{}, grad, grad_h, h, weight, mean, rstd, state, norm,
                                            output_mask, place);
}

}  // namespace

TORCH_LIBRARY_IMPL(dropout_ext, CUDA, m) {
  m.impl("fused_dropout", &fused_dropout_cuda);
  m.impl("fused_dropout_backward", &fused_dropout_backward_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
  m.impl("dropout_add_norm", &dropout_add_norm_cuda);
  m.impl("dropout_add_norm_backward", &dropout_add_norm_backward_cuda);
  m.impl("draw_state", &draw_state_cuda);
}

}  // namespace dropout_ext
