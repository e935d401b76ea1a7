// Python module object for specdec._C. The ops themselves are registered with the dispatcher
// (TORCH_LIBRARY_FRAGMENT in each source file) under the namespace `specdec_cpp`; importing this
// module is what loads them.
#include <Python.h>
#include <torch/library.h>

namespace {
bool has_cuda_kernels() {
#ifdef SPECDEC_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(specdec_cpp, m) {
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "specdec C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&def);
}
