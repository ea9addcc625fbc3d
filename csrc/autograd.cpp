// The one autograd of y = residual + dropout(act(x + bias)) and of
// dropout_add_norm, registered for the ops of every backend's family
// (csrc/ops.cpp).
//
// It is C++ because it runs on every call that records a graph: a Python
// autograd kernel costs more than the whole kernel on tensors of a few
// thousand elements. The forward saves the dropout state (the backward draws
// the mask again) or, in the packed mask mode, the forward's keep bits, and
// the input and bias only where the activation's derivative needs them.
// dropout_add_norm saves the state, h, the weight and the per-row mean and
// rstd: its backward reads h's row again instead of a normalised copy.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "op_common.h"

namespace dropout_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using OptGenerator = std::optional<at::Generator>;
using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&,
                                                                  const OptTensor&, const OptTensor&,
                                                                  c10::string_view, at::IntArrayRef, const OptTensor&,
                                                                  bool, std::optional<double>, const OptGenerator&);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, c10::string_view, at::IntArrayRef, bool,
                                                       const OptTensor&);

using NormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
    double, bool, std::optional<double>, const OptGenerator&);
using NormBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, c10::string_view, std::array<bool, 4>);

struct FamilyOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
  c10::TypedOperatorHandle<NormSig> norm;
  c10::TypedOperatorHandle<NormBackwardSig> norm_backward;
};

c10::OperatorHandle find_op(const char* prefix, const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("dropout_ext::") + prefix + name).c_str(), "");
}

// The op handles of family kOpPrefixes[F], looked up once.
template <int F>
const FamilyOps& family() {
  static const FamilyOps ops{find_op(kOpPrefixes[F], "fused_dropout").typed<ForwardSig>(),
                             find_op(kOpPrefixes[F], "fused_dropout_backward").typed<BackwardSig>(),
                             find_op(kOpPrefixes[F], "dropout_add_norm").typed<NormSig>(),
                             find_op(kOpPrefixes[F], "dropout_add_norm_backward").typed<NormBackwardSig>()};
  return ops;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <int F>
struct FusedDropoutFn : torch::autograd::Function<FusedDropoutFn<F>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& bias,
                               const OptTensor& residual, const OptTensor& state, c10::string_view activation,
                               at::IntArrayRef mask_shape, const OptTensor& mask_bits, bool pack_mask,
                               std::optional<double> p, const OptGenerator& generator) {
    at::Tensor out, bits, drawn;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, bits, drawn) = family<F>().forward.call(input, bias, residual, state, activation, mask_shape,
                                                            mask_bits, pack_mask, p, generator);
    }
    const bool smooth = activation != "identity";
    // The mask the backward reads: bits given to this call or packed by it,
    // else none (drawn again from the state). sym_numel: a traced call with
    // dynamic shapes has no concrete size.
    const at::Tensor saved_bits =
        mask_bits.has_value() ? *mask_bits : bits.sym_numel() != 0 ? bits : at::Tensor();
    // The state the backward draws the mask from: the one given, or the one the op drew.
    const at::Tensor saved_state = p.has_value() ? drawn : state.value_or(at::Tensor());
    ctx->save_for_backward({saved_state, smooth ? input : at::Tensor(),
                            smooth ? bias.value_or(at::Tensor()) : at::Tensor(), saved_bits});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["mask_shape"] = mask_shape.vec();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->mark_non_differentiable({bits, drawn});
    return {out, bits, drawn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor state = opt(saved[0]), input = opt(saved[1]), bias = opt(saved[2]), bits = opt(saved[3]);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::vector<int64_t> mask_shape = ctx->saved_data["mask_shape"].toIntVector();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor arguments only: an absent bias has no slot.
    const bool need_x = ctx->needs_input_grad(0), need_b = has_bias && ctx->needs_input_grad(1);
    const bool need_r = ctx->saved_data["has_residual"].toBool() && ctx->needs_input_grad(has_bias ? 2 : 1);
    const at::Tensor& grad = grads[0];
    at::Tensor gx, gb;
    if (activation == "identity" && !need_b) {
      // The backward of dropout is dropout with the same mask: the forward
      // op, through this autograd when a double backward records a graph.
      std::optional<at::AutoDispatchBelowADInplaceOrView> below;
      if (!at::GradMode::is_enabled()) below.emplace();
      if (need_x) {
        gx = std::get<0>(family<F>().forward.call(grad, {}, {}, state, "identity", mask_shape, bits, false,
                                                  std::nullopt, std::nullopt));
      }
    } else if (need_x || need_b) {
      std::tie(gx, gb) = family<F>().backward.call(grad, input, bias, state, activation, mask_shape, need_b, bits);
      if (!need_b) gb = at::Tensor();
    }
    const at::Tensor gr = need_r ? grad : at::Tensor();
    variable_list out(10);
    out[0] = gx;
    out[1] = gb;
    out[2] = gr;
    return out;
  }
};

// A call that records no graph skips the autograd node: nothing to save.
template <typename... Opt>
bool records_graph(const at::Tensor& input, const Opt&... others) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || ... || (others.has_value() && others->requires_grad()));
}

template <int F>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_dropout_autograd(
    const at::Tensor& input, const OptTensor& bias, const OptTensor& residual, const OptTensor& state,
    c10::string_view activation, at::IntArrayRef mask_shape, const OptTensor& mask_bits, bool pack_mask,
    std::optional<double> p, const OptGenerator& generator) {
  if (!records_graph(input, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return family<F>().forward.call(input, bias, residual, state, activation, mask_shape, mask_bits, pack_mask, p,
                                    generator);
  }
  const variable_list out = FusedDropoutFn<F>::apply(input, bias, residual, state, activation, mask_shape, mask_bits,
                                                     pack_mask, p, generator);
  return {out[0], out[1], out[2]};
}

// The smart pointer that owns autograd nodes: std::shared_ptr up to torch
// 2.12, c10::intrusive_ptr from 2.13 on. Read off Tensor::grad_fn() rather
// than a version number, so the build follows the headers it compiles with.
using NodePtr = std::decay_t<decltype(std::declval<const at::Tensor&>().grad_fn())>;

// A new node of type N, owned as the installed torch owns nodes. A template
// on N, so only the branch that matches NodePtr is instantiated.
template <typename N, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

// Gradients computed without recording a graph, as Python's
// once_differentiable: under create_graph=True they get a node, fed by the
// backward's inputs, that raises only if a double backward reaches it, so
// first-order gradients still work.
variable_list once_differentiable(variable_list grads, const variable_list& inputs, const char* what) {
  if (!at::GradMode::is_enabled()) return grads;
  const auto error = make_node<torch::autograd::Error>(
      std::string(what) + " has no double backward: its backward is not differentiable",
      torch::autograd::collect_next_edges(inputs));
  for (const auto& g : grads) {
    if (g.defined()) torch::autograd::set_history(g, error);
  }
  return grads;
}

// h = residual + dropout(input), y = norm(h) * weight + bias. y and h are
// differentiable (h is a pre-norm block's residual stream); mean and rstd are
// saved statistics. The backward is differentiable once.
template <int F>
struct DropoutAddNormFn : torch::autograd::Function<DropoutAddNormFn<F>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& state,
                               c10::string_view norm, double eps, bool residual_in_fp32, std::optional<double> p,
                               const OptGenerator& generator) {
    at::Tensor y, h, mean, rstd, drawn;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, h, mean, rstd, drawn) =
          family<F>().norm.call(input, residual, weight, bias, state, norm, eps, residual_in_fp32, p, generator);
    }
    const at::Tensor saved_state = p.has_value() ? drawn : state.value_or(at::Tensor());
    ctx->save_for_backward({saved_state, h, weight.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["norm"] = std::string(norm);
    ctx->saved_data["y_dtype"] = static_cast<int64_t>(y.scalar_type());
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->saved_data["has_weight"] = weight.has_value();
    // The bias is not saved (its gradient needs only grad); its dtype is.
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    ctx->mark_non_differentiable({mean, rstd, drawn});
    // An unused h (or y) gets no gradient tensor of zeros to read.
    ctx->set_materialize_grads(false);
    return {y, h, mean, rstd, drawn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor state = opt(saved[0]), weight = opt(saved[2]);
    const at::Tensor &h = saved[1], &mean = saved[3], &rstd = saved[4];
    const bool has_r = ctx->saved_data["has_residual"].toBool(), has_w = ctx->saved_data["has_weight"].toBool();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_b = bias_dtype >= 0;
    // needs_input_grad counts tensor arguments only: absent optionals have no slot.
    int64_t slot = 0;
    const bool need_x = ctx->needs_input_grad(slot++);
    const bool need_r = has_r && ctx->needs_input_grad(slot++);
    const bool need_w = has_w && ctx->needs_input_grad(slot++);
    const bool need_b = has_b && ctx->needs_input_grad(slot++);
    const variable_list none(10);
    if (!(need_x || need_r || need_w || need_b) || (!grads[0].defined() && !grads[1].defined())) return none;
    // Only h was used: y's gradient is zero.
    const at::Tensor grad = grads[0].defined()
                                ? grads[0]
                                : at::zeros(h.sizes(), h.options().dtype(static_cast<at::ScalarType>(
                                                           ctx->saved_data["y_dtype"].toInt())));
    at::Tensor gx, gr, gw, gb;
    variable_list out = none;
    {
      at::AutoGradMode no_grad(false);
      std::tie(gx, gr, gw, gb) = family<F>().norm_backward.call(grad, opt(grads[1]), h, weight, mean, rstd, state,
                                                                 ctx->saved_data["norm"].toStringRef(),
                                                                 {need_x, need_r, need_w, need_b});
      // The parameter gradients come in the statistics' dtype.
      if (need_x) out[0] = gx;
      if (need_r) out[1] = gr;
      if (need_w) out[2] = gw.to(weight->scalar_type());
      if (need_b) out[3] = gb.to(static_cast<at::ScalarType>(bias_dtype));
    }
    return once_differentiable(std::move(out), {grads[0], grads[1], h, saved[2]}, "dropout_add_norm");
  }
};

template <int F>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_autograd(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& state, c10::string_view norm, double eps, bool residual_in_fp32, std::optional<double> p,
    const OptGenerator& generator) {
  if (!records_graph(input, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return family<F>().norm.call(input, residual, weight, bias, state, norm, eps, residual_in_fp32, p, generator);
  }
  const variable_list out =
      DropoutAddNormFn<F>::apply(input, residual, weight, bias, state, norm, eps, residual_in_fp32, p, generator);
  return {out[0], out[1], out[2], out[3], out[4]};
}

template <int F>
void register_family(torch::Library& m) {
  const std::string prefix(kOpPrefixes[F]);
  m.impl((prefix + "fused_dropout").c_str(), TORCH_FN(fused_dropout_autograd<F>));
  m.impl((prefix + "dropout_add_norm").c_str(), TORCH_FN(dropout_add_norm_autograd<F>));
}

}  // namespace

TORCH_LIBRARY_IMPL(dropout_ext, Autograd, m) {
  static_assert(sizeof(kOpPrefixes) / sizeof(kOpPrefixes[0]) == 4, "one registration per op family");
  register_family<0>(m);
  register_family<1>(m);
  register_family<2>(m);
  register_family<3>(m);
}

}  // namespace dropout_ext
