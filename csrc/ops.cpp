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

// Features are (B, C, H, W) in any memory layout; x_hat = x / max(||x||, 1e-12) over C when
// `normalize`. match: for each pixel p of feat_a, the max over its candidates q in feat_b of
// <xa_hat_p, xb_hat_q> and the lowest q attaining it (window 0: every pixel; else the sliding
// (mode 0) or partition (mode 1) window); -1 and 0 for a masked query or one without candidates.
// match_symmetric: both directions (dense only). match_backward: the gradients of both feature
// maps given the gradient of the values and the saved indices.
TORCH_LIBRARY(salign_kernels, m) {
  m.def(
      "match(Tensor feat_a, Tensor feat_b, Tensor? mask_a, Tensor? mask_b, int window, int mode, bool normalize) "
      "-> (Tensor, Tensor)");
  m.def(
      "match_symmetric(Tensor feat_a, Tensor feat_b, Tensor? mask_a, Tensor? mask_b, int window, int mode, "
      "bool normalize) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "match_backward(Tensor grad_values, Tensor feat_a, Tensor feat_b, Tensor indices, bool normalize) "
      "-> (Tensor, Tensor)");
  m.def("cpu_capability() -> str", &salign::cpu_capability);
}

TORCH_LIBRARY_IMPL(salign_kernels, CPU, m) {
  m.impl("match", &salign::match_cpu);
  m.impl("match_symmetric", &salign::match_symmetric_cpu);
  m.impl("match_backward", &salign::match_backward_cpu);
}
