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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "op_common.h"

namespace dropout_ext {
namespace {

using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using OptGenerator = std::optional<at::Generator>;
using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&,
                                                                  const OptTensor&, const OptTensor&,
                                                                  c10::string_view, at::IntArrayRef, const OptTensor&,
                                                                  bool, std::optional<double>, const OptGenerator&,
                                                                  at::OptionalIntArrayRef);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, c10::string_view, at::IntArrayRef, bool,
                                                       const OptTensor&, at::OptionalIntArrayRef);

using NormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
    double, bool, std::optional<double>, const OptGenerator&, at::OptionalIntArrayRef);
using NormBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, c10::string_view, std::array<bool, 4>, at::OptionalIntArrayRef);

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

// A saved place (the forward's, copied: the backward outlives its argument).
using SavedPlace = std::optional<std::vector<int64_t>>;
at::OptionalIntArrayRef place_ref(const SavedPlace& place) {
  return place.has_value() ? at::OptionalIntArrayRef(*place) : std::nullopt;
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

// A call that records no graph skips the autograd node: nothing to save.
template <typename... Opt>
bool records_graph(const at::Tensor& input, const Opt&... others) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || ... || (others.has_value() && others->requires_grad()));
}

// A tensor saved for the backward; an absent optional saves an undefined one.
torch::autograd::SavedVariable saved(const OptTensor& t) {
  return torch::autograd::SavedVariable(t.value_or(at::Tensor()), /*is_output=*/false);
}

// The backward of fused_dropout, a Node rather than a
// torch::autograd::Function: the Function's saved_data map, output wrapping
// and per-call checks cost more host time than the whole CPU kernel at a few
// hundred elements. Its edges are (input, bias, residual), an absent one
// empty, so task_should_compute_output names each gradient.
template <int F>
struct FusedDropoutBackward : torch::autograd::Node {
  torch::autograd::SavedVariable state, input, bias, bits;
  std::string activation;
  std::vector<int64_t> mask_shape;
  SavedPlace place;  // the mask is the global tensor's

  std::string name() const override { return "FusedDropoutBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    state.reset_data();
    input.reset_data();
    bias.reset_data();
    bits.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool need_x = task_should_compute_output(0), need_b = task_should_compute_output(1);
    const at::Tensor& grad = grads[0];
    // An undefined gradient stands for zeros (the engine's convention): so are all three.
    if (!grad.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const OptTensor s = opt(state.unpack()), k = opt(bits.unpack());
    at::Tensor gx, gb;
    if (activation == "identity" && !need_b) {
      // The backward of dropout is dropout with the same mask: the forward
      // op, through the autograd kernel when a double backward records a graph.
      std::optional<at::AutoDispatchBelowADInplaceOrView> below;
      if (!at::GradMode::is_enabled()) below.emplace();
      if (need_x) {
        gx = std::get<0>(family<F>().forward.call(grad, {}, {}, s, "identity", mask_shape, k, false, std::nullopt,
                                                  std::nullopt, place_ref(place)));
      }
    } else if (need_x || need_b) {
      std::tie(gx, gb) = family<F>().backward.call(grad, opt(input.unpack()), opt(bias.unpack()), s, activation,
                                                   mask_shape, need_b, k, place_ref(place));
      if (!need_b) gb = at::Tensor();
    }
    return {gx, gb, task_should_compute_output(2) ? grad : at::Tensor()};
  }
};

template <int F>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_dropout_autograd(
    const at::Tensor& input, const OptTensor& bias, const OptTensor& residual, const OptTensor& state,
    c10::string_view activation, at::IntArrayRef mask_shape, const OptTensor& mask_bits, bool pack_mask,
    std::optional<double> p, const OptGenerator& generator, at::OptionalIntArrayRef place) {
  at::Tensor out, bits, drawn;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(out, bits, drawn) = family<F>().forward.call(input, bias, residual, state, activation, mask_shape,
                                                          mask_bits, pack_mask, p, generator, place);
  }
  if (!records_graph(input, bias, residual)) return {out, bits, drawn};
  const NodePtr node = make_node<FusedDropoutBackward<F>>();
  auto& n = static_cast<FusedDropoutBackward<F>&>(*node);
  node->set_next_edges(torch::autograd::collect_next_edges(input, bias, residual));
  // The state the backward draws the mask from: the one given, or the one
  // the op drew. The mask it reads instead: bits given to this call or
  // packed by it (sym_numel: a traced call with dynamic shapes has no
  // concrete size). The input and bias only where the activation's
  // derivative reads them.
  n.state = saved(p.has_value() ? OptTensor(drawn) : state);
  n.bits = saved(mask_bits.has_value() ? mask_bits : bits.sym_numel() != 0 ? OptTensor(bits) : std::nullopt);
  if (activation != "identity") {
    n.input = saved(input);
    n.bias = saved(bias);
  }
  n.activation = std::string(activation);
  n.mask_shape = mask_shape.vec();
  if (place.has_value()) n.place = place->vec();
  torch::autograd::set_history(out, node);
  return {out, bits, drawn};
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
// saved statistics. The backward is differentiable once. A Node as
// FusedDropoutBackward is; its edges are (input, residual, weight, bias),
// an absent one empty.
template <int F>
struct DropoutAddNormBackward : torch::autograd::Node {
  torch::autograd::SavedVariable state, h, weight, mean, rstd;
  std::string norm;
  SavedPlace place;
  at::ScalarType y_dtype = at::kFloat;
  // The bias is not saved (its gradient needs only grad); its dtype is.
  at::ScalarType bias_dtype = at::kFloat;

  std::string name() const override { return "DropoutAddNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    state.reset_data();
    h.reset_data();
    weight.reset_data();
    mean.reset_data();
    rstd.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::array<bool, 4> need{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2), task_should_compute_output(3)};
    variable_list out(4);
    // An unused y and h get undefined gradients (zeros), not tensors of zeros to read.
    if (!(need[0] || need[1] || need[2] || need[3]) || (!grads[0].defined() && !grads[1].defined())) return out;
    const at::Tensor hv = h.unpack(getptr()), w = weight.unpack();
    // Only h was used: y's gradient is zero.
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros(hv.sizes(), hv.options().dtype(y_dtype));
    {
      at::AutoGradMode no_grad(false);
      at::Tensor gx, gr, gw, gb;
      std::tie(gx, gr, gw, gb) = family<F>().norm_backward.call(grad, opt(grads[1]), hv, opt(w), mean.unpack(),
                                                                 rstd.unpack(), opt(state.unpack()), norm, need,
                                                                 place_ref(place));
      // The parameter gradients come in the statistics' dtype.
      if (need[0]) out[0] = gx;
      if (need[1]) out[1] = gr;
      if (need[2]) out[2] = gw.to(w.scalar_type());
      if (need[3]) out[3] = gb.to(bias_dtype);
    }
    return once_differentiable(std::move(out), {grads[0], grads[1], hv, w}, "dropout_add_norm");
  }
};

template <int F>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_autograd(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& state, c10::string_view norm, double eps, bool residual_in_fp32, std::optional<double> p,
    const OptGenerator& generator, at::OptionalIntArrayRef place) {
  at::Tensor y, h, mean, rstd, drawn;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, h, mean, rstd, drawn) =
        family<F>().norm.call(input, residual, weight, bias, state, norm, eps, residual_in_fp32, p, generator,
                              place);
  }
  if (!records_graph(input, residual, weight, bias)) return {y, h, mean, rstd, drawn};
  const NodePtr node = make_node<DropoutAddNormBackward<F>>();
  auto& n = static_cast<DropoutAddNormBackward<F>&>(*node);
  node->set_next_edges(torch::autograd::collect_next_edges(input, residual, weight, bias));
  torch::autograd::set_history(y, node);
  torch::autograd::set_history(h, node);
  n.state = saved(p.has_value() ? OptTensor(drawn) : state);
  // h is this node's output: saved as one, so it holds no reference back to the node.
  n.h = torch::autograd::SavedVariable(h, /*is_output=*/true);
  n.weight = saved(weight);
  n.mean = saved(mean);
  n.rstd = saved(rstd);
  n.norm = std::string(norm);
  if (place.has_value()) n.place = place->vec();
  n.y_dtype = y.scalar_type();
  if (bias.has_value()) n.bias_dtype = bias->scalar_type();
  return {y, h, mean, rstd, drawn};
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
