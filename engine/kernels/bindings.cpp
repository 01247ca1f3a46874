// The Python module of pdserve's native decode kernels (built by engine/kernels/native.py).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear_f32", &pdserve::skinny_linear_f32, "y = x @ w.T for fp32, few rows of x");
  m.def("skinny_linear_bf16", &pdserve::skinny_linear_bf16, "y = x @ w.T for bf16, few rows of x");
  m.def("decode_attention", &pdserve::decode_attention,
        "one-token attention of each row over its context in the paged KV cache");
  m.def("supported_features", &pdserve::supported_features, "AVX-512 features this CPU has");
}
