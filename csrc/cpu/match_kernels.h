// The interface between the op layer (match_cpu.cpp, which knows at::Tensor) and the kernels,
// which are compiled once per CPU capability (match_default.cpp, match_avx2.cpp,
// match_avx512.cpp; see setup.py) and know only raw pointers.
#pragma once

#include <cstdint>

namespace salign {

enum class DType : int { Float32, Float64, Float16, BFloat16 };

enum class WindowMode : int { Sliding = 0, Partition = 1 };

// One matching problem: queries in a, candidates in b (and, with the *_ba outputs set, the reverse
// direction from the same pass). Pixel-major features, p = h * W + w:
//   xa, xb          (B, N, C) contiguous, in `dtype`
//   scale_a/_b      (B, N) in the accumulation type (float, or double for Float64)
//   mask_a/_b       (B, N) bool, or nullptr for "all valid"
//   values_*        (B, N) accumulation type; indices_* (B, N) int64
// s(p, q) = scale_a[p] * scale_b[q] * <xa_p, xb_q>; window == 0 is dense matching.
struct MatchArgs {
  DType dtype;
  int64_t B, H, W, C;
  const void* xa;
  const void* xb;
  const void* scale_a;
  const void* scale_b;
  const bool* mask_a;
  const bool* mask_b;
  int64_t window;
  WindowMode mode;
  void* values_ab;
  int64_t* indices_ab;
  void* values_ba;      // nullptr unless both directions are asked for (dense only)
  int64_t* indices_ba;
};

// Gradients through the saved indices (see salign_kernels/ops/_common.py for the formulas).
struct BackwardArgs {
  DType dtype;
  int64_t B, N, C;
  const void* grad_values;  // (B, N) accumulation type
  const void* xa;
  const void* xb;
  const void* scale_a;
  const void* scale_b;
  const int64_t* indices;   // (B, N), -1 for invalid queries
  void* grad_xa;            // (B, N, C) in dtype
  void* grad_xb;
  void* grad_scale_a;       // (B, N) accumulation type
  void* grad_scale_b;
};

struct KernelTable {
  const char* capability;
  void (*forward)(const MatchArgs&);
  void (*backward)(const BackwardArgs&);
};

namespace DEFAULT { extern const KernelTable kernels; }
namespace AVX2 { extern const KernelTable kernels; }
namespace AVX512 { extern const KernelTable kernels; }

}  // namespace salign
