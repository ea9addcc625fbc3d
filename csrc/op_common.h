// The last-line argument checks of the C++ ops and the plumbing every C++
// glue file shares (CPU, CUDA, and the CUDA kernels executed on the host).
//
// Python validates every argument first (dropout_ext/_validate.py); these
// checks only stop a direct torch.ops call from reaching a kernel with bad
// input, and they word each rule as _validate.py does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <array>
#include <mutex>
#include <limits>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "activations.h"
#include "index_map.h"
#include "philox.h"

namespace dropout_ext {

// The op families (csrc/ops.cpp): the same schemas and autograd under each.
constexpr const char* kOpPrefixes[] = {"", "cuda_host_", "triton_", "reference_"};

// Values in messages as Python prints them ("torch.float32", "(3, 4)"), so a
// rule reads the same from the C++ checks as from dropout_ext/_validate.py.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_shape(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

inline Act parse_activation(c10::string_view name) {
  if (name == "identity") return Act::kIdentity;
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "activation must be one of ('identity', 'relu', 'gelu', 'gelu_tanh', 'silu'), got '",
                    std::string(name), "'");
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, name,
                   " must be float16, bfloat16, float32 or float64, got ", py_dtype(s));
}

inline void check_companion(const at::Tensor& input, const at::Tensor& t, const char* name) {
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " is on ", t.device(), ", but input is on ",
                    input.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), name, " has dtype ", py_dtype(t.scalar_type()),
                   ", but input has ", py_dtype(input.scalar_type()));
}

inline void check_bias(const at::Tensor& input, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return;
  check_companion(input, *bias, "bias");
  TORCH_CHECK_VALUE(input.dim() >= 1 && bias->dim() == 1 && bias->size(0) == input.size(-1),
                    "bias must be 1-D with the size of input's last dimension (",
                    input.dim() >= 1 ? input.size(-1) : 0, "), got shape ", py_shape(bias->sizes()));
}

inline void check_residual(const at::Tensor& input, const std::optional<at::Tensor>& residual) {
  if (!residual.has_value()) return;
  check_companion(input, *residual, "residual");
  TORCH_CHECK_VALUE(residual->sizes().equals(input.sizes()), "residual must have input's shape ",
                    py_shape(input.sizes()), ", got ", py_shape(residual->sizes()));
}

// The dropout state [seed, offset, p bits] (docs/DESIGN.md) on `device` or
// the CPU (then its words reach the kernels by value), or none (no dropout).
inline void check_state(const std::optional<at::Tensor>& state, const at::Device& device) {
  if (!state.has_value()) return;
  TORCH_CHECK_VALUE(state->scalar_type() == at::kLong && state->dim() == 1 && state->numel() == 3,
                    "state must be an int64 tensor [seed, offset, p bits], got ",
                    py_dtype(state->scalar_type()), " of shape ", py_shape(state->sizes()));
  TORCH_CHECK_VALUE(state->device() == device || state->is_cpu(), "state is on ", state->device(),
                    ", but input is on ", device, " (a state lives on the input's device or the CPU)");
}

inline void check_p_value(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
}

// A forward op draws its state when given p instead of a state (the eager
// path, docs/DESIGN.md), from `generator` or the default generator of the
// input's device.
inline void check_draw(const std::optional<at::Tensor>& state, const std::optional<double>& p,
                       const std::optional<at::Generator>& generator, const at::Device& device) {
  TORCH_CHECK_VALUE(!(state.has_value() && p.has_value()),
                    "state and p exclude each other: p asks the op to draw its state");
  TORCH_CHECK_VALUE(p.has_value() || !generator.has_value(), "generator needs p: it is what a drawn state comes from");
  if (p.has_value()) check_p_value(*p);
  if (generator.has_value()) {
    // Another CUDA device's generator would be read under graph capture from that device's memory.
    const at::Device g = generator->device();
    TORCH_CHECK_VALUE(g.type() == device.type() && (!g.has_index() || !device.has_index() || g.index() == device.index()),
                      "generator is for ", g, ", but input is on ", device);
  }
}

// The forward's last output: a drawn state, [3] on the input's device, or
// an empty int64 tensor when the op drew none.
inline at::Tensor drawn_state_output(const at::Tensor& input, bool drew) {
  return at::empty({drew ? 3 : 0}, input.options().dtype(at::kLong));
}

// Two words from a CPU generator (the CPU ops, and the CUDA kernels executed
// on the host): the state's seed and offset.
inline std::array<int64_t, 2> cpu_drawn_words(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {static_cast<int64_t>(gen->random64()), static_cast<int64_t>(gen->random64())};
}

// The state of a CPU op: the one given, or (p given) one drawn now, written
// into `drawn`, the op's last output.
inline std::optional<at::Tensor> cpu_call_state(const at::Tensor& input, const std::optional<at::Tensor>& state,
                                                const std::optional<double>& p,
                                                const std::optional<at::Generator>& generator, at::Tensor& drawn) {
  drawn = drawn_state_output(input, p.has_value());
  if (!p.has_value()) return state;
  const std::array<int64_t, 2> w = cpu_drawn_words(generator);
  int64_t* out = drawn.data_ptr<int64_t>();
  out[0] = w[0];
  out[1] = w[1];
  out[2] = p_to_bits(*p);
  return drawn;
}

// The contract's parameters of a state the host can read (the CPU kernels,
// and the CUDA kernels executed on the host). p is checked here because a
// direct call may carry any bits; device kernels sanitise instead.
inline MaskParams host_mask_params(const std::optional<at::Tensor>& state) {
  if (!state.has_value()) return keep_all_params();
  const at::Tensor s = state->contiguous();
  const int64_t* w = s.const_data_ptr<int64_t>();
  check_p_value(p_from_bits(w[2]));
  return mask_params_from_state(w);
}

// --- sharded tensors (index_map.h) -------------------------------------------

// place: where a local tensor sits in a global one, [global sizes...,
// starts...] (docs/RNG.md, "Sharded tensors"), or none for an unsharded one.
// Its checks, worded as _validate.check_place words them.
inline void check_place(at::IntArrayRef local, at::OptionalIntArrayRef place) {
  if (!place.has_value()) return;
  const int64_t n = static_cast<int64_t>(local.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(place->size()) == 2 * n, "place must be [global shape..., start...] with ",
                    2 * n, " entries for a local tensor of shape ", py_shape(local), ", got ", place->size());
  int64_t numel = 1;
  for (int64_t d = 0; d < n; ++d) {
    const int64_t g = (*place)[d], s = (*place)[n + d];
    TORCH_CHECK_VALUE(g >= 0 && s >= 0 && s <= g - local[d], "place puts dimension ", d, " (size ", local[d],
                      ") at start ", s, " of a global size ", g, ": it must lie inside");
    TORCH_CHECK_VALUE(g == 0 || numel <= std::numeric_limits<int64_t>::max() / g,
                      "place: the global tensor must have fewer than 2**63 elements");
    numel *= g;
  }
}

// The index map of a local tensor of shape `local` at `place` in a global
// tensor of shape `global`: dimensions of local size 1 dropped (their
// coordinate is always 0), neighbours merged where the global index stays
// linear across them, the innermost run kept apart when its global stride is 1.
inline IndexMap index_map(at::IntArrayRef local, at::IntArrayRef global, at::IntArrayRef start) {
  const int64_t n = static_cast<int64_t>(local.size());
  IndexMap m;
  std::vector<int64_t> sizes, strides;  // innermost first
  int64_t stride = 1;
  for (int64_t d = n - 1; d >= 0; --d) {
    m.base += start[d] * stride;
    if (local[d] != 1) {
      if (!sizes.empty() && strides.back() * sizes.back() == stride) {
        sizes.back() *= local[d];
      } else {
        sizes.push_back(local[d]);
        strides.push_back(stride);
      }
    }
    stride *= global[d];
  }
  size_t k = 0;
  if (!sizes.empty() && strides[0] == 1) m.run = sizes[k++];
  if (sizes.size() == k) return m;  // one run: base + i
  TORCH_CHECK_VALUE(sizes.size() - k <= static_cast<size_t>(kMaxMapDims), "place: a shard may be strided in the ",
                    "global tensor along at most ", kMaxMapDims, " dimensions (merged where consecutive), got ",
                    sizes.size() - k, " for local shape ", py_shape(local), " in global shape ", py_shape(global));
  m.ndims = static_cast<int>(sizes.size() - k);
  for (int j = 0; j < m.ndims; ++j) {
    m.size[j] = sizes[k + j];
    m.stride[j] = strides[k + j];
  }
  return m;
}

// The map of a tensor of shape `local` at `place` (checked), or the identity.
inline IndexMap place_map(at::IntArrayRef local, at::OptionalIntArrayRef place) {
  check_place(local, place);
  if (!place.has_value()) return IndexMap{};
  const size_t n = local.size();
  return index_map(local, place->slice(0, n), place->slice(n, n));
}

// The global shape of a tensor at `place` (its own shape when unsharded).
inline std::vector<int64_t> global_shape(at::IntArrayRef local, at::OptionalIntArrayRef place) {
  return place.has_value() ? place->slice(0, local.size()).vec() : local.vec();
}

// --- the mask's shape --------------------------------------------------------

// mask_shape is [] (one draw per element) or has the input's rank with every
// size equal to the global tensor's (the input's, unsharded) or 1. It speaks
// of the global tensor, so a dimension of one global size whose shard is
// one element long is still told apart from a broadcast one.
struct MaskPlan {
  bool full = true;               // one draw per element
  std::vector<int64_t> shape;     // a structured mask's local shape (read only when not full)
  IndexMap map;                   // of the input's elements (full), else of the small mask's
};

inline MaskPlan mask_plan(const at::Tensor& input, at::IntArrayRef mask_shape, at::OptionalIntArrayRef place) {
  // The common call: one draw per element at its own index, nothing to build.
  if (mask_shape.empty() && !place.has_value()) return MaskPlan{};
  check_place(input.sizes(), place);
  const std::vector<int64_t> global = global_shape(input.sizes(), place);
  const int64_t n = input.dim();
  MaskPlan plan;
  plan.shape = input.sizes().vec();
  if (!mask_shape.empty()) {
    bool ok = static_cast<int64_t>(mask_shape.size()) == n;
    for (int64_t d = 0; ok && d < n; ++d) ok = mask_shape[d] == global[d] || mask_shape[d] == 1;
    TORCH_CHECK_VALUE(ok, "mask_shape must have input's rank with each size equal to ",
                      place.has_value() ? "the global shape's " : "input's ", py_shape(global), " or 1, got ",
                      py_shape(mask_shape));
    plan.full = mask_shape.equals(global);
  }
  if (plan.full) {
    plan.map = place_map(input.sizes(), place);
    return plan;
  }
  std::vector<int64_t> start(n, 0);
  for (int64_t d = 0; d < n; ++d) {
    const bool broadcast = mask_shape[d] != global[d];
    plan.shape[d] = broadcast ? 1 : input.size(d);
    if (place.has_value() && !broadcast) start[d] = (*place)[n + d];
  }
  if (place.has_value()) plan.map = index_map(plan.shape, mask_shape, start);
  return plan;
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

// Bytes of the packed keep mask of n elements: element i is bit i % 8 of
// byte i / 8 (docs/RNG.md), 1/32 of a float32 tensor.
inline int64_t mask_bits_size(int64_t n) { return (n + 7) / 8; }

// A full mask can be packed; a structured one is already small and is drawn
// again, and no state means nothing to pack.
inline bool packable(const MaskPlan& plan, const std::optional<at::Tensor>& state) {
  return state.has_value() && plan.full;
}

inline void check_mask_bits(const at::Tensor& input, const std::optional<at::Tensor>& state, const MaskPlan& plan,
                            const std::optional<at::Tensor>& mask_bits) {
  if (!mask_bits.has_value()) return;
  TORCH_CHECK_VALUE(packable(plan, state),
                    "mask_bits needs a state (its p gives the scale) and a full mask (mask_shape [])");
  TORCH_CHECK_VALUE(mask_bits->scalar_type() == at::kByte && mask_bits->dim() == 1 &&
                        mask_bits->size(0) == mask_bits_size(input.numel()),
                    "mask_bits must be a uint8 tensor of shape (", mask_bits_size(input.numel()), ",), got ",
                    py_dtype(mask_bits->scalar_type()), " of shape ", py_shape(mask_bits->sizes()));
  TORCH_CHECK_VALUE(mask_bits->device() == input.device(), "mask_bits is on ", mask_bits->device(),
                    ", but input is on ", input.device());
}

// The forward's second output: the packed keep mask when asked for and
// packable, else an empty uint8 tensor.
inline at::Tensor mask_bits_output(const at::Tensor& input, const std::optional<at::Tensor>& state,
                                   const MaskPlan& plan, bool pack_mask) {
  const bool pack = pack_mask && packable(plan, state);
  return at::empty({pack ? mask_bits_size(input.numel()) : 0}, input.options().dtype(at::kByte));
}

// What the checks of an elementwise op return: its activation, and where
// its keep bits come from.
struct Checked {
  Act act;
  MaskPlan mask;
};

// The forward's arguments, checked.
inline Checked check_forward(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& state,
                             c10::string_view activation, at::IntArrayRef mask_shape,
                             const std::optional<at::Tensor>& mask_bits, bool pack_mask,
                             at::OptionalIntArrayRef place) {
  check_float_tensor(input, "input");
  check_bias(input, bias);
  check_residual(input, residual);
  check_state(state, input.device());
  Checked c{parse_activation(activation), mask_plan(input, mask_shape, place)};
  check_mask_bits(input, state, c.mask, mask_bits);
  TORCH_CHECK_VALUE(!(pack_mask && mask_bits.has_value()), "pack_mask and mask_bits exclude each other");
  return c;
}

// The backward's arguments, checked.
inline Checked check_backward(const at::Tensor& grad, const std::optional<at::Tensor>& input,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state,
                              c10::string_view activation, at::IntArrayRef mask_shape, bool bias_grad,
                              const std::optional<at::Tensor>& mask_bits, at::OptionalIntArrayRef place) {
  check_float_tensor(grad, "grad");
  const Act act = parse_activation(activation);
  TORCH_CHECK_VALUE(act == Act::kIdentity || input.has_value(), "the backward of activation '",
                    std::string(activation), "' needs the saved input");
  if (input.has_value()) {
    check_companion(grad, *input, "input");
    TORCH_CHECK_VALUE(input->sizes().equals(grad.sizes()), "input must have grad's shape ",
                      py_shape(grad.sizes()), ", got ", py_shape(input->sizes()));
  }
  check_bias(grad, bias);
  check_state(state, grad.device());
  Checked c{act, mask_plan(grad, mask_shape, place)};
  check_mask_bits(grad, state, c.mask, mask_bits);
  TORCH_CHECK_VALUE(!bias_grad || grad.dim() >= 1, "bias_grad needs an input of rank >= 1");
  return c;
}

// dropout_mask's arguments, checked; returns the map of its elements.
inline IndexMap check_mask_args(const at::Tensor& state, at::IntArrayRef shape, at::OptionalIntArrayRef place) {
  check_state(state, state.device());
  for (const int64_t s : shape) TORCH_CHECK_VALUE(s >= 0, "shape must be non-negative, got ", py_shape(shape));
  return place_map(shape, place);
}

// --- dropout_add_norm -----------------------------------------------------

enum class Norm { kLayer, kRms };

inline Norm parse_norm(c10::string_view name) {
  if (name == "layer") return Norm::kLayer;
  if (name == "rms") return Norm::kRms;
  TORCH_CHECK_VALUE(false, "norm must be one of ('layer', 'rms'), got '", std::string(name), "'");
}

// h is float32 with residual_in_fp32 for half and bfloat16 inputs, else the
// input's dtype; the statistics are float64 for float64, else float32.
inline at::ScalarType norm_h_dtype(at::ScalarType input, bool residual_in_fp32) {
  const bool low = input == at::kHalf || input == at::kBFloat16;
  return residual_in_fp32 && low ? at::kFloat : input;
}
inline at::ScalarType norm_stat_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows: the product of every size but the last (some rows may be empty).
inline int64_t norm_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// weight and bias: 1-D of the last dimension's size, in the input's dtype or float32.
inline void check_norm_param(const at::Tensor& input, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  check_float_tensor(*t, name);
  TORCH_CHECK_VALUE(t->device() == input.device(), name, " is on ", t->device(), ", but input is on ",
                    input.device());
  TORCH_CHECK_TYPE(t->scalar_type() == input.scalar_type() || t->scalar_type() == at::kFloat, name,
                   " must have input's dtype (", py_dtype(input.scalar_type()), ") or float32, got ",
                   py_dtype(t->scalar_type()));
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == input.size(-1), name,
                    " must be 1-D with the size of input's last dimension (", input.size(-1), "), got shape ",
                    py_shape(t->sizes()));
}

// The forward's arguments, checked; returns the norm.
inline Norm check_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& state, c10::string_view norm, double eps,
                               bool residual_in_fp32) {
  check_float_tensor(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least one dimension (the normalised one)");
  const Norm kind = parse_norm(norm);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < std::numeric_limits<double>::infinity(),
                    "eps must be a finite real number >= 0, got ", eps);
  if (residual.has_value()) {
    check_float_tensor(*residual, "residual");
    const at::ScalarType h = norm_h_dtype(input.scalar_type(), residual_in_fp32);
    TORCH_CHECK_VALUE(residual->device() == input.device(), "residual is on ", residual->device(),
                      ", but input is on ", input.device());
    TORCH_CHECK_TYPE(residual->scalar_type() == h, "residual must have h's dtype ", py_dtype(h),
                     " (input's, or float32 with residual_in_fp32), got ", py_dtype(residual->scalar_type()));
    TORCH_CHECK_VALUE(residual->sizes().equals(input.sizes()), "residual must have input's shape ",
                      py_shape(input.sizes()), ", got ", py_shape(residual->sizes()));
  }
  check_norm_param(input, weight, "weight");
  check_norm_param(input, bias, "bias");
  TORCH_CHECK_TYPE(!weight.has_value() || !bias.has_value() || weight->scalar_type() == bias->scalar_type(),
                   "weight and bias must have one dtype, got ", py_dtype(weight->scalar_type()), " and ",
                   py_dtype(bias->scalar_type()));
  check_state(state, input.device());
  return kind;
}

// A norm shard holds whole rows: the statistics are of the last dimension,
// so it lies whole on every rank (sequence parallelism splits another one).
inline IndexMap norm_map(at::IntArrayRef local, at::OptionalIntArrayRef place) {
  const IndexMap m = place_map(local, place);
  if (place.has_value() && !local.empty()) {
    const size_t n = local.size();
    TORCH_CHECK_VALUE((*place)[n - 1] == local[n - 1],
                      "dropout_add_norm normalises the last dimension, so each shard must hold it whole: global size ",
                      (*place)[n - 1], ", this shard's ", local[n - 1], " (shard another dimension, as sequence "
                      "parallelism does)");
  }
  return m;
}

// The forward's outputs (y, h, mean, rstd): y and h row-major; mean (empty
// for rms) and rstd one per row in the statistics' dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_outputs(const at::Tensor& input, Norm norm,
                                                                               bool residual_in_fp32) {
  const int64_t rows = norm_rows(input);
  const auto stat = input.options().dtype(norm_stat_dtype(input.scalar_type()));
  return {at::empty(input.sizes(), input.options()),
          at::empty(input.sizes(), input.options().dtype(norm_h_dtype(input.scalar_type(), residual_in_fp32))),
          at::empty({norm == Norm::kLayer ? rows : 0}, stat), at::empty({rows}, stat)};
}

// The backward's arguments, checked; returns the norm.
inline Norm check_norm_backward(const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& rstd, const std::optional<at::Tensor>& state,
                                c10::string_view norm, std::array<bool, 4> output_mask) {
  check_float_tensor(grad, "grad");
  check_float_tensor(h, "h");
  const Norm kind = parse_norm(norm);
  TORCH_CHECK_VALUE(grad.dim() >= 1 && h.sizes().equals(grad.sizes()) && h.device() == grad.device(),
                    "h must have grad's shape ", py_shape(grad.sizes()), " and device, got ", py_shape(h.sizes()),
                    " on ", h.device());
  const at::ScalarType hd = h.scalar_type();
  TORCH_CHECK_TYPE(hd == norm_h_dtype(grad.scalar_type(), false) || hd == norm_h_dtype(grad.scalar_type(), true),
                   "h must have grad's dtype (", py_dtype(grad.scalar_type()),
                   "), or float32 for a float16 or bfloat16 grad (residual_in_fp32), got ", py_dtype(hd));
  TORCH_CHECK_VALUE(!grad_h.has_value() || (grad_h->sizes().equals(h.sizes()) &&
                                            grad_h->scalar_type() == h.scalar_type() &&
                                            grad_h->device() == h.device()),
                    "grad_h must have h's shape, dtype and device");
  check_norm_param(grad, weight, "weight");
  const at::ScalarType stat = norm_stat_dtype(grad.scalar_type());
  const int64_t rows = norm_rows(grad);
  const at::Tensor* stats[] = {&mean, &rstd};
  const char* names[] = {"mean", "rstd"};
  for (int i = 0; i < 2; ++i) {
    const int64_t size = (i == 0 && kind == Norm::kRms) ? 0 : rows;
    const at::Tensor& t = *stats[i];
    TORCH_CHECK_VALUE(t.scalar_type() == stat && t.dim() == 1 && t.size(0) == size && t.device() == grad.device(),
                      names[i], " must be ", py_dtype(stat), " of shape (", size, ",) on ", grad.device(), ", got ",
                      py_dtype(t.scalar_type()), " of shape ", py_shape(t.sizes()), " on ", t.device());
  }
  TORCH_CHECK_VALUE(!output_mask[2] || weight.has_value(),
                    "output_mask is [input, residual, weight, bias]; weight's needs the weight");
  check_state(state, grad.device());
  return kind;
}

// The backward's outputs (grad_input, grad_residual, grad_weight,
// grad_bias), each [0] where output_mask leaves it out; the parameter
// gradients are in the statistics' dtype, zero for no rows.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_backward_outputs(
    const at::Tensor& grad, const at::Tensor& h, std::array<bool, 4> output_mask) {
  const auto stat = grad.options().dtype(norm_stat_dtype(grad.scalar_type()));
  const int64_t H = grad.size(-1);
  auto param = [&](bool need) {
    return !need ? at::empty({0}, stat) : grad.numel() == 0 ? at::zeros({H}, stat) : at::empty({H}, stat);
  };
  return {output_mask[0] ? at::empty(grad.sizes(), grad.options()) : at::empty({0}, grad.options()),
          output_mask[1] ? at::empty(h.sizes(), h.options()) : at::empty({0}, h.options()), param(output_mask[2]),
          param(output_mask[3])};
}

// The backward's outputs: dx in the row-major layout the kernels write, and
// the bias gradient ([H] when asked for, else [0]); an empty grad sums to a
// zero bias gradient, so the kernels never run on it.
inline std::tuple<at::Tensor, at::Tensor> backward_outputs(const at::Tensor& g, bool bias_grad) {
  const auto opts = g.options();
  at::Tensor dbias = !bias_grad         ? at::empty({0}, opts)
                     : g.numel() == 0 ? at::zeros({g.size(-1)}, opts)
                                      : at::empty({g.size(-1)}, opts);
  return {at::empty_like(g, at::MemoryFormat::Contiguous), dbias};
}

// Results are computed in logical (row-major) order; a non-contiguous input
// gets its output in its own memory format, as nn.Dropout does: empty_like's.
// That is the result's own layout for most tensors with gaps (a slice),
// whose result then needs no copy.
inline at::Tensor like_input(const at::Tensor& input, const at::Tensor& contiguous_result) {
  if (input.is_contiguous()) return contiguous_result;
  at::Tensor out = at::empty_like(input);
  if (out.strides() == contiguous_result.strides()) return contiguous_result;
  out.copy_(contiguous_result);
  return out;
}

// --- rows read where they lie -------------------------------------------------
// The GPU kernels stream a tensor as rows of its last dimension H. One whose
// rows are each contiguous and evenly spaced (a slice or chunk of a wider
// last dimension, as qkv.chunk(3, -1) gives) is read in place, row r at
// r * stride, instead of being copied row-major first (a pass over it). A
// unit (16 bytes: `unit` elements) never straddles two rows and every row
// starts a unit: H and the stride are multiples of it, and rows do not
// overlap (a stride below H, an expanded row's 0, is copied). Returns the
// row stride in elements (H for a row-major tensor), or -1: copy it first.
inline int64_t row_stride(at::IntArrayRef sizes, at::IntArrayRef strides, int64_t unit) {
  const int64_t dims = static_cast<int64_t>(sizes.size());
  const int64_t H = dims >= 1 ? sizes[dims - 1] : 1;
  bool rows = false;
  int64_t stride = H, span = 0;  // span: the stride the next outer dimension continues at
  for (int64_t d = dims - 2; d >= 0; --d) {
    if (sizes[d] == 1) continue;
    if (!rows) {
      rows = true;
      stride = strides[d];
    } else if (strides[d] != span) {
      return -1;
    }
    span = strides[d] * sizes[d];
  }
  const bool dense_rows = dims == 0 || sizes[dims - 1] == 1 || strides[dims - 1] == 1;
  if (!dense_rows) return -1;
  if (!rows || stride == H) return H;
  return H % unit == 0 && stride % unit == 0 && stride > H ? stride : -1;
}

}  // namespace dropout_ext
