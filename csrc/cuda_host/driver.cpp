// The CUDA kernels executed on the host: the CUDA backend's interpreter, as
// TRITON_INTERPRET=1 is Triton's.
//
// The ops cuda_host_fused_dropout, cuda_host_fused_dropout_backward,
// cuda_host_dropout_mask and cuda_host_dropout_add_norm(_backward) (CPU
// dispatch key, schemas in csrc/ops.cpp)
// run the op bodies of csrc/cuda/ops_impl.h, which the CUDA glue runs too,
// and launch the kernels of csrc/cuda/kernel_body.h and norm_body.h, which
// nvcc compiles into the __global__ kernels: the same source lines, on CPU
// tensors, each launch planned for an H100's SM count and run block by
// block and thread by thread (host_runner.h). So the conformance suite can
// check the CUDA kernels bit for bit against the reference on a machine
// without a GPU, including the bias gradient's summation order.
//
// Built by g++ into every build of the extension: no CUDA header is needed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <optional>
#include <tuple>
#include <vector>

#include "../cuda/ops_impl.h"
#include "host_runner.h"

namespace dropout_ext {
namespace cuda {
namespace {

struct NoGuard {};

struct HostExec {
  int sms = kHostSmCount;
  // The state is host memory here, so p is checked as the CPU ops check it;
  // the test entry points leave it to the kernels, as on a GPU.
  bool host_checks_p = true;
  NoGuard guard(const at::Device&) const { return {}; }
  void check_p(const std::optional<at::Tensor>& state) const {
    if (host_checks_p) host_mask_params(state);
  }
  int sm_count() const { return sms; }
  StateRef draw(const at::Tensor&, double p, const std::optional<at::Generator>& generator, int64_t* out) const {
    const std::array<int64_t, 2> w = cpu_drawn_words(generator);
    return drawn_by_value(w[0], w[1], p, out);
  }
  void store_state(const StateRef& s) const {
    HostRunner r;
    run_store_state(r, s);
  }
  void forward(const DropoutArgs& a, int s) const {
    HostRunner r;
    run_forward(r, a, s);
  }
  void backward(const DropoutArgs& a, int s) const {
    HostRunner r;
    run_backward(r, a, s);
  }
  void mask(const MaskArgs& a, int s) const {
    HostRunner r;
    run_mask(r, a, s);
  }
  void norm_forward(const NormArgs& a, int s) const {
    HostRunner r;
    run_norm_forward(r, a, s);
  }
  void norm_backward(const NormArgs& a, int s) const {
    HostRunner r;
    run_norm_backward(r, a, s);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_host_fused_dropout(
    const at::Tensor& input, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    const std::optional<at::Tensor>& mask_bits, bool pack_mask, std::optional<double> p,
    const std::optional<at::Generator>& generator, at::OptionalIntArrayRef place) {
  return fused_dropout_op(HostExec{}, input, bias, residual, state, activation, mask_shape, mask_bits, pack_mask, p,
                          generator, place);
}

std::tuple<at::Tensor, at::Tensor> cuda_host_fused_dropout_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad, const std::optional<at::Tensor>& mask_bits, at::OptionalIntArrayRef place) {
  return fused_dropout_backward_op(HostExec{}, grad, input, bias, state, activation, mask_shape, bias_grad,
                                   mask_bits, place);
}

at::Tensor cuda_host_dropout_mask(const at::Tensor& state, at::IntArrayRef shape,
                                 at::OptionalIntArrayRef place) {
  return dropout_mask_op(HostExec{}, state, shape, place);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_host_dropout_add_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state, c10::string_view norm, double eps,
    bool residual_in_fp32, std::optional<double> p, const std::optional<at::Generator>& generator,
    at::OptionalIntArrayRef place) {
  return dropout_add_norm_op(HostExec{}, input, residual, weight, bias, state, norm, eps, residual_in_fp32, p,
                             generator, place);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_host_dropout_add_norm_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& state, c10::string_view norm, std::array<bool, 4> output_mask,
    at::OptionalIntArrayRef place) {
  return dropout_add_norm_backward_op(HostExec{}, grad, grad_h, h, weight, mean, rstd, state, norm, output_mask,
                                      place);
}

// --- test entry points ---------------------------------------------------------
// The same ops with the launch's SM count and a shift of the global index
// of every element (base) as arguments: tests run small grids (several
// units per thread) and index arithmetic past 2**31 and 2**32 without
// allocating such tensors; place is the ops' own. Like the GPU's, they
// leave p unread on the host, so the kernels' sanitising of a p outside
// [0, 1] is what runs. mask_bits and pack_mask are the ops' own: the packed
// mask counts from element 0, whatever base and place are.

HostExec test_exec(int64_t sm_count) {
  TORCH_CHECK_VALUE(sm_count >= 1 && sm_count <= 1024, "sm_count must be in [1, 1024], got ", sm_count);
  return HostExec{static_cast<int>(sm_count), false};
}

void check_base(int64_t base, int64_t n, bool structured) {
  TORCH_CHECK_VALUE(base >= 0 && base % 16 == 0 && base <= (int64_t{1} << 62) - n,
                    "base must be a non-negative multiple of 16 below 2**62 - numel, got ", base);
  TORCH_CHECK_VALUE(base == 0 || !structured, "base applies to per-element masks only");
}

bool is_structured(const at::Tensor& t, at::IntArrayRef mask_shape, at::OptionalIntArrayRef place) {
  return !mask_plan(t, mask_shape, place).full;
}

std::tuple<at::Tensor, at::Tensor> test_fused_dropout(
    const at::Tensor& input, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape, int64_t base,
    int64_t sm_count, const std::optional<at::Tensor>& mask_bits, bool pack_mask, at::OptionalIntArrayRef place) {
  check_base(base, input.numel(), is_structured(input, mask_shape, place));
  at::Tensor y, bits, drawn;
  std::tie(y, bits, drawn) = fused_dropout_op(test_exec(sm_count), input, bias, residual, state, activation,
                                              mask_shape, mask_bits, pack_mask, std::nullopt, std::nullopt, place,
                                              base);
  return {y, bits};
}

std::tuple<at::Tensor, at::Tensor> test_fused_dropout_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad, int64_t base, int64_t sm_count, const std::optional<at::Tensor>& mask_bits,
    at::OptionalIntArrayRef place) {
  check_base(base, grad.numel(), is_structured(grad, mask_shape, place));
  return fused_dropout_backward_op(test_exec(sm_count), grad, input, bias, state, activation, mask_shape, bias_grad,
                                   mask_bits, place, base);
}

at::Tensor test_dropout_mask(const at::Tensor& state, at::IntArrayRef shape, int64_t base, int64_t sm_count,
                             at::OptionalIntArrayRef place) {
  check_base(base, c10::multiply_integers(shape), false);
  return dropout_mask_op(test_exec(sm_count), state, shape, place, base);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> test_dropout_add_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state, c10::string_view norm, double eps,
    bool residual_in_fp32, int64_t base, int64_t sm_count, at::OptionalIntArrayRef place) {
  check_base(base, input.numel(), false);
  at::Tensor y, h, mean, rstd, drawn;
  std::tie(y, h, mean, rstd, drawn) = dropout_add_norm_op(test_exec(sm_count), input, residual, weight, bias, state,
                                                          norm, eps, residual_in_fp32, std::nullopt, std::nullopt,
                                                          place, base);
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> test_dropout_add_norm_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& state, c10::string_view norm, std::array<bool, 4> output_mask, int64_t base,
    int64_t sm_count, at::OptionalIntArrayRef place) {
  check_base(base, grad.numel(), false);
  return dropout_add_norm_backward_op(test_exec(sm_count), grad, grad_h, h, weight, mean, rstd, state, norm,
                                      output_mask, place, base);
}

// [col_units, row_lanes, rows_per_block, row_blocks, grid.x, grid.y] of the
// bias-gradient launch.
std::vector<int64_t> test_bias_grad_plan(int64_t rows, int64_t H, at::ScalarType dtype, c10::string_view activation,
                                         int64_t sm_count) {
  const BiasGradPlan g = plan_bias_grad(rows, H, kernel_dtype(dtype), parse_activation(activation),
                                        test_exec(sm_count).sms);
  return {g.col_units, g.row_lanes, g.rows_per_block, g.row_blocks, g.grid.x, g.grid.y};
}

// [grid.x, grid.y, blocks per SM] of each launch of op ("forward",
// "backward" or "mask"; "forward_packed" and "backward_read" in the packed
// mask mode; "norm_forward" and "norm_backward", with bias_grad meaning the
// weight and bias gradients) on n elements whose last dimension is H, as the launchers plan
// it and checked against the launch limits, with nothing allocated or run:
// the grids of shapes too large to allocate.
std::vector<int64_t> test_launch_plan(c10::string_view op, int64_t n, int64_t H, at::ScalarType dtype,
                                      c10::string_view activation, bool bias_grad, int64_t sm_count) {
  TORCH_CHECK_VALUE(n >= 1 && H >= 1 && n % H == 0, "n must be a positive multiple of H >= 1");
  const int sms = test_exec(sm_count).sms;
  std::vector<int64_t> plan;
  HostRunner r{&plan};
  if (op == "mask") {
    MaskArgs m;
    m.n = n;
    run_mask(r, m, sms);
    return plan;
  }
  if (op == "norm_forward" || op == "norm_backward") {
    // bias_grad: the weight and bias gradients' reductions too.
    NormArgs na;
    na.dtype = kernel_dtype(dtype);
    na.h_dtype = na.dtype;
    na.rows = n / H;
    na.H = H;
    if (op == "norm_forward") {
      run_norm_forward(r, na, sms);
    } else {
      static uint8_t placeholder_sum;
      if (bias_grad) na.dweight = na.dbias = &placeholder_sum;
      run_norm_backward(r, na, sms);
    }
    return plan;
  }
  DropoutArgs a;
  a.dtype = kernel_dtype(dtype);
  a.act = static_cast<int>(parse_activation(activation));
  a.n = n;
  a.H = make_fast_div(static_cast<uint64_t>(H));
  // Pointers that select launches (the bias gradient's, the packed mask
  // mode's); never read or written, as nothing runs.
  static uint8_t placeholder;
  if (op == "forward" || op == "forward_packed") {
    if (op == "forward_packed") a.bits_out = &placeholder;
    run_forward(r, a, sms);
  } else {
    TORCH_CHECK_VALUE(op == "backward" || op == "backward_read",
                      "op must be 'forward', 'forward_packed', 'backward', 'backward_read', 'mask', "
                      "'norm_forward' or 'norm_backward'");
    if (bias_grad) a.partial = a.dbias = &placeholder;
    if (op == "backward_read") a.bits_in = &placeholder;
    run_backward(r, a, sms);
  }
  return plan;
}

// Each launch of op on a contiguous tensor of `shape`, planned for sm_count
// SMs with the cost each kernel states (LaunchFacts), nothing allocated or
// run: tools/gpu_model.py's view of the CUDA backend. op as for
// test_launch_plan; parts names what the call has: "bias", "residual",
// "bias_grad", "structured" (a channel mask, shape's last two dimensions
// broadcast, drawn by its own launch first), and for the norm "weight",
// "norm_bias", "grad_h", "h_f32" (a float32 h), "rms", "grad_input",
// "grad_residual". Returns the kernels' names and, per launch, grid.x,
// grid.y, blocks per SM, static shared bytes, then the facts' six fields.
std::tuple<std::vector<std::string>, std::vector<int64_t>> test_launch_facts(
    c10::string_view op, at::IntArrayRef shape, at::ScalarType dtype, c10::string_view activation,
    std::vector<c10::string_view> parts, int64_t sm_count) {
  auto has = [&](const char* w) { return std::find(parts.begin(), parts.end(), c10::string_view(w)) != parts.end(); };
  int64_t n = 1;
  for (const int64_t s : shape) n *= s;
  TORCH_CHECK_VALUE(!shape.empty() && n >= 1, "shape must have at least one dimension and one element");
  const int64_t H = shape.back();
  const int sms = test_exec(sm_count).sms;
  std::vector<PlannedLaunch> planned;
  HostRunner r;
  r.planned = &planned;
  // Stand-ins for the tensors a call has: 16-byte aligned, never read or
  // written, as nothing runs.
  alignas(16) static uint8_t stand_in[16];
  void* const present = stand_in;
  StateRef state;
  state.kind = StateRef::kValue;
  state.value[2] = p_to_bits(0.1);
  if (op == "mask") {
    MaskArgs m;
    m.out = static_cast<bool*>(present);
    m.n = n;
    m.state = state;
    run_mask(r, m, sms);
  } else if (op == "norm_forward" || op == "norm_backward") {
    NormArgs a;
    a.dtype = kernel_dtype(dtype);
    a.h_dtype = has("h_f32") ? DType::kFloat : a.dtype;
    a.rms = has("rms");
    a.rows = n / H;
    a.H = H;
    a.state = state;
    a.weight = has("weight") ? present : nullptr;
    if (op == "norm_forward") {
      a.x = a.y = a.h = a.rstd = present;
      a.mean = a.rms ? nullptr : present;
      a.residual = has("residual") ? present : nullptr;
      a.bias = has("norm_bias") ? present : nullptr;
      run_norm_forward(r, a, sms);
    } else {
      a.grad = a.saved_h = a.saved_rstd = present;
      a.saved_mean = a.rms ? nullptr : present;
      a.grad_h = has("grad_h") ? present : nullptr;
      a.grad_input = has("grad_input") ? present : nullptr;
      a.grad_residual = has("grad_residual") ? present : nullptr;
      if (has("weight")) a.partial_w = a.dweight = present;
      if (has("norm_bias")) a.partial_b = a.dbias = present;
      run_norm_backward(r, a, sms);
    }
  } else {
    DropoutArgs a;
    a.dtype = kernel_dtype(dtype);
    a.act = static_cast<int>(parse_activation(activation));
    a.n = n;
    a.H = make_fast_div(static_cast<uint64_t>(H));
    a.state = state;
    a.x = a.out = present;
    a.bias = has("bias") ? present : nullptr;
    if (has("structured")) {
      TORCH_CHECK_VALUE(shape.size() >= 3, "a channel mask needs at least 3 dimensions");
      std::vector<int64_t> mshape(shape.begin(), shape.end());
      mshape[mshape.size() - 1] = mshape[mshape.size() - 2] = 1;
      a.mask = collapse_mask(at::empty(shape, at::TensorOptions().device(at::kMeta)), mshape);
      a.mask.keep = static_cast<const bool*>(present);
      MaskArgs m;
      m.out = static_cast<bool*>(present);
      m.n = n / (H * shape[shape.size() - 2]);
      m.state = state;
      run_mask(r, m, sms);
    }
    if (op == "forward" || op == "forward_packed") {
      a.residual = has("residual") ? present : nullptr;
      if (op == "forward_packed") a.bits_out = static_cast<uint8_t*>(present);
      run_forward(r, a, sms);
    } else {
      TORCH_CHECK_VALUE(op == "backward" || op == "backward_read",
                        "op must be 'forward', 'forward_packed', 'backward', 'backward_read', 'mask', "
                        "'norm_forward' or 'norm_backward'");
      a.grad = present;
      if (parse_activation(activation) == Act::kIdentity) a.x = nullptr;
      if (has("bias_grad")) a.partial = a.dbias = present;
      if (op == "backward_read") a.bits_in = static_cast<const uint8_t*>(present);
      run_backward(r, a, sms);
    }
  }
  std::vector<std::string> names;
  std::vector<int64_t> fields;
  for (const PlannedLaunch& l : planned) {
    names.push_back(l.kernel);
    const LaunchFacts& f = l.facts;
    fields.insert(fields.end(), {l.grid.x, l.grid.y, l.blocks_per_sm, l.shared_bytes, f.bytes_read,
                                 f.bytes_written, f.inflight_bytes_per_thread, f.lane_slots, f.busy_slots,
                                 f.dependent_loads});
  }
  return {names, fields};
}

// Each thread ANDs the shared words it owns (t, t + 256, ...) as its block
// finds them, then overwrites them with the block's number: out[block][t]
// is all ones only if every block started from poisoned memory.
template <int kWords>
struct SharedProbeKernel {
  struct Params {
    int64_t* out;
  };
  struct Shared {
    uint32_t w[kWords];
  };
  static constexpr int kPhases = 1;
  static constexpr int kBlocksPerSm = 1;

  template <int kPhase>
  static void phase(const Params& p, const Idx& idx, Shared& sh) {
    const int64_t block = static_cast<int64_t>(idx.block_y) * idx.grid_x + idx.block_x;
    uint32_t seen = ~0u;
    for (uint32_t i = idx.thread; i < static_cast<uint32_t>(kWords); i += kThreads) {
      seen &= sh.w[i];
      sh.w[i] = static_cast<uint32_t>(block);
    }
    p.out[block * kThreads + idx.thread] = seen;
  }
};

// The probe on a grid_x x grid_y grid with `words` 32-bit words of shared
// memory (256, 12288 = 48 KiB, or 12289): [blocks, 256] of what each thread
// found, or, with execute false, only the launch checks (an empty tensor).
at::Tensor test_shared_probe(int64_t grid_x, int64_t grid_y, int64_t words, bool execute) {
  TORCH_CHECK_VALUE(!execute || (grid_x >= 1 && grid_y >= 1 && grid_x * grid_y <= 4096),
                    "an executed probe takes at most 4096 blocks");
  std::vector<int64_t> plan;
  HostRunner r{execute ? nullptr : &plan};
  at::Tensor out = at::empty({execute ? grid_x * grid_y : 0, kThreads}, at::TensorOptions().dtype(at::kLong));
  const Grid2 grid{grid_x, grid_y};
  auto run = [&](auto kernel) {
    using K = decltype(kernel);
    r.template launch<K>(typename K::Params{out.data_ptr<int64_t>()}, grid);
  };
  switch (words) {
    case 256: run(SharedProbeKernel<256>{}); break;
    case 12288: run(SharedProbeKernel<12288>{}); break;
    case 12289: run(SharedProbeKernel<12289>{}); break;
    default: TORCH_CHECK_VALUE(false, "words must be 256, 12288 or 12289");
  }
  return out;
}

// (n // d, n % d) by the kernels' FastDiv, for int64 n >= 0 and d >= 1.
std::tuple<at::Tensor, at::Tensor> test_fast_divmod(const at::Tensor& n, int64_t d) {
  TORCH_CHECK_VALUE(n.scalar_type() == at::kLong && d >= 1, "fast_divmod takes int64 n and d >= 1");
  const FastDiv f = make_fast_div(static_cast<uint64_t>(d));
  const at::Tensor nc = n.contiguous();
  at::Tensor q = at::empty_like(nc);
  at::Tensor r = at::empty_like(nc);
  const int64_t* src = nc.const_data_ptr<int64_t>();
  int64_t* qp = q.data_ptr<int64_t>();
  int64_t* rp = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < nc.numel(); ++i) {
    TORCH_CHECK_VALUE(src[i] >= 0, "fast_divmod takes n >= 0");
    qp[i] = static_cast<int64_t>(fast_div(static_cast<uint64_t>(src[i]), f));
    rp[i] = fast_mod(src[i], f);
  }
  return {q, r};
}

// Float32 values rounded to `dtype` and widened back by the kernels' own
// conversions (the host twins of the device intrinsics).
at::Tensor test_round(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "round takes float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(dtype));
  at::Tensor back = at::empty_like(xc);
  const float* src = xc.const_data_ptr<float>();
  float* wide = back.data_ptr<float>();
  const int64_t n = xc.numel();
  if (dtype == at::kHalf) {
    Half* o = reinterpret_cast<Half*>(out.data_ptr());
    for (int64_t i = 0; i < n; ++i) wide[i] = Num<Half>::load(o[i] = Num<Half>::store(src[i]));
  } else {
    TORCH_CHECK_VALUE(dtype == at::kBFloat16, "round takes float16 or bfloat16");
    BFloat16* o = reinterpret_cast<BFloat16*>(out.data_ptr());
    for (int64_t i = 0; i < n; ++i) wide[i] = Num<BFloat16>::load(o[i] = Num<BFloat16>::store(src[i]));
  }
  return at::stack({out.to(at::kFloat), back});
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(dropout_ext, CPU, m) {
  m.impl("cuda_host_fused_dropout", &cuda::cuda_host_fused_dropout);
  m.impl("cuda_host_fused_dropout_backward", &cuda::cuda_host_fused_dropout_backward);
  m.impl("cuda_host_dropout_mask", &cuda::cuda_host_dropout_mask);
  m.impl("cuda_host_dropout_add_norm", &cuda::cuda_host_dropout_add_norm);
  m.impl("cuda_host_dropout_add_norm_backward", &cuda::cuda_host_dropout_add_norm_backward);
}

// Test-only ops, in their own namespace so the public op table stays the
// schemas of _ops.py.
TORCH_LIBRARY_FRAGMENT(dropout_ext_testing, m) {
  m.def("cuda_host_fused_dropout(Tensor input, Tensor? bias, Tensor? residual, Tensor? state, str activation, "
        "int[] mask_shape, int base, int sm_count, Tensor? mask_bits=None, bool pack_mask=False, "
        "int[]? place=None) -> (Tensor, Tensor)");
  m.def("cuda_host_fused_dropout_backward(Tensor grad, Tensor? input, Tensor? bias, Tensor? state, "
        "str activation, int[] mask_shape, bool bias_grad, int base, int sm_count, Tensor? mask_bits=None, "
        "int[]? place=None) -> (Tensor, Tensor)");
  m.def("cuda_host_dropout_mask(Tensor state, int[] shape, int base, int sm_count, int[]? place=None) -> Tensor");
  m.def("cuda_host_dropout_add_norm(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? state, "
        "str norm, float eps, bool residual_in_fp32, int base, int sm_count, int[]? place=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_host_dropout_add_norm_backward(Tensor grad, Tensor? grad_h, Tensor h, Tensor? weight, Tensor mean, "
        "Tensor rstd, Tensor? state, str norm, bool[4] output_mask, int base, int sm_count, int[]? place=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_bias_grad_plan(int rows, int H, ScalarType dtype, str activation, int sm_count) -> int[]");
  m.def("cuda_launch_plan(str op, int n, int H, ScalarType dtype, str activation, bool bias_grad, int sm_count) "
        "-> int[]");
  m.def("cuda_launch_facts(str op, int[] shape, ScalarType dtype, str activation, str[] parts, int sm_count) "
        "-> (str[], int[])");
  m.def("cuda_host_shared_probe(int grid_x, int grid_y, int words, bool execute) -> Tensor");
  m.def("cuda_fast_divmod(Tensor n, int d) -> (Tensor, Tensor)");
  m.def("cuda_round(Tensor x, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CPU, m) {
  m.impl("cuda_host_fused_dropout", &cuda::test_fused_dropout);
  m.impl("cuda_host_fused_dropout_backward", &cuda::test_fused_dropout_backward);
  m.impl("cuda_host_dropout_mask", &cuda::test_dropout_mask);
  m.impl("cuda_host_dropout_add_norm", &cuda::test_dropout_add_norm);
  m.impl("cuda_host_dropout_add_norm_backward", &cuda::test_dropout_add_norm_backward);
  m.impl("cuda_fast_divmod", &cuda::test_fast_divmod);
  m.impl("cuda_round", &cuda::test_round);
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CompositeExplicitAutograd, m) {
  m.impl("cuda_bias_grad_plan", &cuda::test_bias_grad_plan);
  m.impl("cuda_launch_plan", &cuda::test_launch_plan);
  m.impl("cuda_launch_facts", &cuda::test_launch_facts);
  m.impl("cuda_host_shared_probe", &cuda::test_shared_probe);
}

}  // namespace dropout_ext
