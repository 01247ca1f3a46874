// A decode-only pass through every decoder layer in one call (the Llama family's layer, as
// engine/lean_forward.py runs it op by op): per layer the fused q/k/v product (+ bias), Qwen3's
// per-head q/k norms, `decode_attention_qkv`, the output product, the residual add fused into
// the RMSNorm, gate/up, SiLU * up, down, and the add fused into the next layer's RMSNorm.
//
// It calls the same kernels the op-by-op path calls, in the same order, so the two agree bit for
// bit; what it removes is the Python between them (about 30 us a layer: a tenth of a batch-1
// step of the 135M model) and, since the binding releases the GIL for the whole pass, the
// step's contention with its replica's event loop.
#include "kernels.h"

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

// One matrix product: panels (+ per-channel scales: int8 panels weight-only, uint8 panels
// w8a8) and an optional bias.
struct Projection {
  at::Tensor panels;
  std::optional<at::Tensor> scales, bias;
  int64_t columns = 0;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    if (scales.has_value() && panels.scalar_type() == at::kByte) {
      y = pdserve::panel_linear_w8a8(x, panels, *scales, columns);
    } else if (scales.has_value()) {
      y = pdserve::panel_linear_int8(x, panels, *scales, columns);
    } else if (x.scalar_type() == at::kFloat) {
      y = pdserve::panel_linear_f32(x, panels, columns);
    } else {
      y = pdserve::panel_linear_bf16(x, panels, columns);
    }
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
};

struct Layer {
  Projection qkv, o_proj, gate_up, down;
  int64_t q_at, k_at, v_at, q_width, kv_width, up_offset, mlp_width, head_dim;
  at::Tensor input_norm, post_norm;
  std::optional<at::Tensor> q_norm, k_norm;
  double input_eps, post_eps, q_eps, k_eps, scaling;
};

template <typename Map>
auto required(const Map& map, const std::string& key) {
  auto found = map.find(key);
  TORCH_CHECK(found != map.end(), "DecodeStack.add_layer: missing ", key);
  return found->second;
}

std::optional<at::Tensor> optional_tensor(const std::map<std::string, at::Tensor>& tensors,
                                          const std::string& key) {
  auto found = tensors.find(key);
  if (found == tensors.end()) return std::nullopt;
  return found->second;
}

Projection projection(const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, int64_t>& sizes, const std::string& name) {
  return Projection{required(tensors, name), optional_tensor(tensors, name + "_scales"),
                    optional_tensor(tensors, name + "_bias"), required(sizes, name + "_columns")};
}

// RMSNorm over each head of `x` [rows, heads * head_dim], written back into `x`.
void head_norm_(at::Tensor x, const at::Tensor& weight, double eps, int64_t head_dim) {
  const at::Tensor heads = x.reshape({-1, head_dim}).contiguous();
  x.copy_(pdserve::rms_norm(heads, weight, eps).view({x.size(0), -1}));
}

}  // namespace

namespace pdserve {

struct DecodeStack::Impl {
  std::vector<Layer> layers;
  at::Tensor final_norm;
  double final_eps = 0.0;
};

DecodeStack::DecodeStack() : impl_(std::make_shared<Impl>()) {}

void DecodeStack::add_layer(const std::map<std::string, at::Tensor>& tensors,
                            const std::map<std::string, int64_t>& sizes,
                            const std::map<std::string, double>& reals) {
  Layer layer{projection(tensors, sizes, "qkv"), projection(tensors, sizes, "o_proj"),
              projection(tensors, sizes, "gate_up"), projection(tensors, sizes, "down"),
              required(sizes, "q_at"), required(sizes, "k_at"), required(sizes, "v_at"),
              required(sizes, "q_width"), required(sizes, "kv_width"),
              required(sizes, "up_offset"), required(sizes, "mlp_width"),
              required(sizes, "head_dim"), required(tensors, "input_norm"),
              required(tensors, "post_norm"), optional_tensor(tensors, "q_norm"),
              optional_tensor(tensors, "k_norm"), required(reals, "input_eps"),
              required(reals, "post_eps"), reals.count("q_eps") ? reals.at("q_eps") : 0.0,
              reals.count("k_eps") ? reals.at("k_eps") : 0.0, required(reals, "scaling")};
  TORCH_CHECK(layer.q_norm.has_value() == layer.k_norm.has_value(),
              "DecodeStack.add_layer: q_norm and k_norm together");
  impl_->layers.push_back(std::move(layer));
}

void DecodeStack::set_final_norm(const at::Tensor& weight, double eps) {
  impl_->final_norm = weight;
  impl_->final_eps = eps;
}

int64_t DecodeStack::num_layers() const { return static_cast<int64_t>(impl_->layers.size()); }

at::Tensor DecodeStack::forward(at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                                const at::Tensor& context_slots, const at::Tensor& lengths) const {
  const auto& layers = impl_->layers;
  TORCH_CHECK(!layers.empty() && impl_->final_norm.defined(),
              "DecodeStack.forward: layers and the final norm first");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 &&
                  kv_cache.size(1) == static_cast<int64_t>(layers.size()),
              "DecodeStack.forward: kv_cache [2, layers, slots, kv_heads, head_dim]");
  at::Tensor normed = rms_norm(hidden, layers[0].input_norm, layers[0].input_eps);
  for (size_t index = 0; index < layers.size(); ++index) {
    const Layer& layer = layers[index];
    at::Tensor qkv = layer.qkv(normed);
    at::Tensor query = qkv.narrow(1, layer.q_at, layer.q_width);
    at::Tensor key = qkv.narrow(1, layer.k_at, layer.kv_width);
    const at::Tensor value = qkv.narrow(1, layer.v_at, layer.kv_width);
    if (layer.q_norm.has_value()) {
      head_norm_(query, *layer.q_norm, layer.q_eps, layer.head_dim);
      head_norm_(key, *layer.k_norm, layer.k_eps, layer.head_dim);
    }
    at::Tensor keys = kv_cache.select(0, 0).select(0, index);
    at::Tensor values = kv_cache.select(0, 1).select(0, index);
    const at::Tensor attended = decode_attention_qkv(query, key, value, cos, sin, keys, values,
                                                     slot_mapping, context_slots, lengths,
                                                     layer.scaling);
    normed = add_rms_norm_(hidden, layer.o_proj(attended), layer.post_norm, layer.post_eps);
    const at::Tensor activated = silu_mul(layer.gate_up(normed), layer.mlp_width, layer.up_offset);
    const bool is_last = index + 1 == layers.size();
    const at::Tensor& next_norm = is_last ? impl_->final_norm : layers[index + 1].input_norm;
    const double next_eps = is_last ? impl_->final_eps : layers[index + 1].input_eps;
    normed = add_rms_norm_(hidden, layer.down(activated), next_norm, next_eps);
  }
  return normed;
}

}  // namespace pdserve
