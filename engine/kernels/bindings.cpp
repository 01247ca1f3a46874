// The Python module of pdserve's native decode kernels (built by engine/kernels/native.py).
//
// Every kernel releases the GIL while it runs, as torch's own operators do: a replica's event
// loop (token delivery, Ray's streaming, KV hand-offs) runs Python beside a step, instead of
// waiting for a kernel to end and then taking the GIL from the step's next Python line (each
// such switch cost a batch-1 step several milliseconds in a running decode replica).
#include "kernels.h"

#include <pybind11/stl.h>

namespace {
using ReleaseGil = pybind11::call_guard<pybind11::gil_scoped_release>;
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("panel_width", &pdserve::panel_width, "output channels per packed weight panel");
  m.def("panel_linear_f32", &pdserve::panel_linear_f32, ReleaseGil(),
        "y = x @ w.T, fp32, w packed in panels");
  m.def("panel_linear_bf16", &pdserve::panel_linear_bf16, ReleaseGil(),
        "y = x @ w.T, bf16, w packed in panels");
  m.def("panel_linear_int8", &pdserve::panel_linear_int8, ReleaseGil(),
        "y = x @ (w * scale).T, int8 w packed in panels, fp32 or bf16 x");
  m.def("panel_linear_w8a8", &pdserve::panel_linear_w8a8, ReleaseGil(),
        "y = x @ (w * scale).T with w and each row of x in int8 (VNNI), fp32 or bf16 x");
  m.def("decode_attention", &pdserve::decode_attention, ReleaseGil(),
        "one-token attention of each row over its context in the paged KV cache");
  m.def("decode_attention_qkv", &pdserve::decode_attention_qkv, ReleaseGil(),
        "rotary, KV write and one-token attention of a decode-only pass, from the fused q/k/v");
  m.def("rms_norm", &pdserve::rms_norm, ReleaseGil(), "LlamaRMSNorm of each row");
  m.def("add_rms_norm_", &pdserve::add_rms_norm_, ReleaseGil(),
        "residual += addend (in place), then RMSNorm");
  m.def("rotary_", &pdserve::rotary_, ReleaseGil(), "rotary embedding of each head, in place");
  m.def("silu_mul", &pdserve::silu_mul, ReleaseGil(), "SiLU(gate) * up");
  pybind11::class_<pdserve::DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<>())
      .def("add_layer", &pdserve::DecodeStack::add_layer, "one decoder layer's weights, in order")
      .def("set_final_norm", &pdserve::DecodeStack::set_final_norm, "the model's last RMSNorm")
      .def_property_readonly("num_layers", &pdserve::DecodeStack::num_layers)
      .def("forward", &pdserve::DecodeStack::forward, ReleaseGil(),
           "a decode-only pass through every layer; returns the final normed hidden states");
  m.def("supported_features", &pdserve::supported_features, "AVX-512 features this CPU has");
}
