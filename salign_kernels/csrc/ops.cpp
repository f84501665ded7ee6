// The CPU kernels of the op family salign_kernels::match, match_symmetric and match_backward, and
// the Python module salign_kernels._C whose import registers them. The schemas, fake (meta)
// implementations and autograd are defined once, in Python (salign_kernels/ops/_library.py), so
// that the Triton backend can use the same ops on a machine without this extension.
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

TORCH_LIBRARY_FRAGMENT(salign_kernels, m) {
  m.def("cpu_capability() -> str", &salign::cpu_capability);
}

TORCH_LIBRARY_IMPL(salign_kernels, CPU, m) {
  m.impl("match", &salign::match_cpu);
  m.impl("match_symmetric", &salign::match_symmetric_cpu);
  m.impl("match_backward", &salign::match_backward_cpu);
}
