// The dropout_add_norm CPU ops, forward and backward, registered for the
// CPU dispatch key. The kernels are in norm.h, built per ISA
// (norm_<isa>.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../op_common.h"
#include "norm.h"

namespace dropout_ext {
namespace cpu {
namespace {

template <typename T>
struct TypeTag {
  using type = T;
};

// h's element type: x's, or float for a float16/bfloat16 x with residual_in_fp32.
template <typename scalar_t, typename F>
void dispatch_h(at::ScalarType h_dtype, const F& f) {
  if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
    if (h_dtype == at::kFloat) return f(TypeTag<float>{});
  }
  f(TypeTag<scalar_t>{});
}

// weight or bias in the statistics' dtype, or `fill` where absent.
at::Tensor norm_param_as(const std::optional<at::Tensor>& t, int64_t H, at::ScalarType stat, double fill) {
  if (t.has_value()) return t->to(stat).contiguous();
  return at::full({H}, fill, at::TensorOptions().dtype(stat));
}

// The arguments both directions share: the row length, the mask and the
// weight (in the statistics' dtype).
template <typename scalar_t, typename h_t>
NormArgs<scalar_t, h_t> norm_args(int64_t H, const MaskParams& mp, const IndexMap& map, Norm kind,
                                  const at::Tensor& w) {
  using acc_t = at::opmath_type<scalar_t>;
  NormArgs<scalar_t, h_t> a;
  a.H = H;
  a.mp = mp;
  a.map = map;
  a.scale = static_cast<acc_t>(mp.scale);
  a.layer = kind == Norm::kLayer;
  a.w = w.const_data_ptr<acc_t>();
  return a;
}

// Rows per task of at::parallel_for: enough elements to be worth a thread.
int64_t norm_row_grain(int64_t H) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(H, 1)); }

// The weight and bias gradients sum over row blocks fixed by the shape
// alone (not by the thread count), one partial row per block, then add the
// blocks in order: the same bits for any number of threads. The partials
// are bounded to about 2**21 per gradient unless that leaves fewer than 8
// blocks to share out. Returns the rows per block.
int64_t norm_param_block_rows(int64_t rows, int64_t H) {
  const int64_t cap = std::min<int64_t>(256, std::max<int64_t>(8, (int64_t{1} << 21) / std::max<int64_t>(H, 1)));
  return std::max<int64_t>(1, (rows + cap - 1) / cap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& given_state, c10::string_view norm,
    double eps, bool residual_in_fp32, std::optional<double> p, const std::optional<at::Generator>& generator,
    at::OptionalIntArrayRef place) {
  const Norm kind = check_norm_forward(input, residual, weight, bias, given_state, norm, eps, residual_in_fp32);
  const IndexMap map = norm_map(input.sizes(), place);
  check_draw(given_state, p, generator, input.device());
  at::Tensor drawn;
  const MaskParams mp = host_mask_params(cpu_call_state(input, given_state, p, generator, drawn));
  at::Tensor y, h, mean, rstd;
  std::tie(y, h, mean, rstd) = norm_outputs(input, kind, residual_in_fp32);
  const int64_t rows = norm_rows(input);
  const int64_t H = input.size(-1);
  if (rows == 0) return {y, h, mean, rstd, drawn};
  const at::Tensor x = input.contiguous();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::ScalarType stat = rstd.scalar_type();
  const at::Tensor w = norm_param_as(weight, H, stat, 1.0);
  const at::Tensor b = norm_param_as(bias, H, stat, -0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_h<scalar_t>(h.scalar_type(), [&](auto tag) {
      using h_t = typename decltype(tag)::type;
      NormArgs<scalar_t, h_t> a = norm_args<scalar_t, h_t>(H, mp, map, kind, w);
      a.b = b.const_data_ptr<acc_t>();
      a.eps = static_cast<acc_t>(eps);
      a.x = x.const_data_ptr<scalar_t>();
      if (r.defined()) a.res = r.const_data_ptr<h_t>();
      a.h_out = h.data_ptr<h_t>();
      a.y = y.data_ptr<scalar_t>();
      if (a.layer) a.mean_out = mean.data_ptr<acc_t>();
      a.rstd_out = rstd.data_ptr<acc_t>();
      at::parallel_for(0, rows, norm_row_grain(H), [&](int64_t r0, int64_t r1) {
        if (a.res != nullptr) {
          norm_forward<scalar_t, h_t, true>(a, r0, r1);
        } else {
          norm_forward<scalar_t, h_t, false>(a, r0, r1);
        }
      });
    });
  });
  return {y, h, mean, rstd, drawn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& state, c10::string_view norm, std::array<bool, 4> output_mask,
    at::OptionalIntArrayRef place) {
  const Norm kind = check_norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, output_mask);
  const IndexMap map = norm_map(grad.sizes(), place);
  const MaskParams mp = host_mask_params(state);
  at::Tensor dx, dres, dw, db;
  std::tie(dx, dres, dw, db) = norm_backward_outputs(grad, h, output_mask);
  if (grad.numel() == 0) return {dx, dres, dw, db};
  const int64_t rows = norm_rows(grad);
  const int64_t H = grad.size(-1);
  const at::Tensor g = grad.contiguous();
  const at::Tensor hc = h.contiguous();
  const at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor rc = rstd.contiguous();
  const at::ScalarType stat = rstd.scalar_type();
  const at::Tensor w = norm_param_as(weight, H, stat, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dropout_add_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_h<scalar_t>(hc.scalar_type(), [&](auto tag) {
      using h_t = typename decltype(tag)::type;
      NormArgs<scalar_t, h_t> a = norm_args<scalar_t, h_t>(H, mp, map, kind, w);
      a.g = g.const_data_ptr<scalar_t>();
      if (gh.defined()) a.gh = gh.const_data_ptr<h_t>();
      a.h = hc.const_data_ptr<h_t>();
      if (a.layer) a.mean = mc.const_data_ptr<acc_t>();
      a.rstd = rc.const_data_ptr<acc_t>();
      if (output_mask[0]) a.dx = dx.data_ptr<scalar_t>();
      if (output_mask[1]) a.dres = dres.data_ptr<h_t>();
      auto run = [&](int64_t r0, int64_t r1, acc_t* pw, acc_t* pb) {
        if (a.gh != nullptr) {
          norm_backward<scalar_t, h_t, true>(a, r0, r1, pw, pb);
        } else {
          norm_backward<scalar_t, h_t, false>(a, r0, r1, pw, pb);
        }
      };
      const bool want_w = output_mask[2], want_b = output_mask[3];
      if (!want_w && !want_b) {
        at::parallel_for(0, rows, norm_row_grain(H), [&](int64_t r0, int64_t r1) { run(r0, r1, nullptr, nullptr); });
        return;
      }
      const int64_t per_block = norm_param_block_rows(rows, H);
      const int64_t blocks = (rows + per_block - 1) / per_block;
      const int64_t nparts = int64_t{want_w} + int64_t{want_b};
      at::Tensor partial = at::empty({nparts, blocks, H}, rstd.options());
      acc_t* pw_all = want_w ? partial.data_ptr<acc_t>() : nullptr;
      acc_t* pb_all = want_b ? partial.data_ptr<acc_t>() + (want_w ? blocks * H : 0) : nullptr;
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          acc_t* pw = pw_all != nullptr ? pw_all + blk * H : nullptr;
          acc_t* pb = pb_all != nullptr ? pb_all + blk * H : nullptr;
          if (pw != nullptr) std::fill(pw, pw + H, acc_t(0));
          if (pb != nullptr) std::fill(pb, pb + H, acc_t(0));
          run(blk * per_block, std::min(rows, (blk + 1) * per_block), pw, pb);
        }
      });
      // The blocks in order, column by column.
      auto reduce = [&](const acc_t* parts, at::Tensor& out) {
        acc_t* o = out.data_ptr<acc_t>();
        at::parallel_for(0, H, 2048, [&](int64_t c0, int64_t c1) {
          std::fill(o + c0, o + c1, acc_t(0));
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const acc_t* p = parts + blk * H;
            for (int64_t c = c0; c < c1; ++c) o[c] += p[c];
          }
        });
      };
      if (want_w) reduce(pw_all, dw);
      if (want_b) reduce(pb_all, db);
    });
  });
  return {dx, dres, dw, db};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dropout_ext, CPU, m) {
  m.impl("dropout_add_norm", &cpu::dropout_add_norm_cpu);
  m.impl("dropout_add_norm_backward", &cpu::dropout_add_norm_backward_cpu);
}

}  // namespace dropout_ext
