// The CPU implementations of the salign_kernels ops: argument checks, allocation, and the choice
// of kernel variant (the CPU capability PyTorch itself runs with, see ATEN_CPU_CAPABILITY).
#include "cpu/match_cpu.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace salign {
namespace {

// Whether this CPU executes a variant's instructions (the flags salign_kernels/_build.py compiles
// it with). PyTorch reports the capability ATEN_CPU_CAPABILITY asks for even where the CPU lacks
// it, and a variant the CPU cannot run would stop the process with SIGILL.
#if defined(SALIGN_HAVE_AVX512) || defined(SALIGN_HAVE_AVX2)
bool cpu_runs_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_runs_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

// The variant PyTorch runs with, or the best lower one this CPU executes, among those the build
// has: it defines SALIGN_HAVE_<VARIANT> for each variant it compiled (salign_kernels/_build.py),
// all of this architecture's ahead of time, only the one this machine runs at first use.
const KernelTable& kernel_table() {
  static const KernelTable* table = [] {
    const std::string capability = at::get_cpu_capability();
    const KernelTable* chosen = nullptr;
#ifdef SALIGN_HAVE_AVX512
    if (capability == "AVX512" && cpu_runs_avx512()) chosen = &AVX512::kernels;
#endif
#ifdef SALIGN_HAVE_AVX2
    if (chosen == nullptr && (capability == "AVX512" || capability == "AVX2") && cpu_runs_avx2())
      chosen = &AVX2::kernels;
#endif
#ifdef SALIGN_HAVE_DEFAULT
    if (chosen == nullptr) chosen = &DEFAULT::kernels;
#endif
    // Only a single-variant build can get here, loaded under another capability than it was
    // built for (its cache is keyed by capability, so only by hand): never run unsupported code.
    TORCH_CHECK(chosen != nullptr, "salign_kernels: this build of the C++ kernels has no variant for the CPU "
                "capability torch runs with (", capability, ") that this CPU executes; rebuild it");
    return chosen;
  }();
  return *table;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "feat_a must be float32, float64, float16 or bfloat16; got ", t.scalar_type());
  }
  return DType::Float32;  // unreachable
}

at::ScalarType accumulation_type(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The spatial seam: (B, C, H, W) is (B, C, 1, H, W).
Geometry geometry_of(const at::Tensor& t) {
  if (t.dim() == 4) return {t.size(0), t.size(1), 1, t.size(2), t.size(3)};
  return {t.size(0), t.size(1), t.size(2), t.size(3), t.size(4)};
}

template <typename View, typename Ptr>
View view_with(Ptr data, const at::Tensor& t) {
  if (t.dim() == 4) return {data, t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3)};
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

Features view_of(const at::Tensor& t) { return view_with<Features>(t.const_data_ptr(), t); }

FeatureGrad grad_view_of(at::Tensor& t) { return view_with<FeatureGrad>(t.mutable_data_ptr(), t); }

// Two (B, C, *spatial) maps of one shape and floating dtype on the CPU, in any memory layout.
void check_features(const at::Tensor& feat_a, const at::Tensor& feat_b) {
  TORCH_CHECK_VALUE(feat_a.dim() == 4 || feat_a.dim() == 5, "feat_a must be (B, C, H, W) or (B, C, D, H, W); got ",
                    feat_a.dim(), " dimensions");
  TORCH_CHECK_VALUE(feat_a.sizes() == feat_b.sizes(), "feat_a and feat_b must have the same shape; got ",
                    feat_a.sizes(), " and ", feat_b.sizes());
  TORCH_CHECK_TYPE(feat_a.scalar_type() == feat_b.scalar_type(), "feat_a and feat_b must have the same dtype; got ",
                   feat_a.scalar_type(), " and ", feat_b.scalar_type());
  TORCH_CHECK_VALUE(feat_a.device().is_cpu() && feat_b.device().is_cpu(), "feat_a and feat_b must be CPU tensors");
  TORCH_CHECK_VALUE(feat_a.numel() > 0, "feat_a must not be empty; got shape ", feat_a.sizes());
  dtype_of(feat_a);
}

// (B, *spatial): the shape of masks, values and indices.
std::vector<int64_t> per_voxel_shape(const at::Tensor& feat) {
  std::vector<int64_t> shape{feat.size(0)};
  for (int64_t i = 2; i < feat.dim(); ++i) shape.push_back(feat.size(i));
  return shape;
}

const bool* mask_pointer(const std::optional<at::Tensor>& mask, const char* name, at::IntArrayRef shape,
                         at::Tensor& keep) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, name, " must be bool; got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == shape, name, " must have shape (B, *spatial) = ", shape, "; got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device().is_cpu(), name, " must be a CPU tensor");
  keep = mask->contiguous();
  return keep.const_data_ptr<bool>();
}

// Empty for dense matching, else one size per spatial axis in [1, the largest spatial size], odd
// when sliding; a 2D window gets depth 1.
Window window_of(c10::IntArrayRef window, int64_t mode, const at::Tensor& feat) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (sliding) or 1 (partition); got ", mode);
  if (window.empty()) return {0, 0, 0};
  const int64_t spatial = feat.dim() - 2;
  TORCH_CHECK_VALUE(static_cast<int64_t>(window.size()) == spatial, "window must have one size per spatial axis (",
                    spatial, "); got ", window);
  int64_t largest = 0;
  for (int64_t i = 2; i < feat.dim(); ++i) largest = std::max(largest, feat.size(i));
  for (const int64_t k : window) {
    TORCH_CHECK_VALUE(k >= 1 && k <= largest, "window sizes must lie in [1, ", largest, "]; got ", window);
    TORCH_CHECK_VALUE(mode == 1 || k % 2 == 1, "window sizes must be odd in sliding mode; got ", window);
  }
  // The sliding kernel keeps a candidate's offset from its query in 32-bit lanes next to float32
  // similarities: |q - p| < N must fit.
  int64_t voxels = 1;
  for (int64_t i = 2; i < feat.dim(); ++i) voxels *= feat.size(i);
  TORCH_CHECK_VALUE(mode == 1 || voxels <= std::numeric_limits<int32_t>::max(),
                    "sliding windows on the CPU take maps of at most 2^31 - 1 voxels; got ", voxels);
  if (spatial == 2) return {1, window[0], window[1]};
  return {window[0], window[1], window[2]};
}

struct Prepared {
  at::Tensor mask_a, mask_b;  // keeps contiguous copies of the masks alive
  MatchArgs args;
};

Prepared prepare(const at::Tensor& feat_a, const at::Tensor& feat_b, const std::optional<at::Tensor>& mask_a,
                 const std::optional<at::Tensor>& mask_b, c10::IntArrayRef window, int64_t mode, bool normalize) {
  check_features(feat_a, feat_b);
  const auto shape = per_voxel_shape(feat_a);
  Prepared p;
  p.args = MatchArgs{dtype_of(feat_a),
                     geometry_of(feat_a),
                     view_of(feat_a),
                     view_of(feat_b),
                     normalize,
                     mask_pointer(mask_a, "mask_a", shape, p.mask_a),
                     mask_pointer(mask_b, "mask_b", shape, p.mask_b),
                     window_of(window, mode, feat_a),
                     static_cast<WindowMode>(mode),
                     nullptr, nullptr, nullptr, nullptr};
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& feat_a, const at::Tensor& feat_b,
                                             const std::optional<at::Tensor>& mask_a,
                                             const std::optional<at::Tensor>& mask_b, c10::IntArrayRef window,
                                             int64_t mode, bool normalize) {
  Prepared p = prepare(feat_a, feat_b, mask_a, mask_b, window, mode, normalize);
  const auto shape = per_voxel_shape(feat_a);
  auto values = at::empty(shape, feat_a.options().dtype(accumulation_type(feat_a)));
  auto indices = at::empty(shape, feat_a.options().dtype(at::kLong));
  p.args.values_ab = values.mutable_data_ptr();
  p.args.indices_ab = indices.mutable_data_ptr<int64_t>();
  kernel_table().forward(p.args);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_symmetric_cpu(
    const at::Tensor& feat_a, const at::Tensor& feat_b, const std::optional<at::Tensor>& mask_a,
    const std::optional<at::Tensor>& mask_b, c10::IntArrayRef window, int64_t mode, bool normalize) {
  TORCH_CHECK_VALUE(window.empty(), "match_symmetric fuses dense matching only (window = []); got window ", window);
  Prepared p = prepare(feat_a, feat_b, mask_a, mask_b, window, mode, normalize);
  const auto shape = per_voxel_shape(feat_a);
  const auto value_options = feat_a.options().dtype(accumulation_type(feat_a));
  auto values_ab = at::empty(shape, value_options), values_ba = at::empty(shape, value_options);
  auto indices_ab = at::empty(shape, feat_a.options().dtype(at::kLong));
  auto indices_ba = at::empty(shape, feat_a.options().dtype(at::kLong));
  p.args.values_ab = values_ab.mutable_data_ptr();
  p.args.indices_ab = indices_ab.mutable_data_ptr<int64_t>();
  p.args.values_ba = values_ba.mutable_data_ptr();
  p.args.indices_ba = indices_ba.mutable_data_ptr<int64_t>();
  kernel_table().forward(p.args);
  return {values_ab, indices_ab, values_ba, indices_ba};
}

std::tuple<at::Tensor, at::Tensor> match_backward_cpu(const at::Tensor& grad_values, const at::Tensor& feat_a,
                                                      const at::Tensor& feat_b, const at::Tensor& indices,
                                                      bool normalize) {
  check_features(feat_a, feat_b);
  const auto shape = per_voxel_shape(feat_a);
  TORCH_CHECK_VALUE(grad_values.sizes() == at::IntArrayRef(shape), "grad_values must have shape ", shape, "; got ",
                    grad_values.sizes());
  TORCH_CHECK_TYPE(grad_values.scalar_type() == accumulation_type(feat_a), "grad_values must be ",
                   accumulation_type(feat_a), "; got ", grad_values.scalar_type());
  TORCH_CHECK_VALUE(indices.sizes() == at::IntArrayRef(shape), "indices must have shape ", shape, "; got ",
                    indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64; got ", indices.scalar_type());
  const Geometry geo = geometry_of(feat_a);
  const int64_t n = geo.voxels();
  const auto idx = indices.contiguous();
  const int64_t* raw = idx.const_data_ptr<int64_t>();
  const bool in_range = std::all_of(raw, raw + idx.numel(), [n](int64_t q) { return q >= -1 && q < n; });
  TORCH_CHECK_VALUE(in_range, "indices must lie in [-1, N = ", n, ")");
  const auto g = grad_values.contiguous();
  // Gradients in the layout of their features (channels-last stays channels-last, NCHW stays NCHW).
  auto grad_a = at::empty_like(feat_a, at::MemoryFormat::Preserve);
  auto grad_b = at::empty_like(feat_b, at::MemoryFormat::Preserve);
  const BackwardArgs args{dtype_of(feat_a),
                          geo,
                          view_of(feat_a),
                          view_of(feat_b),
                          normalize,
                          g.const_data_ptr(),
                          raw,
                          grad_view_of(grad_a),
                          grad_view_of(grad_b)};
  kernel_table().backward(args);
  return {grad_a, grad_b};
}

std::string cpu_capability() {
  return kernel_table().capability;
}

}  // namespace salign
