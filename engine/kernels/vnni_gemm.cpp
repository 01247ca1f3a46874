// int8 x int8 matrix products for `model.quantization: w8a8`: y[M, N] = x[M, K] @ w[N, K]^T with
// both sides in int8, on AVX512-VNNI's dot-product instruction (64 multiply-adds of bytes into
// 16 int32 sums per instruction: four times fp32's).
//
// Weights: int8 with one fp32 scale per output channel (as `model.quantization: int8`), packed
// in the panels of panel_common.h as [panels, ceil(K / 4), 96, 4] bytes holding w + 128 (the
// instruction multiplies unsigned by signed bytes). Activations: each row of x quantized when
// the product is called, to q = round(x / s) with s = max |x| / 127 (one scale per row: per
// token), and q's sum kept. Each output is then the exact integer sum over k of
// (w + 128) * q, minus 128 * sum(q), converted to fp32 and multiplied by s, then by w's scale,
// then rounded to bf16 where x is bf16. Integer sums have no order: the result depends neither
// on the threads nor on the batch (each row is quantized on its own).
#include "kernels.h"
#include "panel_common.h"

#include <vector>

namespace {

using namespace pdserve::panels;  // NOLINT: the shared panel vocabulary

#define PDSERVE_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// Rows of x quantized to int8, each padded with zeros to a multiple of 4 columns. The buffers
// are the calling thread's, reused from call to call (a decode step makes ~200 products).
struct QuantizedRows {
  int64_t stride = 0;            // bytes per row: 4 * ceil(K / 4)
  std::vector<int8_t> values;    // [M, stride]
  std::vector<float> scales;     // [M]: s of each row (0 for an all-zero row)
  std::vector<int32_t> sums;     // [M]: sum of each row's q

  void resize(int64_t M, int64_t K) {
    stride = 4 * ((K + 3) / 4);
    values.assign(static_cast<size_t>(M * stride), 0);
    scales.resize(static_cast<size_t>(M));
    sums.resize(static_cast<size_t>(M));
  }
};

// 16 elements of x from p as fp32 (bf16 widened exactly); lanes past `live` are 0.
PDSERVE_AVX512 inline __m512 load_x(const float* p, __mmask16 live) {
  return _mm512_maskz_loadu_ps(live, p);
}
PDSERVE_AVX512 inline __m512 load_x(const c10::BFloat16* p, __mmask16 live) {
  const __m256i raw = _mm256_maskz_loadu_epi16(live, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __mmask16 live_lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// One row: s = max |x| / 127, q = round(x / s) (ties to even, as torch.round), sum of q.
template <typename Elem>
PDSERVE_AVX512 void quantize_row(const Elem* row, int64_t K, int8_t* q, float& scale,
                                 int32_t& sum) {
  __m512 max_abs = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16)
    max_abs = _mm512_max_ps(max_abs, _mm512_abs_ps(load_x(row + k, live_lanes(K - k))));
  scale = _mm512_reduce_max_ps(max_abs) / 127.0f;
  sum = 0;
  if (!(scale > 0.0f)) return;  // an all-zero row: q = 0
  const __m512 divisor = _mm512_set1_ps(scale);
  __m512i sums = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 live = live_lanes(K - k);
    const __m512 levels = _mm512_roundscale_ps(_mm512_div_ps(load_x(row + k, live), divisor),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i clamped = _mm512_max_epi32(
        _mm512_min_epi32(_mm512_cvtps_epi32(levels), _mm512_set1_epi32(127)),
        _mm512_set1_epi32(-127));
    sums = _mm512_add_epi32(sums, clamped);
    _mm_mask_storeu_epi8(q + k, live, _mm512_cvtepi32_epi8(clamped));
  }
  sum = _mm512_reduce_add_epi32(sums);
}

template <typename Elem>
void quantize_rows(const Elem* x, int64_t M, int64_t K, QuantizedRows& rows) {
  rows.resize(M, K);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_row(x + r * K, K, rows.values.data() + r * rows.stride, rows.scales[r],
                   rows.sums[r]);
  });
}

template <int ROWS, typename Elem>
PDSERVE_AVX512_VNNI inline void tile_w8a8(const QuantizedRows& rows, int64_t m,
                                          const uint8_t* panel, const float* weight_scales,
                                          Elem* y, int64_t ldy, const PanelMasks& masks) {
  __m512i acc[ROWS][kVectors];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_si512();
  const int64_t quads = rows.stride / 4;
  const int8_t* x = rows.values.data() + m * rows.stride;
  for (int64_t k4 = 0; k4 < quads; ++k4) {
    const uint8_t* weights = panel + k4 * 4 * kPanelWidth;
    __m512i w[kVectors];
    for (int v = 0; v < kVectors; ++v) w[v] = _mm512_loadu_si512(weights + 64 * v);
    for (int r = 0; r < ROWS; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * rows.stride + 4 * k4, sizeof(quad));
      const __m512i xq = _mm512_set1_epi32(quad);
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], w[v], xq);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m512i offset = _mm512_set1_epi32(128 * rows.sums[m + r]);
    const __m512 row_scale = _mm512_set1_ps(rows.scales[m + r]);
    __m512 out[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], offset));
      out[v] = _mm512_mul_ps(_mm512_mul_ps(exact, row_scale),
                             _mm512_loadu_ps(weight_scales + 16 * v));
    }
    store_row(y + r * ldy, out, masks);
  }
}

template <typename Elem>
at::Tensor w8a8_as(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scales,
                   int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  // The calling thread's buffers, named by a plain reference: a lambda run on another thread
  // that named the thread_local itself would see that thread's own.
  thread_local QuantizedRows buffers;
  QuantizedRows& rows = buffers;
  quantize_rows(reinterpret_cast<const Elem*>(x.data_ptr()), M, K, rows);
  const int64_t panel_size = rows.stride * kPanelWidth;
  check_panels(panels, at::kByte, N, panel_size);
  check_scales(scales, N, "panel_linear_w8a8");
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* wp = panels.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  auto* yp = reinterpret_cast<Elem*>(y.data_ptr());
  for_each_panel(num_panels_for(N), [&](int64_t p) {
    const int64_t n = p * kPanelWidth;
    const PanelMasks masks = masks_for(N - n);
    for_each_tile(M, [&](auto tile_rows, int64_t m) {
      tile_w8a8<decltype(tile_rows)::value>(rows, m, wp + p * panel_size, sp + n,
                                            yp + m * N + n, N, masks);
    });
  });
  return y;
}

}  // namespace

namespace pdserve {

at::Tensor panel_linear_w8a8(const at::Tensor& x, const at::Tensor& panels,
                             const at::Tensor& scales, int64_t N) {
  check_x(x);
  if (x.scalar_type() == at::kFloat) return w8a8_as<float>(x, panels, scales, N);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "panel_linear_w8a8: x must be fp32 or bf16");
  return w8a8_as<c10::BFloat16>(x, panels, scales, N);
}

}  // namespace pdserve
