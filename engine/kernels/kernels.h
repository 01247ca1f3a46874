// pdserve's native decode kernels: what bindings.cpp exposes to Python (engine.kernels).
#pragma once

#include <torch/extension.h>

#include <map>
#include <memory>
#include <string>

namespace pdserve {

// y[M, N] = x[M, K] @ w[N, K]^T on w packed in panels of `panel_width()` outputs
// (panel_gemm.cpp; the layout is engine.kernels.linear.pack_weight's).
int64_t panel_width();
at::Tensor panel_linear_f32(const at::Tensor& x, const at::Tensor& panels, int64_t N);
at::Tensor panel_linear_bf16(const at::Tensor& x, const at::Tensor& panels, int64_t N);
// int8 panels with one fp32 scale per output channel; x and y fp32 or bf16.
at::Tensor panel_linear_int8(const at::Tensor& x, const at::Tensor& panels,
                             const at::Tensor& scales, int64_t N);
// int8 x int8 (vnni_gemm.cpp, `model.quantization: w8a8`): panels of w + 128 as
// [panels, ceil(K / 4), width, 4] bytes, one fp32 scale per output channel; each row of x
// (fp32 or bf16) quantized to int8 with its own scale inside the call; y in x's dtype.
at::Tensor panel_linear_w8a8(const at::Tensor& x, const at::Tensor& panels,
                             const at::Tensor& scales, int64_t N);

// One-token attention of each row over its context in the paged cache (decode_attention.cpp).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& context_slots,
                            const at::Tensor& lengths, double scale);
// The same for a decode-only pass, from the new tokens' query, key and value heads (each
// [rows, heads * dim], rows may be strided: column slices of the fused q/k/v product): rotary
// embedding of the query and key heads in place (when cos/sin [rows, head_dim] are given), each
// row's key and value written to the layer's cache at slot_mapping[row], then every row
// attended. Returns [rows, q_heads * dim].
at::Tensor decode_attention_qkv(at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                                const c10::optional<at::Tensor>& cos,
                                const c10::optional<at::Tensor>& sin, at::Tensor& keys,
                                at::Tensor& values, const at::Tensor& slot_mapping,
                                const at::Tensor& context_slots, const at::Tensor& lengths,
                                double scale);

// Per-layer elementwise operations, rounded where transformers' modules round (layer_ops.cpp).
// rms_norm: LlamaRMSNorm of each row. add_rms_norm_: residual += addend, then its RMSNorm.
// rotary_: rotary embedding of each head of x [rows, heads * head_dim] (rows may be strided),
// in place, with cos/sin [rows, head_dim]. silu_mul: SiLU(gate) * up of gate_up's columns
// [0, width) and [up_offset, up_offset + width).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& addend, const at::Tensor& weight,
                         double eps);
void rotary_(at::Tensor& x, int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up, int64_t width, int64_t up_offset);

// Rotary embedding of `heads` consecutive heads of one row, in place, rounded as rotary_
// (layer_ops.cpp; shared with decode_attention_qkv).
void rotate_heads(float* row, int64_t heads, int64_t head_dim, const float* cos, const float* sin);
void rotate_heads(c10::BFloat16* row, int64_t heads, int64_t head_dim, const c10::BFloat16* cos,
                  const c10::BFloat16* sin);

// Every decoder layer of a decode-only pass in one call (decode_stack.cpp), on the kernels
// above: built once per model from each layer's weights, then `forward` per step. add_layer's
// tensors: qkv, o_proj, gate_up, down (packed panels; `<name>_scales` for int8, `<name>_bias`
// where the model has one), input_norm, post_norm (and q_norm, k_norm for Qwen3); sizes:
// <name>_columns, q_at, k_at, v_at, q_width, kv_width, up_offset, mlp_width, head_dim; reals:
// input_eps, post_eps, q_eps and k_eps (with q/k norms), scaling. forward: hidden [rows, hidden] (the
// residual stream, updated in place), cos/sin [rows, head_dim], the whole KV cache
// [2, layers, slots, kv_heads, head_dim], the new tokens' slots, the rows' context slots and
// lengths; returns the final RMSNorm of the last hidden states.
class DecodeStack {
 public:
  DecodeStack();
  void add_layer(const std::map<std::string, at::Tensor>& tensors,
                 const std::map<std::string, int64_t>& sizes,
                 const std::map<std::string, double>& reals);
  void set_final_norm(const at::Tensor& weight, double eps);
  int64_t num_layers() const;
  at::Tensor forward(at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                     const at::Tensor& context_slots, const at::Tensor& lengths) const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// The AVX-512 features this CPU has, comma-separated: "avx512", "avx512bf16", "avx512vnni".
std::string supported_features();

}  // namespace pdserve
