// Matrix products on weights packed in panels: y[M, N] = x[M, K] @ w[N, K]^T, any M.
//
// A decode step multiplies a handful of rows by every weight matrix of the model, so its time
// is the time to stream the weights from memory once; the CPU's prefetchers keep up only with
// a few sequential streams, and a row-major weight read several rows at a time defeats them
// (measured: half the bandwidth). So the loader packs each weight once into panels of
// kPanelWidth output channels with k outermost (`engine.kernels.linear.pack_weight`):
//
//   fp32: [panels, K, 96]          bf16: [panels, ceil(K / 2), 96, 2]  (k pairs, for dpbf16)
//   int8 (weight-only, `model.quantization: int8`): [panels, K, 96] and one fp32 scale per
//   output channel; fp32 or bf16 activations, each int8 widened exactly to fp32 in registers
//
// and a product walks each panel from start to end exactly once per tile of up to kTileRows
// rows of x: at each k it loads the panel's 96 weights (six vectors), broadcasts each row's
// x[k] and multiplies-adds into 96 outputs per row held in registers. No horizontal sums; the
// panel stays in L2 across the tiles of a long (prefill) input. Threads take contiguous
// ranges of panels.
//
// Every output is one dot product, summed over k in increasing order into one fp32
// accumulator (bf16: pairs of k per step; int8: times its scale at the end): the result
// depends neither on the number of threads nor on the number of rows in the batch. bf16
// outputs are rounded once, to nearest even, as torch's conversion does.
//
// Built for AVX-512 (fp32: AVX512F; bf16: AVX512-BF16's dot-product instruction). The Python
// side checks the CPU features before calling (`supported_features`). The panel vocabulary
// (width, masks, stores, tiles, threads) is panel_common.h's, shared with vnni_gemm.cpp.
#include "kernels.h"
#include "panel_common.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace {

using namespace pdserve::panels;  // NOLINT: the shared panel vocabulary

// ---- one register tile: ROWS rows of x against one panel -------------------------------------

template <int ROWS>
PDSERVE_AVX512 inline void zero_tile(__m512 (&acc)[ROWS][kVectors]) {
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_ps();
}

// The 16 weights at p as fp32: loaded (fp32) or widened exactly (int8).
PDSERVE_AVX512 inline __m512 weights_at(const float* p) { return _mm512_loadu_ps(p); }
PDSERVE_AVX512 inline __m512 weights_at(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline float x_at(const float* row, int64_t k) { return row[k]; }
inline float x_at(const c10::BFloat16* row, int64_t k) { return static_cast<float>(row[k]); }

// fp32 multiply-adds over a fp32 or int8 panel [K, kPanelWidth]; int8 outputs are then scaled
// (`scales` of the panel's channels; nullptr for fp32 weights).
template <int ROWS, typename Elem, typename Weight>
PDSERVE_AVX512 inline void tile_fma(const Elem* x, int64_t ldx, const Weight* panel, int64_t K,
                                    const float* scales, Elem* y, int64_t ldy,
                                    const PanelMasks& masks) {
  __m512 acc[ROWS][kVectors];
  zero_tile<ROWS>(acc);
  for (int64_t k = 0; k < K; ++k) {
    const Weight* weights = panel + k * kPanelWidth;
    __m512 w[kVectors];
    for (int v = 0; v < kVectors; ++v) w[v] = weights_at(weights + 16 * v);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xk = _mm512_set1_ps(x_at(x + r * ldx, k));
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(xk, w[v], acc[r][v]);
    }
  }
  if (scales != nullptr) {
    __m512 scale[kVectors];
    for (int v = 0; v < kVectors; ++v) scale[v] = _mm512_loadu_ps(scales + 16 * v);
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_mul_ps(acc[r][v], scale[v]);
  }
  for (int r = 0; r < ROWS; ++r) store_row(y + r * ldy, acc[r], masks);
}

// x[r, 2p] and x[r, 2p + 1] as one 32-bit lane, broadcast.
PDSERVE_AVX512_BF16 inline __m512bh pair_at(const c10::BFloat16* row, int64_t p) {
  int32_t pair;
  std::memcpy(&pair, row + 2 * p, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// The last pair of an odd K: x[r, K - 1] and 0.
PDSERVE_AVX512_BF16 inline __m512bh last_of_odd(const c10::BFloat16* row, int64_t K) {
  uint16_t last;
  std::memcpy(&last, row + K - 1, sizeof(last));
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(last));
}

template <int ROWS>
PDSERVE_AVX512_BF16 inline void pair_step(__m512 (&acc)[ROWS][kVectors], const c10::BFloat16* weights,
                                          const __m512bh (&xp)[ROWS]) {
  __m512bh w[kVectors];
  for (int v = 0; v < kVectors; ++v) w[v] = (__m512bh)_mm512_loadu_si512(weights + 32 * v);
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xp[r], w[v]);
}

template <int ROWS>
PDSERVE_AVX512_BF16 inline void tile_bf16(const c10::BFloat16* x, int64_t ldx,
                                          const c10::BFloat16* panel, int64_t K,
                                          c10::BFloat16* y, int64_t ldy, const PanelMasks& masks) {
  __m512 acc[ROWS][kVectors];
  zero_tile<ROWS>(acc);
  const int64_t full_pairs = K / 2;
  __m512bh xp[ROWS];
  for (int64_t p = 0; p < full_pairs; ++p) {
    for (int r = 0; r < ROWS; ++r) xp[r] = pair_at(x + r * ldx, p);
    pair_step<ROWS>(acc, panel + p * 2 * kPanelWidth, xp);
  }
  if (K % 2 != 0) {
    for (int r = 0; r < ROWS; ++r) xp[r] = last_of_odd(x + r * ldx, K);
    pair_step<ROWS>(acc, panel + full_pairs * 2 * kPanelWidth, xp);
  }
  for (int r = 0; r < ROWS; ++r) store_row(y + r * ldy, acc[r], masks);
}

// Weights of the activations' own dtype.
template <typename Elem>
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t N,
                        at::ScalarType dtype) {
  check_x(x);
  TORCH_CHECK(x.scalar_type() == dtype, "panel_linear: x must be ", dtype);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t panel_size = (std::is_same_v<Elem, float> ? K : 2 * ((K + 1) / 2)) * kPanelWidth;
  check_panels(panels, dtype, N, panel_size);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const Elem*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const Elem*>(panels.data_ptr());
  auto* yp = reinterpret_cast<Elem*>(y.data_ptr());
  for_each_panel(num_panels_for(N), [&](int64_t p) {
    const int64_t n = p * kPanelWidth;
    const PanelMasks masks = masks_for(N - n);
    const Elem* panel = wp + p * panel_size;
    for_each_tile(M, [&](auto rows, int64_t m) {
      if constexpr (std::is_same_v<Elem, float>) {
        tile_fma<decltype(rows)::value>(xp + m * K, K, panel, K, nullptr, yp + m * N + n, N,
                                        masks);
      } else {
        tile_bf16<decltype(rows)::value>(xp + m * K, K, panel, K, yp + m * N + n, N, masks);
      }
    });
  });
  return y;
}

template <typename Elem>
at::Tensor panel_linear_int8_as(const at::Tensor& x, const at::Tensor& panels,
                                const at::Tensor& scales, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t panel_size = K * kPanelWidth;
  check_panels(panels, at::kChar, N, panel_size);
  check_scales(scales, N, "panel_linear_int8");
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const Elem*>(x.data_ptr());
  const auto* wp = panels.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  auto* yp = reinterpret_cast<Elem*>(y.data_ptr());
  for_each_panel(num_panels_for(N), [&](int64_t p) {
    const int64_t n = p * kPanelWidth;
    const PanelMasks masks = masks_for(N - n);
    for_each_tile(M, [&](auto rows, int64_t m) {
      tile_fma<decltype(rows)::value>(xp + m * K, K, wp + p * panel_size, K, sp + n,
                                      yp + m * N + n, N, masks);
    });
  });
  return y;
}

}  // namespace

namespace pdserve {

int64_t panel_width() { return panels::kPanelWidth; }

at::Tensor panel_linear_f32(const at::Tensor& x, const at::Tensor& panels, int64_t N) {
  return panel_linear<float>(x, panels, N, at::kFloat);
}

at::Tensor panel_linear_bf16(const at::Tensor& x, const at::Tensor& panels, int64_t N) {
  return panel_linear<c10::BFloat16>(x, panels, N, at::kBFloat16);
}

at::Tensor panel_linear_int8(const at::Tensor& x, const at::Tensor& panels,
                             const at::Tensor& scales, int64_t N) {
  check_x(x);
  if (x.scalar_type() == at::kFloat) return panel_linear_int8_as<float>(x, panels, scales, N);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "panel_linear_int8: x must be fp32 or bf16");
  return panel_linear_int8_as<c10::BFloat16>(x, panels, scales, N);
}

std::string supported_features() {
  std::string features;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    features += "avx512";
    if (__builtin_cpu_supports("avx512bf16")) features += ",avx512bf16";
    if (__builtin_cpu_supports("avx512vnni")) features += ",avx512vnni";
  }
  return features;
}

}  // namespace pdserve
