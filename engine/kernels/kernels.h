// pdserve's native decode kernels: what bindings.cpp exposes to Python (engine.kernels).
#pragma once

#include <torch/extension.h>

#include <string>

namespace pdserve {

// y[M, N] = x[M, K] @ w[N, K]^T for few rows of x (skinny_gemm.cpp).
at::Tensor skinny_linear_f32(const at::Tensor& x, const at::Tensor& w);
at::Tensor skinny_linear_bf16(const at::Tensor& x, const at::Tensor& w);

// One-token attention of each row over its context in the paged cache (decode_attention.cpp).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& context_slots,
                            const at::Tensor& lengths, double scale);

// The AVX-512 features this CPU has, comma-separated: "avx512", "avx512bf16".
std::string supported_features();

}  // namespace pdserve
