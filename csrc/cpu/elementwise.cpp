// The elementwise CPU ops: fused_dropout, its backward and dropout_mask,
// registered for the CPU dispatch key, and the test op cpu_mask_range. The
// kernels are in elementwise.h, built per ISA (elementwise_<isa>.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../op_common.h"
#include "elementwise.h"

namespace dropout_ext {
namespace cpu {
namespace {

// The keep mask of a shape at its elements' indices under map (a
// structured mask's small one, or dropout_mask's), materialised once.
at::Tensor keep_mask_cpu(const MaskParams& mp, const IndexMap& map, at::IntArrayRef shape) {
  at::Tensor m = at::empty(shape, at::TensorOptions().dtype(at::kBool));
  bool* out = m.data_ptr<bool>();
  at::parallel_for(0, m.numel(), kGrain, [&](int64_t b, int64_t e) { mask_fill(mp, map, out + b, b, e); });
  return m;
}

struct Layout {
  IndexMap map;  // of the elements, when the mask is full
  std::vector<int64_t> sizes;
  std::vector<int64_t> mstride;
  at::Tensor mask;  // defined for structured masks only
};

template <typename scalar_t>
void fill_common(KernelArgs<scalar_t>& a, Layout& lay, const at::Tensor& input, const MaskParams& mp,
                 const at::Tensor& bias, const at::Tensor& mask_bits) {
  using acc_t = at::opmath_type<scalar_t>;
  if (bias.defined()) a.bias = bias.const_data_ptr<scalar_t>();
  if (mask_bits.defined()) a.bits_in = mask_bits.const_data_ptr<uint8_t>();
  a.mp = mp;
  a.map = lay.map;
  a.scale = static_cast<acc_t>(mp.scale);
  a.H = input.dim() >= 1 ? std::max<int64_t>(input.size(-1), 1) : 1;
  if (lay.mask.defined()) {
    a.mask = lay.mask.const_data_ptr<bool>();
    a.ndim = input.dim();
    a.sizes = lay.sizes.data();
    a.mstride = lay.mstride.data();
  }
}

// A structured mask is drawn once at its own small shape and read through
// strides; no state means nothing is dropped, so no mask is drawn at all.
Layout make_layout(const at::Tensor& input, const MaskPlan& plan, const MaskParams& mp) {
  Layout lay;
  if (plan.full) {
    lay.map = plan.map;
  } else if (!mp.keep_all) {
    lay.sizes = input.sizes().vec();
    lay.mstride = mask_strides(input, plan.shape);
    lay.mask = keep_mask_cpu(mp, plan.map, plan.shape);
  }
  return lay;
}

// Threads take ranges of whole bytes of the packed mask, so no two write one byte.
template <typename F>
void parallel_bytes(int64_t n, const F& f) {
  at::parallel_for(0, mask_bits_size(n), kGrain / 8,
                   [&](int64_t b0, int64_t b1) { f(b0 * 8, std::min(b1 * 8, n)); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_dropout_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& given_state, c10::string_view activation, at::IntArrayRef mask_shape,
    const std::optional<at::Tensor>& mask_bits, bool pack_mask, std::optional<double> p,
    const std::optional<at::Generator>& generator, at::OptionalIntArrayRef place) {
  const Checked c = check_forward(input, bias, residual, given_state, activation, mask_shape, mask_bits, pack_mask,
                                  place);
  const Act act = c.act;
  check_draw(given_state, p, generator, input.device());
  at::Tensor drawn;
  const std::optional<at::Tensor> state = cpu_call_state(input, given_state, p, generator, drawn);
  at::Tensor bits = mask_bits_output(input, state, c.mask, pack_mask);
  const MaskParams mp = host_mask_params(state);
  Layout lay = make_layout(input, c.mask, mp);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return {like_input(input, out), bits, drawn};
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bits.has_value() ? mask_bits->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_dropout_cpu", [&] {
    KernelArgs<scalar_t> a;
    fill_common(a, lay, x, mp, b, mb);
    a.x = x.const_data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    if (r.defined()) a.res = r.const_data_ptr<scalar_t>();
    if (bits.numel() > 0) a.bits_out = bits.data_ptr<uint8_t>();
    dispatch_act(act, [&](auto act_c) {
      constexpr Act A = decltype(act_c)::value;
      parallel_bytes(n, [&](int64_t lo, int64_t hi) {
        if (a.bias != nullptr) {
          walk<scalar_t, A, true, false>(a, lo, hi, nullptr);
        } else {
          walk<scalar_t, A, false, false>(a, lo, hi, nullptr);
        }
      });
    });
  });
  return {like_input(input, out), bits, drawn};
}

std::tuple<at::Tensor, at::Tensor> fused_dropout_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad, const std::optional<at::Tensor>& mask_bits, at::OptionalIntArrayRef place) {
  const Checked c = check_backward(grad, input, bias, state, activation, mask_shape, bias_grad, mask_bits, place);
  const Act act = c.act;
  const MaskParams mp = host_mask_params(state);
  Layout lay = make_layout(grad, c.mask, mp);
  const at::Tensor g = grad.contiguous();
  const at::Tensor x = input.has_value() ? input->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bits.has_value() ? mask_bits->contiguous() : at::Tensor();
  at::Tensor dx, dbias;
  std::tie(dx, dbias) = backward_outputs(g, bias_grad);
  const int64_t n = g.numel();
  if (n == 0) return {like_input(grad, dx), dbias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fused_dropout_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    KernelArgs<scalar_t> a;
    fill_common(a, lay, g, mp, b, mb);
    a.g = g.const_data_ptr<scalar_t>();
    a.out = dx.data_ptr<scalar_t>();
    if (x.defined()) a.x = x.const_data_ptr<scalar_t>();
    dispatch_act(act, [&](auto act_c) {
      constexpr Act A = decltype(act_c)::value;
      auto run = [&](int64_t lo, int64_t hi, acc_t* part) {
        if (a.bias != nullptr && A != Act::kIdentity) {
          walk<scalar_t, A, true, true>(a, lo, hi, part);
        } else {
          walk<scalar_t, A, false, true>(a, lo, hi, part);
        }
      };
      if (!bias_grad) {
        parallel_bytes(n, [&](int64_t lo, int64_t hi) { run(lo, hi, nullptr); });
        return;
      }
      // Deterministic bias reduction: row blocks fixed by the shape alone,
      // partial sums per block, then one ordered pass over the blocks.
      const int64_t H = a.H;
      const int64_t rows = n / H;
      const int64_t rows_per_block = std::max<int64_t>(1, (rows + 255) / 256);
      const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
      std::vector<acc_t> partial(static_cast<size_t>(blocks * H), acc_t(0));
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * rows_per_block;
          const int64_t r1 = std::min(rows, r0 + rows_per_block);
          run(r0 * H, r1 * H, partial.data() + blk * H);
        }
      });
      scalar_t* db = dbias.data_ptr<scalar_t>();
      at::parallel_for(0, H, 1024, [&](int64_t h0, int64_t h1) {
        for (int64_t hh = h0; hh < h1; ++hh) {
          acc_t s = acc_t(0);
          for (int64_t blk = 0; blk < blocks; ++blk) s += partial[blk * H + hh];
          db[hh] = static_cast<scalar_t>(s);
        }
      });
    });
  });
  return {like_input(grad, dx), dbias};
}

at::Tensor dropout_mask_cpu(const at::Tensor& state, at::IntArrayRef shape, at::OptionalIntArrayRef place) {
  const IndexMap map = check_mask_args(state, shape, place);
  return keep_mask_cpu(host_mask_params(state), map, shape);
}

// Keep bits of logical elements [start, start + length) of an unbounded
// tensor: group numbers past 2**32 (and up to 2**61) that no real tensor
// reaches, and a start at any element of a group.
at::Tensor test_cpu_mask_range(const at::Tensor& state, int64_t start, int64_t length) {
  check_mask_args(state, {length}, std::nullopt);
  TORCH_CHECK_VALUE(start >= 0 && start <= std::numeric_limits<int64_t>::max() - length,
                    "cpu_mask_range: [start, start + length) must lie in [0, 2**63)");
  const MaskParams mp = host_mask_params(state);
  IndexMap map;
  map.base = start;
  return keep_mask_cpu(mp, map, {length});
}

at::Tensor draw_state_cpu(const at::Tensor& input, double p, const std::optional<at::Generator>& generator) {
  check_draw(std::nullopt, p, generator, input.device());
  at::Tensor drawn;
  cpu_call_state(input, std::nullopt, p, generator, drawn);
  return drawn;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(dropout_ext, CPU, m) {
  m.impl("fused_dropout", &cpu::fused_dropout_cpu);
  m.impl("fused_dropout_backward", &cpu::fused_dropout_backward_cpu);
  m.impl("dropout_mask", &cpu::dropout_mask_cpu);
  m.impl("draw_state", &cpu::draw_state_cpu);
}

// Test-only op (the namespace of csrc/cuda_host/driver.cpp's): keep bits
// anywhere in the 64-bit element space.
TORCH_LIBRARY_FRAGMENT(dropout_ext_testing, m) {
  m.def("cpu_mask_range(Tensor state, int start, int length) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CPU, m) {
  m.impl("cpu_mask_range", &cpu::test_cpu_mask_range);
}

}  // namespace dropout_ext
