// The dropout_ext operator schemas, defined once. Device implementations
// register beside their kernels (cpu/dropout_cpu.cpp, cuda/dropout_cuda.cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing dropout_ext._C runs the static registrations below; the module
// itself exports nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dropout_ext kernels (ops live in torch.ops.dropout_ext)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dropout_ext, m) {
  // rng is an int64 tensor [seed, offset] (docs/RNG.md), on the CPU or on the
  // input's device: a device tensor lets a captured CUDA graph draw a fresh
  // (seed, offset) on every replay. [seed, offset, p bits] carries p as data
  // and the float p is then not used (a compiled graph stays valid for any p). mask_shape is [] for one draw per element,
  // or the input's shape with some dimensions 1 (structured dropout).
  m.def(
      "fused_dropout(Tensor input, Tensor? bias, Tensor? residual, Tensor rng, float p, "
      "str activation, int[] mask_shape) -> Tensor");
  m.def(
      "fused_dropout_backward(Tensor grad, Tensor? input, Tensor? bias, Tensor rng, float p, "
      "str activation, int[] mask_shape, bool bias_grad) -> (Tensor, Tensor)");
  m.def("dropout_mask(Tensor rng, int[] shape, float p) -> Tensor");
}
