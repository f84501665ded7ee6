// Registration of the salign_kernels ops (schemas and CPU implementations) and the Python module
// salign_kernels._C whose import loads them. Fake (meta) implementations and autograd are
// registered from Python, in salign_kernels/ops/cpu.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/match_cpu.h"

extern "C" {
// An empty module: importing salign_kernels._C runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(salign_kernels, m) {
  m.def(
      "match(Tensor xa, Tensor xb, Tensor scale_a, Tensor scale_b, Tensor? mask_a, Tensor? mask_b, "
      "int window, int mode) -> (Tensor, Tensor)");
  m.def(
      "match_symmetric(Tensor xa, Tensor xb, Tensor scale_a, Tensor scale_b, Tensor? mask_a, Tensor? mask_b, "
      "int window, int mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "match_backward(Tensor grad_values, Tensor xa, Tensor xb, Tensor scale_a, Tensor scale_b, Tensor indices) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_capability() -> str", &salign::cpu_capability);
}

TORCH_LIBRARY_IMPL(salign_kernels, CPU, m) {
  m.impl("match", &salign::match_cpu);
  m.impl("match_symmetric", &salign::match_symmetric_cpu);
  m.impl("match_backward", &salign::match_backward_cpu);
}
