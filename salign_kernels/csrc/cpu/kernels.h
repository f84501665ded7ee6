// The interface between the op layer (match_cpu.cpp, which knows at::Tensor) and the kernels,
// which are compiled once per CPU capability (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp; see salign_kernels/_build.py) and know only raw pointers and strides.
#pragma once

#include <cstdint>

namespace salign {

enum class DType : int { Float32, Float64, Float16, BFloat16 };

enum class WindowMode : int { Sliding = 0, Partition = 1 };

// The spatial seam: every map is (B, C, D, H, W); a 2D map (B, C, H, W) is a volume with D = 1.
// Voxels flatten row-major, p = (d * H + h) * W + w, N = D * H * W.
struct Geometry {
  int64_t B, C, D, H, W;
  int64_t voxels() const { return D * H * W; }
};

// A feature map in any memory layout (contiguous, channels-last, strided views); strides in
// elements (stride_d is unused when D = 1).
struct Features {
  const void* data;
  int64_t stride_b, stride_c, stride_d, stride_h, stride_w;
};

// A gradient of the same shape, written through its own strides.
struct FeatureGrad {
  void* data;
  int64_t stride_b, stride_c, stride_d, stride_h, stride_w;
};

// Window sizes per axis (depth 1 for 2D maps); all zero for dense matching.
struct Window {
  int64_t d, h, w;
  bool dense() const { return d == 0; }
};

// One matching problem: queries in a, candidates in b (and, with the *_ba outputs set, the reverse
// direction from the same pass).
//   x_hat = x / max(||x||, 1e-12) when `normalize`, else x;  s(p, q) = <xa_hat_p, xb_hat_q>
//   mask_a/_b   (B, N) bool, contiguous, or nullptr for "all valid"
//   values_*    (B, N) accumulation type (float, double for Float64); indices_* (B, N) int64
struct MatchArgs {
  DType dtype;
  Geometry geo;
  Features a, b;
  bool normalize;
  const bool* mask_a;
  const bool* mask_b;
  Window window;
  WindowMode mode;
  void* values_ab;
  int64_t* indices_ab;
  void* values_ba;  // nullptr unless both directions are asked for (dense only)
  int64_t* indices_ba;
};

// Gradients of the features through the saved indices, the normalisation included.
struct BackwardArgs {
  DType dtype;
  Geometry geo;
  Features a, b;
  bool normalize;
  const void* grad_values;  // (B, N) accumulation type
  const int64_t* indices;   // (B, N), -1 for invalid queries
  FeatureGrad grad_a, grad_b;
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
