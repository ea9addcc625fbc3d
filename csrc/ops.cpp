// The Python module dropout_ext._C. Importing it runs the static kernel
// registrations (TORCH_LIBRARY_IMPL) of the C++ backends; the op schemas
// themselves are defined once, in dropout_ext/_ops.py, so the pure-PyTorch
// reference has them even where this module was never built.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dropout_ext kernels (ops live in torch.ops.dropout_ext)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
