// The CPU implementations of the salign_kernels ops: argument checks, allocation, and the choice
// of kernel variant (the CPU capability PyTorch itself runs with, see ATEN_CPU_CAPABILITY).
#include "cpu/match_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <algorithm>
#include <string>

#include "cpu/match_kernels.h"

namespace salign {
namespace {

const KernelTable& kernel_table() {
  static const KernelTable* table = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef SALIGN_HAVE_X86_VARIANTS
    if (capability == "AVX512") return &AVX512::kernels;
    if (capability == "AVX2") return &AVX2::kernels;
#endif
    return &DEFAULT::kernels;
  }();
  return *table;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "xa must be float32, float64, float16 or bfloat16; got ", t.scalar_type());
  }
  return DType::Float32;  // unreachable
}

at::ScalarType accumulation_type(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The op contract of salign_kernels/ops/_common.py, checked; returns (B, H, W, C).
std::array<int64_t, 4> check_features(const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a,
                                      const at::Tensor& scale_b) {
  TORCH_CHECK_VALUE(xa.dim() == 4, "xa must be pixel-major (B, H, W, C); got ", xa.dim(), " dimensions");
  TORCH_CHECK_VALUE(xa.sizes() == xb.sizes(), "xa and xb must have the same shape; got ", xa.sizes(), " and ",
                    xb.sizes());
  TORCH_CHECK_TYPE(xa.scalar_type() == xb.scalar_type(), "xa and xb must have the same dtype; got ",
                   xa.scalar_type(), " and ", xb.scalar_type());
  TORCH_CHECK_VALUE(xa.device().is_cpu() && xb.device().is_cpu(), "xa and xb must be CPU tensors");
  TORCH_CHECK_VALUE(xa.numel() > 0, "xa must not be empty; got shape ", xa.sizes());
  dtype_of(xa);
  const auto acc = accumulation_type(xa);
  for (const auto* s : {&scale_a, &scale_b}) {
    const char* name = s == &scale_a ? "scale_a" : "scale_b";
    TORCH_CHECK_VALUE(s->sizes() == xa.sizes().slice(0, 3), name, " must have shape (B, H, W) = ",
                      xa.sizes().slice(0, 3), "; got ", s->sizes());
    TORCH_CHECK_TYPE(s->scalar_type() == acc, name, " must be ", acc, "; got ", s->scalar_type());
    TORCH_CHECK_VALUE(s->device().is_cpu(), name, " must be a CPU tensor");
  }
  return {xa.size(0), xa.size(1), xa.size(2), xa.size(3)};
}

const bool* mask_pointer(const std::optional<at::Tensor>& mask, const char* name, at::IntArrayRef bhw,
                         at::Tensor& keep) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, name, " must be bool; got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == bhw, name, " must have shape (B, H, W) = ", bhw, "; got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device().is_cpu(), name, " must be a CPU tensor");
  keep = mask->contiguous();
  return keep.const_data_ptr<bool>();
}

void check_window(int64_t window, int64_t mode, int64_t H, int64_t W) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode must be 0 (sliding) or 1 (partition); got ", mode);
  TORCH_CHECK_VALUE(window >= 0 && window <= std::max(H, W),
                    "window must be 0 (dense) or in [1, max(H, W) = ", std::max(H, W), "]; got ", window);
  TORCH_CHECK_VALUE(window == 0 || mode == 1 || window % 2 == 1,
                    "window must be odd in sliding mode; got ", window);
}

struct Prepared {
  at::Tensor xa, xb, scale_a, scale_b, mask_a, mask_b;
  MatchArgs args;
};

Prepared prepare(const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a, const at::Tensor& scale_b,
                 const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_b, int64_t window,
                 int64_t mode) {
  const auto [B, H, W, C] = check_features(xa, xb, scale_a, scale_b);
  check_window(window, mode, H, W);
  Prepared p;
  p.xa = xa.contiguous();
  p.xb = xb.contiguous();
  p.scale_a = scale_a.contiguous();
  p.scale_b = scale_b.contiguous();
  const auto bhw = xa.sizes().slice(0, 3);
  p.args = MatchArgs{dtype_of(xa),
                     B, H, W, C,
                     p.xa.const_data_ptr(),
                     p.xb.const_data_ptr(),
                     p.scale_a.const_data_ptr(),
                     p.scale_b.const_data_ptr(),
                     mask_pointer(mask_a, "mask_a", bhw, p.mask_a),
                     mask_pointer(mask_b, "mask_b", bhw, p.mask_b),
                     window,
                     static_cast<WindowMode>(mode),
                     nullptr, nullptr, nullptr, nullptr};
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a,
                                             const at::Tensor& scale_b, const std::optional<at::Tensor>& mask_a,
                                             const std::optional<at::Tensor>& mask_b, int64_t window, int64_t mode) {
  Prepared p = prepare(xa, xb, scale_a, scale_b, mask_a, mask_b, window, mode);
  const auto bhw = xa.sizes().slice(0, 3);
  auto values = at::empty(bhw, xa.options().dtype(accumulation_type(xa)));
  auto indices = at::empty(bhw, xa.options().dtype(at::kLong));
  p.args.values_ab = values.mutable_data_ptr();
  p.args.indices_ab = indices.mutable_data_ptr<int64_t>();
  kernel_table().forward(p.args);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_symmetric_cpu(
    const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a, const at::Tensor& scale_b,
    const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_b, int64_t window, int64_t mode) {
  TORCH_CHECK_VALUE(window == 0, "match_symmetric fuses dense matching only (window = 0); got window ", window);
  Prepared p = prepare(xa, xb, scale_a, scale_b, mask_a, mask_b, window, mode);
  const auto bhw = xa.sizes().slice(0, 3);
  const auto value_options = xa.options().dtype(accumulation_type(xa));
  auto values_ab = at::empty(bhw, value_options), values_ba = at::empty(bhw, value_options);
  auto indices_ab = at::empty(bhw, xa.options().dtype(at::kLong));
  auto indices_ba = at::empty(bhw, xa.options().dtype(at::kLong));
  p.args.values_ab = values_ab.mutable_data_ptr();
  p.args.indices_ab = indices_ab.mutable_data_ptr<int64_t>();
  p.args.values_ba = values_ba.mutable_data_ptr();
  p.args.indices_ba = indices_ba.mutable_data_ptr<int64_t>();
  kernel_table().forward(p.args);
  return {values_ab, indices_ab, values_ba, indices_ba};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a,
    const at::Tensor& scale_b, const at::Tensor& indices) {
  const auto [B, H, W, C] = check_features(xa, xb, scale_a, scale_b);
  const auto bhw = xa.sizes().slice(0, 3);
  TORCH_CHECK_VALUE(grad_values.sizes() == bhw, "grad_values must have shape ", bhw, "; got ", grad_values.sizes());
  TORCH_CHECK_TYPE(grad_values.scalar_type() == accumulation_type(xa), "grad_values must be ",
                   accumulation_type(xa), "; got ", grad_values.scalar_type());
  TORCH_CHECK_VALUE(indices.sizes() == bhw, "indices must have shape ", bhw, "; got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64; got ", indices.scalar_type());
  const auto n = H * W;
  const auto idx = indices.contiguous();
  const int64_t* raw = idx.const_data_ptr<int64_t>();
  const bool in_range = std::all_of(raw, raw + idx.numel(), [n](int64_t q) { return q >= -1 && q < n; });
  TORCH_CHECK_VALUE(in_range, "indices must lie in [-1, H * W = ", n, ")");
  const auto g = grad_values.contiguous(), a = xa.contiguous(), b = xb.contiguous();
  const auto ra = scale_a.contiguous(), rb = scale_b.contiguous();
  auto grad_xa = at::empty_like(a), grad_xb = at::empty_like(b);
  auto grad_ra = at::empty_like(ra), grad_rb = at::empty_like(rb);
  const BackwardArgs args{dtype_of(a),
                          B, n, C,
                          g.const_data_ptr(),
                          a.const_data_ptr(),
                          b.const_data_ptr(),
                          ra.const_data_ptr(),
                          rb.const_data_ptr(),
                          idx.const_data_ptr<int64_t>(),
                          grad_xa.mutable_data_ptr(),
                          grad_xb.mutable_data_ptr(),
                          grad_ra.mutable_data_ptr(),
                          grad_rb.mutable_data_ptr()};
  kernel_table().backward(args);
  return {grad_xa, grad_xb, grad_ra, grad_rb};
}

std::string cpu_capability() {
  return kernel_table().capability;
}

}  // namespace salign
