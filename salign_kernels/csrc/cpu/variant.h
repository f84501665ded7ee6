// The kernels of one CPU capability and their entry points. kernels_<capability>.cpp includes this
// header, and the build (salign_kernels/_build.py) compiles each with that capability's compiler
// flags and -DCPU_CAPABILITY=<capability>, the macro that also names the inline namespace of
// at::vec, so the variants never collide at link time. match_cpu.cpp picks one at run time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/backward.h"
#include "cpu/dense_forward.h"
#include "cpu/kernels.h"
#include "cpu/partition_forward.h"
#include "cpu/sliding_forward.h"

namespace salign {
namespace CPU_CAPABILITY {

template <typename scalar_t, typename acc_t>
void forward_impl(const MatchArgs& args) {
  if (args.window.dense()) {
    dense_forward<scalar_t, acc_t>(args);
  } else if (args.mode == WindowMode::Sliding) {
    sliding_forward<scalar_t, acc_t>(args);
  } else {
    partition_forward<scalar_t, acc_t>(args);
  }
}

inline void forward(const MatchArgs& args) {
  switch (args.dtype) {
    case DType::Float32: return forward_impl<float, float>(args);
    case DType::Float64: return forward_impl<double, double>(args);
    case DType::Float16: return forward_impl<c10::Half, float>(args);
    case DType::BFloat16: return forward_impl<c10::BFloat16, float>(args);
  }
}

inline void backward(const BackwardArgs& args) {
  switch (args.dtype) {
    case DType::Float32: return backward_impl<float, float>(args);
    case DType::Float64: return backward_impl<double, double>(args);
    case DType::Float16: return backward_impl<c10::Half, float>(args);
    case DType::BFloat16: return backward_impl<c10::BFloat16, float>(args);
  }
}

#define SALIGN_STRINGIFY_(x) #x
#define SALIGN_STRINGIFY(x) SALIGN_STRINGIFY_(x)
const KernelTable kernels{SALIGN_STRINGIFY(CPU_CAPABILITY), &forward, &backward};

}  // namespace CPU_CAPABILITY
}  // namespace salign
