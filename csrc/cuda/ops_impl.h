// The ops of the CUDA kernels, written once for both places they run: the
// CUDA dispatch key (dropout_cuda.cpp, kernels launched on the GPU) and the
// host driver (csrc/cuda_host/driver.cpp, the same kernels executed on the
// CPU). Checks, allocation and the kernels' arguments are here; an Exec
// supplies the rest:
//
//   exec.guard(device)       an RAII device guard (CUDAGuard, or nothing)
//   exec.check_p(state)      refuse a p outside [0, 1] where the state is
//                            readable on the host; a no-op for a state in
//                            GPU memory, whose kernels sanitise p instead of
//                            syncing to read it
//   exec.draw(input, p, generator, out)
//                            a state drawn now from the generator of the
//                            input's device (StateRef, philox.h), stored by
//                            the kernels at out
//   exec.sm_count()          the SM count the grids are computed for
//   exec.store_state(ref)    launch the store of a drawn state alone
//   exec.forward(args, sms)  / backward(args, sms) / mask(args, sms) /
//                            norm_forward(args, sms) / norm_backward(args, sms):
//                            launch, checked, on the current stream
//
// Sees torch but no CUDA header, so the host driver builds without a CUDA
// toolkit.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_common.h"
#include "kernel_args.h"

namespace dropout_ext {
namespace cuda {

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "no CUDA kernel for dtype ", t);
  return DType::kFloat;
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

inline int64_t last_dim(const at::Tensor& t) { return t.dim() >= 1 ? std::max<int64_t>(t.size(-1), 1) : 1; }

// A streamed tensor as the kernels read it: itself where its rows can be
// read in place (op_common.h, row_stride), with their stride, else a
// row-major copy. The kernels take 0 for row-major; the rule gives any
// other tensor a stride above H, never 0.
struct Rows {
  at::Tensor t;
  int64_t stride = 0;
};

inline Rows rows_of(const at::Tensor& t) {
  if (t.is_contiguous()) return {t, 0};
  const int64_t s = row_stride(t.sizes(), t.strides(), unit_elems(kernel_dtype(t.scalar_type())));
  if (s < 0) return {t.contiguous(), 0};
  TORCH_INTERNAL_ASSERT(s >= last_dim(t), "row_stride gave ", s, " for rows of ", last_dim(t));
  return {t, s == last_dim(t) ? 0 : s};
}

// The state of a forward or backward call (docs/DESIGN.md): the one given,
// read where it lives (in memory on the input's device, or by value from a
// CPU state: no copy, no sync), or, with p, one the op draws now, which the
// launch's first thread stores into `drawn`, the op's last output, for the
// backward. `given` keeps a given state alive until the launch; `present` is
// the state as the checks see it (given, drawn, or none).
struct CallState {
  StateRef ref;
  at::Tensor given;
  at::Tensor drawn;
  std::optional<at::Tensor> present;

  // The forward's last output: the drawn state, or an empty one.
  at::Tensor output(const at::Tensor& input) const {
    return drawn.defined() ? drawn : drawn_state_output(input, false);
  }
};

template <class Exec>
CallState call_state(const Exec& exec, const at::Tensor& input, const std::optional<at::Tensor>& state,
                     const std::optional<double>& p, const std::optional<at::Generator>& generator) {
  CallState c;
  if (p.has_value()) {
    c.drawn = at::empty({3}, input.options().dtype(at::kLong));
    c.ref = exec.draw(input, *p, generator, c.drawn.data_ptr<int64_t>());
    c.present = c.drawn;
  } else if (state.has_value()) {
    c.given = state->contiguous();
    const int64_t* w = c.given.const_data_ptr<int64_t>();
    if (c.given.device() == input.device()) {
      c.ref.kind = StateRef::kMemory;
      c.ref.words = w;
    } else {  // check_state allows only the CPU here: host memory
      c.ref.kind = StateRef::kValue;
      for (int i = 0; i < 3; ++i) c.ref.value[i] = w[i];
    }
    c.present = state;
  }
  return c;
}

// A state the host drew (or a draw the host resolved): its words by value.
inline StateRef drawn_by_value(int64_t seed, int64_t offset, double p, int64_t* out) {
  StateRef s;
  s.kind = StateRef::kValue;
  s.value[0] = seed;
  s.value[1] = offset;
  s.value[2] = p_to_bits(p);
  s.out = out;
  return s;
}

// The structured mask's index map: the input's dimensions with size-1 ones
// dropped and neighbours merged where the mask index is linear across them
// (both broadcast, or both kept and adjacent in the mask), innermost first.
// Dropout2d's (N, C, H, W) over (N, C, 1, 1) becomes [H*W broadcast, N*C].
inline StructuredMask collapse_mask(const at::Tensor& input, const std::vector<int64_t>& mshape) {
  const std::vector<int64_t> st = mask_strides(input, mshape);
  std::vector<int64_t> sizes, strides;  // outermost first
  for (int64_t d = 0; d < input.dim(); ++d) {
    const int64_t s = input.size(d);
    if (s == 1) continue;
    if (!sizes.empty() && strides.back() == s * st[d]) {
      sizes.back() *= s;
      strides.back() = st[d];
    } else {
      sizes.push_back(s);
      strides.push_back(st[d]);
    }
  }
  if (sizes.empty()) {  // a single element
    sizes.push_back(1);
    strides.push_back(0);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(sizes.size()) <= kMaxDims, "a structured mask supports up to ",
                    kMaxDims, " alternating runs of broadcast and kept dimensions, got ", sizes.size(),
                    " for input shape ", input.sizes(), " and mask_shape ", mshape);
  StructuredMask m;
  m.ndim = static_cast<int>(sizes.size());
  for (int d = 0; d < m.ndim; ++d) {
    m.size[d] = make_fast_div(static_cast<uint64_t>(sizes[m.ndim - 1 - d]));
    m.stride[d] = strides[m.ndim - 1 - d];
  }
  return m;
}

// A structured mask: its small keep mask, drawn by the mask kernel from the
// state in device memory, and its index map; the kernels never see a
// full-size mask. No state means no dropout: no mask at all.
struct Structured {
  at::Tensor keep;
  StructuredMask view;
};

template <class Exec>
Structured structured_mask(const Exec& exec, int sms, const at::Tensor& input, const MaskPlan& plan,
                           const StateRef& state) {
  Structured s;
  if (plan.full || state.kind == StateRef::kNone) return s;
  s.view = collapse_mask(input, plan.shape);  // refused before any launch
  s.keep = at::empty(plan.shape, input.options().dtype(at::kBool));
  MaskArgs m;
  m.out = s.keep.data_ptr<bool>();
  m.n = s.keep.numel();
  m.state = state;
  m.map = shard_map(plan.map);
  exec.mask(m, sms);
  s.view.keep = s.keep.const_data_ptr<bool>();
  return s;
}

// A structured mask shape the kernels cannot index is refused before the
// forward draws: a refused call leaves the generator as it was. (A call
// given its state is refused by structured_mask, before any launch.)
inline void check_structured(const at::Tensor& input, const MaskPlan& plan) {
  if (!plan.full) collapse_mask(input, plan.shape);
}

// What both directions' kernels take of the tensor they stream (the input,
// or the gradient) and of the dropout state; a structured mask's keep bits
// and the packed mask read stay alive in here until the launch.
struct Prepared {
  DropoutArgs args;
  Structured mask;
  at::Tensor bits_in;
};

template <class Exec>
Prepared prepare(const Exec& exec, int sms, const at::Tensor& t, Act act, const StateRef& state,
                 const MaskPlan& plan, const std::optional<at::Tensor>& mask_bits, int64_t base) {
  Prepared p;
  // check_mask_bits let only a full mask with a state have bits: no
  // structured mask is drawn beside them.
  p.bits_in = mask_bits.has_value() ? mask_bits->contiguous() : at::Tensor();
  p.mask = structured_mask(exec, sms, t, plan, state);
  DropoutArgs& a = p.args;
  a.dtype = kernel_dtype(t.scalar_type());
  a.act = static_cast<int>(act);
  a.n = t.numel();
  a.H = make_fast_div(static_cast<uint64_t>(last_dim(t)));
  a.state = state;
  a.map = shard_map(plan.full ? plan.map : IndexMap{}, base);
  a.mask = p.mask.view;
  a.bits_in = p.bits_in.defined() ? p.bits_in.const_data_ptr<uint8_t>() : nullptr;
  return p;
}

// place: where the input sits in a global tensor (op_common.h, mask_plan),
// or none. base: a shift of the map's global indices, nonzero only from the
// host driver's test entry points.
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_dropout_op(
    const Exec& exec, const at::Tensor& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& state, c10::string_view activation,
    at::IntArrayRef mask_shape, const std::optional<at::Tensor>& mask_bits, bool pack_mask,
    const std::optional<double>& p_draw, const std::optional<at::Generator>& generator,
    at::OptionalIntArrayRef place, int64_t base = 0) {
  const Checked c = check_forward(input, bias, residual, state, activation, mask_shape, mask_bits, pack_mask, place);
  check_draw(state, p_draw, generator, input.device());
  if (p_draw.has_value()) check_structured(input, c.mask);
  exec.check_p(state);
  [[maybe_unused]] const auto guard = exec.guard(input.device());
  const CallState cs = call_state(exec, input, state, p_draw, generator);
  at::Tensor bits = mask_bits_output(input, cs.present, c.mask, pack_mask);
  const Rows x = rows_of(input);
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (input.numel() == 0) {
    exec.store_state(cs.ref);  // the state drawn is returned even with no element to launch for
    return {like_input(input, out), bits, cs.output(input)};
  }
  const int sms = exec.sm_count();
  Prepared p = prepare(exec, sms, input, c.act, cs.ref, c.mask, mask_bits, base);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Rows r = residual.has_value() ? rows_of(*residual) : Rows{};
  DropoutArgs& a = p.args;
  a.x = x.t.const_data_ptr();
  a.x_rows = x.stride;
  a.bias = ptr_or_null(b);
  a.residual = ptr_or_null(r.t);
  a.residual_rows = r.stride;
  a.out = out.data_ptr();
  // Empty unless packing was asked for and the mask is packable.
  a.bits_out = bits.numel() > 0 ? bits.data_ptr<uint8_t>() : nullptr;
  exec.forward(a, sms);
  return {like_input(input, out), bits, cs.output(input)};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> fused_dropout_backward_op(
    const Exec& exec, const at::Tensor& grad, const std::optional<at::Tensor>& input,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state, c10::string_view activation,
    at::IntArrayRef mask_shape, bool bias_grad, const std::optional<at::Tensor>& mask_bits,
    at::OptionalIntArrayRef place, int64_t base = 0) {
  const Checked c = check_backward(grad, input, bias, state, activation, mask_shape, bias_grad, mask_bits, place);
  const Act act = c.act;
  exec.check_p(state);
  [[maybe_unused]] const auto guard = exec.guard(grad.device());
  const Rows g = rows_of(grad);
  // identity's derivative needs neither the input nor the bias
  const bool needs_x = act != Act::kIdentity;
  const Rows x = needs_x ? rows_of(*input) : Rows{};
  const at::Tensor b = (needs_x && bias.has_value()) ? bias->contiguous() : at::Tensor();
  at::Tensor dx, dbias;
  std::tie(dx, dbias) = backward_outputs(grad, bias_grad);
  const int64_t n = grad.numel();
  if (n == 0) return {like_input(grad, dx), dbias};
  const int sms = exec.sm_count();
  const CallState cs = call_state(exec, grad, state, std::nullopt, std::nullopt);
  Prepared p = prepare(exec, sms, grad, act, cs.ref, c.mask, mask_bits, base);
  DropoutArgs& a = p.args;
  a.grad = g.t.const_data_ptr();
  a.grad_rows = g.stride;
  a.x = ptr_or_null(x.t);
  a.x_rows = x.stride;
  a.bias = ptr_or_null(b);
  a.out = dx.data_ptr();
  at::Tensor partial;
  if (bias_grad) {
    const int64_t H = last_dim(grad);
    const BiasGradPlan plan = plan_bias_grad(n / H, H, a.dtype, act, sms);
    const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    partial = at::empty({plan.row_blocks, H}, grad.options().dtype(acc));
    a.partial = partial.data_ptr();
    a.dbias = dbias.data_ptr();
  }
  exec.backward(a, sms);
  return {like_input(grad, dx), dbias};
}

template <class Exec>
at::Tensor dropout_mask_op(const Exec& exec, const at::Tensor& state, at::IntArrayRef shape,
                           at::OptionalIntArrayRef place, int64_t base = 0) {
  const IndexMap map = check_mask_args(state, shape, place);
  exec.check_p(state);
  [[maybe_unused]] const auto guard = exec.guard(state.device());
  at::Tensor out = at::empty(shape, state.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const CallState cs = call_state(exec, out, state, std::nullopt, std::nullopt);
  MaskArgs m;
  m.out = out.data_ptr<bool>();
  m.n = out.numel();
  m.state = cs.ref;
  m.map = shard_map(map, base);
  exec.mask(m, exec.sm_count());
  return out;
}

// The state a forward op would draw, drawn alone into device memory.
template <class Exec>
at::Tensor draw_state_op(const Exec& exec, const at::Tensor& input, double p,
                         const std::optional<at::Generator>& generator) {
  check_draw(std::nullopt, p, generator, input.device());
  [[maybe_unused]] const auto guard = exec.guard(input.device());
  const CallState cs = call_state(exec, input, std::nullopt, p, generator);
  exec.store_state(cs.ref);
  return cs.drawn;
}

// --- dropout_add_norm ---------------------------------------------------------

inline bool is_f32_param(const std::optional<at::Tensor>& t, at::ScalarType input) {
  return t.has_value() && t->scalar_type() == at::kFloat && input != at::kFloat;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_op(
    const Exec& exec, const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view norm, double eps, bool residual_in_fp32,
    const std::optional<double>& p_draw, const std::optional<at::Generator>& generator,
    at::OptionalIntArrayRef place, int64_t base = 0) {
  const Norm kind = check_norm_forward(input, residual, weight, bias, state, norm, eps, residual_in_fp32);
  const IndexMap map = norm_map(input.sizes(), place);
  check_draw(state, p_draw, generator, input.device());
  exec.check_p(state);
  [[maybe_unused]] const auto guard = exec.guard(input.device());
  const CallState cs = call_state(exec, input, state, p_draw, generator);
  at::Tensor y, h, mean, rstd;
  std::tie(y, h, mean, rstd) = norm_outputs(input, kind, residual_in_fp32);
  const int64_t rows = norm_rows(input);
  if (rows == 0) {
    exec.store_state(cs.ref);  // as in fused_dropout_op
    return {y, h, mean, rstd, cs.output(input)};
  }
  const Rows x = rows_of(input);
  const Rows r = residual.has_value() ? rows_of(*residual) : Rows{};
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  NormArgs a;
  a.dtype = kernel_dtype(input.scalar_type());
  a.h_dtype = kernel_dtype(h.scalar_type());
  a.param_f32 = is_f32_param(weight, input.scalar_type()) || is_f32_param(bias, input.scalar_type());
  a.rms = kind == Norm::kRms;
  a.rows = rows;
  a.H = input.size(-1);
  a.eps = eps;
  a.state = cs.ref;
  a.map = shard_map(map, base);
  a.x = x.t.const_data_ptr();
  a.x_rows = x.stride;
  a.residual = ptr_or_null(r.t);
  a.residual_rows = r.stride;
  a.weight = ptr_or_null(w);
  a.bias = ptr_or_null(b);
  a.y = y.data_ptr();
  a.h = h.data_ptr();
  a.mean = kind == Norm::kLayer ? mean.data_ptr() : nullptr;
  a.rstd = rstd.data_ptr();
  exec.norm_forward(a, exec.sm_count());
  return {y, h, mean, rstd, cs.output(input)};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_backward_op(
    const Exec& exec, const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& state, c10::string_view norm, std::array<bool, 4> output_mask,
    at::OptionalIntArrayRef place, int64_t base = 0) {
  const Norm kind = check_norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, output_mask);
  const IndexMap map = norm_map(grad.sizes(), place);
  exec.check_p(state);
  [[maybe_unused]] const auto guard = exec.guard(grad.device());
  at::Tensor gi, gr, gw, gb;
  std::tie(gi, gr, gw, gb) = norm_backward_outputs(grad, h, output_mask);
  if (grad.numel() == 0 || !(output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3])) {
    return {gi, gr, gw, gb};
  }
  const at::Tensor g = grad.contiguous();
  const at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  const at::Tensor hh = h.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor mu = mean.contiguous();
  const at::Tensor rs = rstd.contiguous();
  const CallState cs = call_state(exec, g, state, std::nullopt, std::nullopt);
  const int sms = exec.sm_count();
  NormArgs a;
  a.dtype = kernel_dtype(g.scalar_type());
  a.h_dtype = kernel_dtype(hh.scalar_type());
  a.param_f32 = is_f32_param(weight, g.scalar_type());
  a.rms = kind == Norm::kRms;
  a.rows = norm_rows(g);
  a.H = g.size(-1);
  a.state = cs.ref;
  a.map = shard_map(map, base);
  a.weight = ptr_or_null(w);
  a.grad = g.const_data_ptr();
  a.grad_h = ptr_or_null(gh);
  a.saved_h = hh.const_data_ptr();
  a.saved_mean = kind == Norm::kLayer ? mu.const_data_ptr() : nullptr;
  a.saved_rstd = rs.const_data_ptr();
  a.grad_input = output_mask[0] ? gi.data_ptr() : nullptr;
  a.grad_residual = output_mask[1] ? gr.data_ptr() : nullptr;
  // Per-block column sums in the statistics' dtype, one row per block.
  const int64_t blocks = plan_norm(a.dtype, a.h_dtype, a.rows, a.H, true, sms).blocks;
  at::Tensor partial_w, partial_b;
  if (output_mask[2]) {
    partial_w = at::empty({blocks, a.H}, gw.options());
    a.partial_w = partial_w.data_ptr();
    a.dweight = gw.data_ptr();
  }
  if (output_mask[3]) {
    partial_b = at::empty({blocks, a.H}, gb.options());
    a.partial_b = partial_b.data_ptr();
    a.dbias = gb.data_ptr();
  }
  exec.norm_backward(a, sms);
  return {gi, gr, gw, gb};
}

}  // namespace cuda
}  // namespace dropout_ext
