// Argument checks and contract plumbing shared by the CPU and CUDA glue
// (both see torch; the CUDA kernels themselves do not).
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "activations.h"
#include "philox.h"

namespace dropout_ext {

inline Act parse_activation(c10::string_view name) {
  if (name == "identity") return Act::kIdentity;
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "dropout_ext: activation must be one of 'identity', 'relu', 'gelu', "
                    "'gelu_tanh', 'silu', got '", std::string(name), "'");
}

inline void check_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
}

// rng is [seed, offset], or [seed, offset, p] with p's binary64 bits as the
// third word: then p is data, not a constant of the caller (a compiled graph
// whose dropout rate changes keeps one graph), and the float p argument is
// not used.
inline void check_rng(const at::Tensor& rng, const at::Tensor& input) {
  TORCH_CHECK_VALUE(rng.scalar_type() == at::kLong && rng.dim() == 1 && (rng.numel() == 2 || rng.numel() == 3),
                    "dropout_ext: rng must be an int64 tensor [seed, offset] or [seed, offset, p bits], got ",
                    rng.scalar_type(), " of shape ", rng.sizes());
  TORCH_CHECK_VALUE(rng.device().is_cpu() || rng.device() == input.device(),
                    "dropout_ext: rng must be on the CPU or on the input's device (",
                    input.device(), "), got ", rng.device());
}

inline bool rng_carries_p(const at::Tensor& rng) { return rng.numel() == 3; }

// The p an op uses: the float argument, or the one rng carries when rng is
// readable on the host (a device rng's p is read by the kernels themselves).
inline double host_p(const at::Tensor& rng, double p) {
  if (rng_carries_p(rng) && rng.device().is_cpu()) {
    const int64_t bits = rng.contiguous().const_data_ptr<int64_t>()[2];
    std::memcpy(&p, &bits, sizeof(p));
  }
  return p;
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kFloat8_e4m3fn &&
                       t.scalar_type() != at::kFloat8_e5m2,
                   "dropout_ext: ", name, " must be float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
}

inline void check_companion(const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == input.device(), "dropout_ext: ", name,
                    " must be on the input's device (", input.device(), "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "dropout_ext: ", name,
                   " must have the input's dtype (", input.scalar_type(), "), got ",
                   t.scalar_type());
}

inline void check_bias(const at::Tensor& input, const at::Tensor& bias) {
  check_companion(input, bias, "bias");
  TORCH_CHECK_VALUE(input.dim() >= 1 && bias.dim() == 1 && bias.size(0) == input.size(-1),
                    "dropout_ext: bias must be 1-D with the size of the input's last dimension (",
                    input.dim() >= 1 ? input.size(-1) : 0, "), got shape ", bias.sizes());
}

// mask_shape is [] or has the input's rank with every dimension either the
// input's size or 1; returns the full mask shape.
inline std::vector<int64_t> resolve_mask_shape(const at::Tensor& input, at::IntArrayRef mask_shape) {
  if (mask_shape.empty()) return input.sizes().vec();
  TORCH_CHECK_VALUE(static_cast<int64_t>(mask_shape.size()) == input.dim(),
                    "dropout_ext: mask_shape must have the input's rank (", input.dim(),
                    "), got ", mask_shape);
  for (int64_t d = 0; d < input.dim(); ++d) {
    TORCH_CHECK_VALUE(mask_shape[d] == input.size(d) || mask_shape[d] == 1,
                      "dropout_ext: mask_shape[", d, "] must be ", input.size(d), " or 1, got ",
                      mask_shape[d]);
  }
  return mask_shape.vec();
}

inline bool is_full_mask(const at::Tensor& input, const std::vector<int64_t>& mshape) {
  return input.sizes().equals(mshape);
}

// Element strides into the row-major mask: 0 along broadcast dimensions.
inline std::vector<int64_t> mask_strides(const at::Tensor& input, const std::vector<int64_t>& mshape) {
  const int64_t n = input.dim();
  std::vector<int64_t> st(n, 0);
  int64_t s = 1;
  for (int64_t d = n - 1; d >= 0; --d) {
    st[d] = (mshape[d] == 1 && input.size(d) != 1) ? 0 : s;
    s *= mshape[d];
  }
  return st;
}

inline MaskParams mask_params_from_host(const at::Tensor& rng, double p) {
  TORCH_CHECK(rng.device().is_cpu(), "dropout_ext: internal: host rng expected");
  const at::Tensor r = rng.contiguous();
  const int64_t* v = r.const_data_ptr<int64_t>();
  return make_mask_params(static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1]), p);
}

inline void check_forward(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const at::Tensor& rng, double p) {
  check_float_input(input, "input");
  check_rng(rng, input);
  check_p(host_p(rng, p));
  if (bias.has_value()) check_bias(input, *bias);
  if (residual.has_value()) {
    check_companion(input, *residual, "residual");
    TORCH_CHECK_VALUE(residual->sizes().equals(input.sizes()),
                      "dropout_ext: residual must have the input's shape ", input.sizes(), ", got ",
                      residual->sizes());
  }
}

inline Act check_backward(const at::Tensor& grad, const std::optional<at::Tensor>& input,
                          const std::optional<at::Tensor>& bias, const at::Tensor& rng, double p,
                          c10::string_view activation, bool bias_grad) {
  check_float_input(grad, "grad");
  check_rng(rng, grad);
  check_p(host_p(rng, p));
  const Act act = parse_activation(activation);
  TORCH_CHECK_VALUE(act == Act::kIdentity || input.has_value(),
                    "dropout_ext: the backward of activation '", std::string(activation),
                    "' needs the saved input");
  if (input.has_value()) {
    check_companion(grad, *input, "input");
    TORCH_CHECK_VALUE(input->sizes().equals(grad.sizes()), "dropout_ext: input must have grad's shape ",
                      grad.sizes(), ", got ", input->sizes());
  }
  if (bias.has_value()) check_bias(grad, *bias);
  TORCH_CHECK_VALUE(!bias_grad || grad.dim() >= 1, "dropout_ext: bias_grad needs an input of rank >= 1");
  return act;
}

inline void check_mask_args(const at::Tensor& rng, at::IntArrayRef shape, double p) {
  check_rng(rng, rng);
  check_p(host_p(rng, p));
  for (const int64_t s : shape) TORCH_CHECK_VALUE(s >= 0, "dropout_ext: shape must be non-negative, got ", shape);
}

// Results are computed in logical (row-major) order; a non-contiguous input
// gets its output in its own memory format, as nn.Dropout does.
inline at::Tensor like_input(const at::Tensor& input, const at::Tensor& contiguous_result) {
  if (input.is_contiguous()) return contiguous_result;
  at::Tensor out = at::empty_like(input);
  out.copy_(contiguous_result);
  return out;
}

}  // namespace dropout_ext
