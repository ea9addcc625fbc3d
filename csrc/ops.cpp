// The Python module dropout_ext._C and the op schemas, defined once for
// every backend's op family (docs/DESIGN.md): "" (the C++ kernels, CPU and
// CUDA keys), "cuda_host_" (the CUDA kernels executed on the host),
// "triton_" and "reference_" (kernels registered from Python). Kernels are
// registered beside their code; the autograd of all of them is autograd.cpp.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "op_common.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dropout_ext kernels (ops live in torch.ops.dropout_ext)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

namespace dropout_ext {

TORCH_LIBRARY(dropout_ext, m) {
  // state: int64 [seed, offset, p bits] on the input's device or the CPU,
  // or None for no dropout. p (forward ops, with no state): the op draws the
  // state itself from generator, or the default generator of the input's
  // device, and returns it as its last output (else an empty int64 tensor):
  // the eager path, one launch on a GPU, fresh draws in every replay of a
  // captured CUDA graph (docs/DESIGN.md). mask_shape: [] for one draw per
  // element, or the input's shape with some sizes 1 (structured dropout).
  // mask_bits: the keep mask of a full mask packed 8 elements per byte
  // (docs/RNG.md), read instead of drawing it again; pack_mask: also return
  // it (else an empty uint8 tensor). place: where the input sits in a global
  // tensor, [global shape..., start...]; every element draws its keep bit
  // at its global index, so a shard gets the global tensor's mask, and
  // mask_shape then speaks of the global shape (docs/RNG.md, "Sharded
  // tensors"). None: the input is the whole tensor.
  for (const char* prefix : kOpPrefixes) {
    const std::string p(prefix);
    m.def((p + "fused_dropout(Tensor input, Tensor? bias, Tensor? residual, Tensor? state, str activation, "
                "int[] mask_shape, Tensor? mask_bits=None, bool pack_mask=False, float? p=None, "
                "Generator? generator=None, int[]? place=None) -> (Tensor, Tensor, Tensor)")
              .c_str());
    m.def((p + "fused_dropout_backward(Tensor grad, Tensor? input, Tensor? bias, Tensor? state, str activation, "
                "int[] mask_shape, bool bias_grad, Tensor? mask_bits=None, int[]? place=None) -> (Tensor, Tensor)")
              .c_str());
    m.def((p + "dropout_mask(Tensor state, int[] shape, int[]? place=None) -> Tensor").c_str());
    // h = residual + dropout(input), y = norm(h) * weight + bias over the
    // last dimension; norm: "layer" or "rms". h is stored in float32 with
    // residual_in_fp32, else in input's dtype; mean (layer only, else empty)
    // and rstd: float32, one per row. The backward reads h, mean and rstd
    // and draws the mask again from the state; grad_h is the gradient of
    // the h output (a pre-norm block's residual stream), None where unused.
    m.def((p + "dropout_add_norm(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? state, "
                "str norm, float eps, bool residual_in_fp32, float? p=None, Generator? generator=None, "
                "int[]? place=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
              .c_str());
    m.def((p + "dropout_add_norm_backward(Tensor grad, Tensor? grad_h, Tensor h, Tensor? weight, Tensor mean, "
                "Tensor rstd, Tensor? state, str norm, bool[4] output_mask, int[]? place=None) "
                "-> (Tensor, Tensor, Tensor, Tensor)")
              .c_str());
  }
  // The state a forward op given p draws, drawn alone (the same words for the
  // same generator state): for kernels that cannot draw it themselves
  // (Triton, the reference) and for compiled graphs. A random op to the
  // compiler: never recomputed with a fresh draw.
  m.def("draw_state(Tensor input, float p, Generator? generator=None) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // The index map of a tensor of `shape` at `place` (index_map.h), for the
  // kernels written in Python: [base, run, ndims, size * kMaxMapDims,
  // stride * kMaxMapDims]. One derivation for every backend.
  m.def("index_map(int[] shape, int[]? place) -> int[]", [](at::IntArrayRef shape, at::OptionalIntArrayRef place) {
    const IndexMap map = place_map(shape, place);
    std::vector<int64_t> words{map.base, map.run, map.ndims};
    words.insert(words.end(), map.size, map.size + kMaxMapDims);
    words.insert(words.end(), map.stride, map.stride + kMaxMapDims);
    return words;
  });
  // Whether the GPU kernels read a tensor's rows where they lie, and how far
  // apart (op_common.h, row_stride): one rule for the C++ and Python kernels.
  m.def("row_stride(int[] sizes, int[] strides, int unit) -> int",
        [](at::IntArrayRef sizes, at::IntArrayRef strides, int64_t unit) { return row_stride(sizes, strides, unit); });
}

}  // namespace dropout_ext
