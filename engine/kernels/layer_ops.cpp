// The small per-layer operations of a Llama-family forward, one call each instead of the five
// to ten torch operations (and Python lines) each takes: RMSNorm, the residual add fused into
// the next RMSNorm, rotary embedding in place, and SiLU(gate) * up.
//
// They round where transformers' modules round: every elementwise operation of a bf16 model
// is computed in fp32 and rounded to bf16 (to nearest even) before the next, as torch's bf16
// operations are; the RMSNorm's variance is a sum of fp32 squares. Products and sums are separate IEEE
// operations (this file is compiled for the baseline x86-64 target: no fused multiply-add), so
// fp32 results equal torch's bit for bit except the variance's summation order and expf's
// last bit.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

namespace {

// Rows per parallel task: a decode step's few rows run inline on the calling thread.
constexpr int64_t kRowGrain = 16;

inline float widen(float value) { return value; }
inline float widen(c10::BFloat16 value) { return static_cast<float>(value); }

// A result of an elementwise operation, rounded to the element type.
template <typename Elem>
inline float rounded(float value) {
  return static_cast<float>(static_cast<Elem>(value));
}

// LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), each step rounded.
template <typename Elem>
void norm_row(const Elem* x, const Elem* weight, int64_t hidden, double eps, Elem* out) {
  // Squares are rounded to fp32 as torch's pow is; their sum is kept in fp64, so it is within
  // a rounding of the exact sum whatever order torch's own reduction takes.
  double sum_sq = 0.0;
  for (int64_t i = 0; i < hidden; ++i) {
    const float value = widen(x[i]);
    sum_sq += static_cast<double>(value * value);
  }
  const float variance = static_cast<float>(sum_sq) / static_cast<float>(hidden);
  const float inv_rms = 1.0f / std::sqrt(variance + static_cast<float>(eps));
  for (int64_t i = 0; i < hidden; ++i) {
    const float normed = rounded<Elem>(widen(x[i]) * inv_rms);
    out[i] = static_cast<Elem>(widen(weight[i]) * normed);
  }
}

template <typename Elem>
at::Tensor add_rms_norm_impl(const at::Tensor& residual, const at::Tensor* addend,
                             const at::Tensor& weight, double eps) {
  const int64_t rows = residual.size(0), hidden = residual.size(1);
  at::Tensor out = at::empty_like(residual);
  auto* res = residual.data_ptr<Elem>();
  const Elem* add = addend != nullptr ? addend->data_ptr<Elem>() : nullptr;
  const Elem* w = weight.data_ptr<Elem>();
  Elem* y = out.data_ptr<Elem>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Elem* row = res + r * hidden;
      if (add != nullptr) {
        const Elem* extra = add + r * hidden;
        for (int64_t i = 0; i < hidden; ++i)
          row[i] = static_cast<Elem>(widen(row[i]) + widen(extra[i]));
      }
      norm_row(row, w, hidden, eps, y + r * hidden);
    }
  });
  return out;
}

// x * cos + rotate_half(x) * sin over each head of one row, in place.
template <typename Elem>
void rotate_row(Elem* row, int64_t heads, int64_t head_dim, const Elem* cos, const Elem* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    Elem* head = row + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float low = widen(head[i]), high = widen(head[i + half]);
      // rotate_half(x) = cat(-x[half:], x[:half]); negation is exact.
      const float new_low = rounded<Elem>(low * widen(cos[i])) +
                            rounded<Elem>(-high * widen(sin[i]));
      const float new_high = rounded<Elem>(high * widen(cos[i + half])) +
                             rounded<Elem>(low * widen(sin[i + half]));
      head[i] = static_cast<Elem>(new_low);
      head[i + half] = static_cast<Elem>(new_high);
    }
  }
}

template <typename Elem>
void rotary_impl(at::Tensor& x, int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t rows = x.size(0), heads = x.size(1) / head_dim, stride = x.stride(0);
  Elem* xp = x.data_ptr<Elem>();
  const Elem* cp = cos.data_ptr<Elem>();
  const Elem* sp = sin.data_ptr<Elem>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rotate_row(xp + r * stride, heads, head_dim, cp + r * head_dim, sp + r * head_dim);
  });
}

// SiLU(gate) * up, each rounded: torch's silu is x / (1 + exp(-x)) in fp32.
template <typename Elem>
at::Tensor silu_mul_impl(const at::Tensor& gate_up, int64_t width, int64_t up_offset) {
  const int64_t rows = gate_up.size(0), stride = gate_up.stride(0);
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const Elem* in = gate_up.data_ptr<Elem>();
  Elem* y = out.data_ptr<Elem>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Elem* gate = in + r * stride;
      const Elem* up = gate + up_offset;
      for (int64_t i = 0; i < width; ++i) {
        const float g = widen(gate[i]);
        const float act = rounded<Elem>(g / (1.0f + std::exp(-g)));
        y[r * width + i] = static_cast<Elem>(act * widen(up[i]));
      }
    }
  });
  return out;
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": a 2-D tensor with unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              what, ": float32 or bfloat16 only");
}

void check_like(const at::Tensor& x, const at::Tensor& other, const char* what) {
  TORCH_CHECK(other.scalar_type() == x.scalar_type() && other.is_contiguous(), what,
              ": contiguous, of the input's dtype");
}

}  // namespace

namespace pdserve {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(x.is_contiguous(), "rms_norm: contiguous input");
  check_like(x, weight, "rms_norm weight");
  // Without an addend, add_rms_norm_impl only reads x.
  if (x.scalar_type() == at::kFloat) return add_rms_norm_impl<float>(x, nullptr, weight, eps);
  return add_rms_norm_impl<c10::BFloat16>(x, nullptr, weight, eps);
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& addend, const at::Tensor& weight,
                         double eps) {
  check_rows(residual, "add_rms_norm_");
  TORCH_CHECK(residual.is_contiguous() && addend.sizes() == residual.sizes(),
              "add_rms_norm_: a contiguous residual and an addend of its shape");
  check_like(residual, addend, "add_rms_norm_ addend");
  check_like(residual, weight, "add_rms_norm_ weight");
  if (residual.scalar_type() == at::kFloat)
    return add_rms_norm_impl<float>(residual, &addend, weight, eps);
  return add_rms_norm_impl<c10::BFloat16>(residual, &addend, weight, eps);
}

void rotary_(at::Tensor& x, int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "rotary_");
  TORCH_CHECK(head_dim % 2 == 0 && x.size(1) % head_dim == 0, "rotary_: whole, even heads");
  check_like(x, cos, "rotary_ cos");
  check_like(x, sin, "rotary_ sin");
  TORCH_CHECK(cos.numel() == x.size(0) * head_dim && sin.numel() == cos.numel(),
              "rotary_: cos and sin of [rows, head_dim]");
  if (x.scalar_type() == at::kFloat) return rotary_impl<float>(x, head_dim, cos, sin);
  rotary_impl<c10::BFloat16>(x, head_dim, cos, sin);
}

at::Tensor silu_mul(const at::Tensor& gate_up, int64_t width, int64_t up_offset) {
  check_rows(gate_up, "silu_mul");
  TORCH_CHECK(up_offset >= width && gate_up.size(1) >= up_offset + width,
              "silu_mul: gate at column 0 and up at ", up_offset, ", ", width, " columns each");
  if (gate_up.scalar_type() == at::kFloat) return silu_mul_impl<float>(gate_up, width, up_offset);
  return silu_mul_impl<c10::BFloat16>(gate_up, width, up_offset);
}

void rotate_heads(float* row, int64_t heads, int64_t head_dim, const float* cos,
                  const float* sin) {
  rotate_row(row, heads, head_dim, cos, sin);
}

void rotate_heads(c10::BFloat16* row, int64_t heads, int64_t head_dim, const c10::BFloat16* cos,
                  const c10::BFloat16* sin) {
  rotate_row(row, heads, head_dim, cos, sin);
}

}  // namespace pdserve
