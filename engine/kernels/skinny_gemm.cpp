// Skinny matrix products for decode steps: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M small.
//
// A decode step multiplies a handful of rows by every weight matrix of the model: the time
// is the time to stream the weights from memory once. Each thread takes a contiguous range of
// output channels and walks its weight rows exactly once, four at a time, multiplying each
// group by every row of x (x stays in cache). Every output is one thread's dot product in a
// fixed order, so results do not depend on the number of threads.
//
// Built for AVX-512 (fp32: AVX512F; bf16: AVX512-BF16's dot-product instruction, fp32
// accumulation, one rounding to bf16 at the end). The Python side checks the CPU features
// before calling (`supported_features`, bindings.cpp).
#include "kernels.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

constexpr int64_t kRowsPerGroup = 4;     // rows of x per register block
constexpr int64_t kOutputsPerGroup = 4;  // weight rows per register block

#define PDSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define PDSERVE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// ---- fp32 ----------------------------------------------------------------------------------

template <int MB, int NB>
PDSERVE_AVX512 inline void dot_block(
    const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}


// ---- bf16 ----------------------------------------------------------------------------------

template <int MB, int NB>
PDSERVE_AVX512_BF16 inline void dot_block(
    const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((K - k) >= 32 ? ~0u : ((1u << (K - k)) - 1u));
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}


// ---- both dtypes ---------------------------------------------------------------------------
// Plain loops (no vector code of their own) around the dtype's `dot_block`.

// Every row of x against NB weight rows.
template <int NB, typename Elem>
void rows_against(const Elem* x, int64_t M, int64_t K, const Elem* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + kRowsPerGroup <= M; m += kRowsPerGroup)
    dot_block<kRowsPerGroup, NB>(x + m * K, K, w, K, y + m * N, N);
  switch (M - m) {
    case 3: dot_block<3, NB>(x + m * K, K, w, K, y + m * N, N); break;
    case 2: dot_block<2, NB>(x + m * K, K, w, K, y + m * N, N); break;
    case 1: dot_block<1, NB>(x + m * K, K, w, K, y + m * N, N); break;
    default: break;
  }
}

// Outputs [n_begin, n_end) for every row of x: one thread's share.
template <typename Elem>
void output_range(const Elem* x, int64_t M, int64_t K, const Elem* w, float* y, int64_t N,
                  int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kOutputsPerGroup <= n_end; n += kOutputsPerGroup)
    rows_against<kOutputsPerGroup>(x, M, K, w + n * K, y + n, N);
  for (; n < n_end; ++n) rows_against<1>(x, M, K, w + n * K, y + n, N);
}

}  // namespace

namespace pdserve {

// ---- entry points --------------------------------------------------------------------------

static void check_inputs(const at::Tensor& x, const at::Tensor& w, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "skinny_linear: x and w must be 2-D");
  TORCH_CHECK(x.scalar_type() == dtype && w.scalar_type() == dtype,
              "skinny_linear: x and w must both be ", dtype);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous inputs only");
  TORCH_CHECK(x.size(1) == w.size(1), "skinny_linear: x has ", x.size(1),
              " columns, w has ", w.size(1));
}

// Splits the output channels into one contiguous range per thread, in whole groups.
template <typename Fn>
static void for_each_output_range(int64_t N, Fn fn) {
  const int64_t groups = (N + kOutputsPerGroup - 1) / kOutputsPerGroup;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (groups + threads - 1) / threads);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    fn(begin * kOutputsPerGroup, std::min(N, end * kOutputsPerGroup));
  });
}

at::Tensor skinny_linear_f32(const at::Tensor& x, const at::Tensor& w) {
  check_inputs(x, w, at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_output_range(N, [&](int64_t begin, int64_t end) {
    output_range(xp, M, K, wp, yp, N, begin, end);
  });
  return y;
}

at::Tensor skinny_linear_bf16(const at::Tensor& x, const at::Tensor& w) {
  check_inputs(x, w, at::kBFloat16);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y32.data_ptr<float>();
  for_each_output_range(N, [&](int64_t begin, int64_t end) {
    output_range(xp, M, K, wp, yp, N, begin, end);
  });
  return y32.to(at::kBFloat16);  // one round-to-nearest-even per output
}

std::string supported_features() {
  std::string features;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    features += "avx512";
    if (__builtin_cpu_supports("avx512bf16")) features += ",avx512bf16";
  }
  return features;
}

}  // namespace pdserve
