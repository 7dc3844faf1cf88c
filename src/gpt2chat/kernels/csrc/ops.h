// The at::Tensor-level linear kernels, callable from any .cpp of the kernels library (all csrc/*.cpp are
// linked into one shared object, build.py): the same functions the `gpt2chat::linear_*` ops register as
// their CPU kernels, so C++ that strings several of them together (a fused decode step) calls them
// directly, without the dispatcher. Arguments, layouts and results are those of the ops
// (gpt2chat/kernels/__init__.py); `small_m_max` < 0 is the built-in default. Defined in linear.cpp
// (fp32 activations) and quantized.cpp (activations rounded to int8 blocks of 32).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace gpt2chat_kernels {

// weight fp32 [N, K] row-major
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t small_m_max);
// weight int16 (IEEE half bits) packed 4x8 [ceil(N/4), ceil(K/8), 4, 8]
at::Tensor linear_f16(const at::Tensor& x, const at::Tensor& weight, int64_t out_features,
                      const std::optional<at::Tensor>& bias, int64_t small_m_max);
// weight int8 packed 4x8, scale fp32 [N, ceil(K/32)]; fp32 activations (widening)
at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, int64_t small_m_max);
// as linear_i8, of x rounded to int8 blocks of 32 (integer products)
at::Tensor linear_i8_q8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const std::optional<at::Tensor>& bias, int64_t small_m_max);
// weight uint8 [ceil(N/4), ceil(K/32), 64] (pack_int4), scale int16 (fp16 bits) [ceil(N/4), ceil(K/32), 4]
at::Tensor linear_i4_q8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t out_features,
                        const std::optional<at::Tensor>& bias, int64_t small_m_max);

}  // namespace gpt2chat_kernels
