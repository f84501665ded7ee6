// The CPU implementations of the op family salign_kernels::match, match_symmetric, match_backward
// (schemas in salign_kernels/ops/_library.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <tuple>

namespace salign {

// Features (B, C, H, W) or (B, C, D, H, W) in any memory layout; window: empty for dense matching,
// else one size per spatial axis; mode 0 sliding, 1 partition.
std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& feat_a, const at::Tensor& feat_b,
                                             const std::optional<at::Tensor>& mask_a,
                                             const std::optional<at::Tensor>& mask_b, c10::IntArrayRef window,
                                             int64_t mode, bool normalize);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_symmetric_cpu(
    const at::Tensor& feat_a, const at::Tensor& feat_b, const std::optional<at::Tensor>& mask_a,
    const std::optional<at::Tensor>& mask_b, c10::IntArrayRef window, int64_t mode, bool normalize);

std::tuple<at::Tensor, at::Tensor> match_backward_cpu(const at::Tensor& grad_values, const at::Tensor& feat_a,
                                                      const at::Tensor& feat_b, const at::Tensor& indices,
                                                      bool normalize);

// The kernel variant in use: "DEFAULT", "AVX2" or "AVX512".
std::string cpu_capability();

}  // namespace salign
