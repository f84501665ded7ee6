// The CPU implementations of the ops registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace salign {

// Features (B, C, H, W) in any memory layout; see ops.cpp for the op schemas.
std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& feat_a, const at::Tensor& feat_b,
                                             const std::optional<at::Tensor>& mask_a,
                                             const std::optional<at::Tensor>& mask_b, int64_t window, int64_t mode,
                                             bool normalize);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_symmetric_cpu(
    const at::Tensor& feat_a, const at::Tensor& feat_b, const std::optional<at::Tensor>& mask_a,
    const std::optional<at::Tensor>& mask_b, int64_t window, int64_t mode, bool normalize);

std::tuple<at::Tensor, at::Tensor> match_backward_cpu(const at::Tensor& grad_values, const at::Tensor& feat_a,
                                                      const at::Tensor& feat_b, const at::Tensor& indices,
                                                      bool normalize);

// The kernel variant in use: "DEFAULT", "AVX2" or "AVX512".
std::string cpu_capability();

}  // namespace salign
