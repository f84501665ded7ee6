// The CPU implementations of the ops registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace salign {

std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a,
                                             const at::Tensor& scale_b, const std::optional<at::Tensor>& mask_a,
                                             const std::optional<at::Tensor>& mask_b, int64_t window, int64_t mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_symmetric_cpu(
    const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a, const at::Tensor& scale_b,
    const std::optional<at::Tensor>& mask_a, const std::optional<at::Tensor>& mask_b, int64_t window, int64_t mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& xa, const at::Tensor& xb, const at::Tensor& scale_a,
    const at::Tensor& scale_b, const at::Tensor& indices);

// The kernel variant in use: "DEFAULT", "AVX2" or "AVX512".
std::string cpu_capability();

}  // namespace salign
