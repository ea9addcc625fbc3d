// The CUDA kernels executed on the host: the CUDA backend's interpreter, as
// TRITON_INTERPRET=1 is Triton's.
//
// The ops cuda_host_fused_dropout, cuda_host_fused_dropout_backward and
// cuda_host_dropout_mask (CPU dispatch key, schemas in dropout_ext/_ops.py)
// run the op bodies of csrc/cuda/ops_impl.h, which the CUDA glue runs too,
// and launch the kernels of csrc/cuda/kernel_body.h, which nvcc compiles into
// the __global__ kernels: the same source lines, on CPU tensors. A launch
// computes its grid as the CUDA launcher does for an H100's SM count and runs
// every block, in order, and in each block phase by phase (the code between
// __syncthreads()) every thread, in order. So the conformance suite can
// check the CUDA kernels bit for bit against the reference on a machine
// without a GPU, including the bias gradient's summation order.
//
// Built by g++ into every build of the extension: no CUDA header is needed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "../cuda/kernel_body.h"
#include "../cuda/ops_impl.h"

namespace dropout_ext {
namespace cuda {
namespace {

struct HostRunner {
  template <typename K, int kPhase>
  static void run_phase(const typename K::Params& p, Grid2 grid, uint32_t bx, uint32_t by,
                        typename K::Shared& shared) {
    for (uint32_t t = 0; t < static_cast<uint32_t>(kThreads); ++t) {
      K::template phase<kPhase>(p, Idx{bx, by, t, grid.x, grid.y}, shared);
    }
  }

  template <typename K>
  bool launch(const typename K::Params& p, Grid2 grid) {
    // One block's shared memory, reused block after block, as a GPU reuses
    // it: no kernel may read what it has not written in the same block.
    auto shared = std::make_unique<typename K::Shared>();
    for (uint32_t by = 0; by < grid.y; ++by) {
      for (uint32_t bx = 0; bx < grid.x; ++bx) {
        run_phase<K, 0>(p, grid, bx, by, *shared);
        if constexpr (K::kPhases > 1) run_phase<K, 1>(p, grid, bx, by, *shared);
        static_assert(K::kPhases <= 2, "add the phases here");
      }
    }
    return true;
  }
};

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
};

at::Tensor cuda_host_fused_dropout(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& state, c10::string_view activation,
                                   at::IntArrayRef mask_shape) {
  return fused_dropout_op(HostExec{}, input, bias, residual, state, activation, mask_shape);
}

std::tuple<at::Tensor, at::Tensor> cuda_host_fused_dropout_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad) {
  return fused_dropout_backward_op(HostExec{}, grad, input, bias, state, activation, mask_shape, bias_grad);
}

at::Tensor cuda_host_dropout_mask(const at::Tensor& state, at::IntArrayRef shape) {
  return dropout_mask_op(HostExec{}, state, shape);
}

// --- test entry points ---------------------------------------------------------
// The same ops with the launch's SM count and the logical index of element 0
// as arguments: tests run small grids (several units per thread) and index
// arithmetic past 2**31 and 2**32 without allocating such tensors. Like the
// GPU's, they leave p unread on the host, so the kernels' sanitising of a p
// outside [0, 1] is what runs.

HostExec test_exec(int64_t sm_count) {
  TORCH_CHECK_VALUE(sm_count >= 1 && sm_count <= 1024, "sm_count must be in [1, 1024], got ", sm_count);
  return HostExec{static_cast<int>(sm_count), false};
}

void check_base(int64_t base, int64_t n, bool structured) {
  TORCH_CHECK_VALUE(base >= 0 && base % 16 == 0 && base <= (int64_t{1} << 62) - n,
                    "base must be a non-negative multiple of 16 below 2**62 - numel, got ", base);
  TORCH_CHECK_VALUE(base == 0 || !structured, "base applies to per-element masks only");
}

bool is_structured(const at::Tensor& t, at::IntArrayRef mask_shape) {
  return !mask_shape.empty() && !t.sizes().equals(mask_shape);
}

at::Tensor test_fused_dropout(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& state,
                              c10::string_view activation, at::IntArrayRef mask_shape, int64_t base,
                              int64_t sm_count) {
  check_base(base, input.numel(), is_structured(input, mask_shape));
  return fused_dropout_op(test_exec(sm_count), input, bias, residual, state, activation, mask_shape, base);
}

std::tuple<at::Tensor, at::Tensor> test_fused_dropout_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad, int64_t base, int64_t sm_count) {
  check_base(base, grad.numel(), is_structured(grad, mask_shape));
  // The bias-gradient kernel takes a row's first column to be column 0.
  TORCH_CHECK_VALUE(!bias_grad || base % last_dim(grad) == 0, "with bias_grad, base must be a multiple of the "
                    "last dimension");
  return fused_dropout_backward_op(test_exec(sm_count), grad, input, bias, state, activation, mask_shape, bias_grad,
                                   base);
}

at::Tensor test_dropout_mask(const at::Tensor& state, at::IntArrayRef shape, int64_t base, int64_t sm_count) {
  check_base(base, c10::multiply_integers(shape), false);
  return dropout_mask_op(test_exec(sm_count), state, shape, base);
}

// [col_units, row_lanes, rows_per_block, row_blocks, grid.x, grid.y] of the
// bias-gradient launch.
std::vector<int64_t> test_bias_grad_plan(int64_t rows, int64_t H, int64_t elems, int64_t sm_count) {
  const BiasGradPlan g = plan_bias_grad(rows, H, static_cast<int>(elems), static_cast<int>(sm_count));
  return {g.col_units, g.row_lanes, g.rows_per_block, g.row_blocks, g.grid.x, g.grid.y};
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
}

// Test-only ops, in their own namespace so the public op table stays the
// schemas of _ops.py.
TORCH_LIBRARY_FRAGMENT(dropout_ext_testing, m) {
  m.def("cuda_host_fused_dropout(Tensor input, Tensor? bias, Tensor? residual, Tensor? state, str activation, "
        "int[] mask_shape, int base, int sm_count) -> Tensor");
  m.def("cuda_host_fused_dropout_backward(Tensor grad, Tensor? input, Tensor? bias, Tensor? state, "
        "str activation, int[] mask_shape, bool bias_grad, int base, int sm_count) -> (Tensor, Tensor)");
  m.def("cuda_host_dropout_mask(Tensor state, int[] shape, int base, int sm_count) -> Tensor");
  m.def("cuda_bias_grad_plan(int rows, int H, int elems, int sm_count) -> int[]");
  m.def("cuda_fast_divmod(Tensor n, int d) -> (Tensor, Tensor)");
  m.def("cuda_round(Tensor x, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CPU, m) {
  m.impl("cuda_host_fused_dropout", &cuda::test_fused_dropout);
  m.impl("cuda_host_fused_dropout_backward", &cuda::test_fused_dropout_backward);
  m.impl("cuda_host_dropout_mask", &cuda::test_dropout_mask);
  m.impl("cuda_fast_divmod", &cuda::test_fast_divmod);
  m.impl("cuda_round", &cuda::test_round);
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CompositeExplicitAutograd, m) {
  m.impl("cuda_bias_grad_plan", &cuda::test_bias_grad_plan);
}

}  // namespace dropout_ext
