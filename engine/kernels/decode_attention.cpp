// One-token attention over the paged KV cache, for decode steps.
//
// Each row (a sequence's new token) has `q_heads` query heads; query head h reads KV head
// h / (q_heads / kv_heads) (grouped-query attention). Its context is `lengths[r]` tokens whose
// keys and values live at `context_slots[r, :]` of one layer of the cache
// (`[slots, kv_heads, head_dim]`): they are read in place, never gathered into a copy. Scores,
// softmax and the weighted sum of values are computed in fp32 (bf16 inputs are widened
// exactly); the output is rounded once to the query's dtype. Rows x heads are spread over
// torch's threads. head_dim must be a multiple of 16 (checked; the Python side only calls it
// then).
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

#define PDSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

PDSERVE_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

PDSERVE_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  // bf16 -> fp32 is exact: the 16 bits become the high half of each fp32.
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

PDSERVE_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

PDSERVE_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (int i = 0; i < 16; ++i) p[i] = c10::BFloat16(lanes[i]);  // round to nearest even
}

constexpr int64_t kMaxChunks = 16;  // head_dim up to 256

template <typename T>
PDSERVE_AVX512 void attend_one(const T* q, const T* keys, const T* values, const int64_t* slots,
                               int64_t length, int64_t slot_stride, int64_t num_chunks,
                               float scale, std::vector<float>& scores, T* out) {
  __m512 query[kMaxChunks];
  for (int64_t c = 0; c < num_chunks; ++c) query[c] = load16(q + 16 * c);
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < length; ++t) {
    const T* key = keys + slots[t] * slot_stride;
    __m512 acc = _mm512_mul_ps(query[0], load16(key));
    for (int64_t c = 1; c < num_chunks; ++c) acc = _mm512_fmadd_ps(query[c], load16(key + 16 * c), acc);
    const float score = _mm512_reduce_add_ps(acc) * scale;
    scores[t] = score;
    max_score = std::max(max_score, score);
  }
  float total = 0.0f;
  for (int64_t t = 0; t < length; ++t) {
    scores[t] = std::exp(scores[t] - max_score);
    total += scores[t];
  }
  __m512 acc[kMaxChunks];
  for (int64_t c = 0; c < num_chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const T* value = values + slots[t] * slot_stride;
    // As torch's CPU flash attention: probabilities meet values in the values' dtype.
    const __m512 weight = _mm512_set1_ps(static_cast<float>(static_cast<T>(scores[t])));
    for (int64_t c = 0; c < num_chunks; ++c) acc[c] = _mm512_fmadd_ps(weight, load16(value + 16 * c), acc[c]);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / total);
  for (int64_t c = 0; c < num_chunks; ++c) store16(out + 16 * c, _mm512_mul_ps(acc[c], inverse));
}

template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                const at::Tensor& context_slots, const at::Tensor& lengths, double scale,
                at::Tensor& out) {
  const int64_t rows = query.size(0), q_heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = keys.size(1), group = q_heads / kv_heads;
  const int64_t max_context = context_slots.size(1);
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const int64_t* slots = context_slots.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const int64_t slot_stride = kv_heads * head_dim;
  at::parallel_for(0, rows * q_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(max_context));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / q_heads, head = index % q_heads;
      const int64_t kv_offset = (head / group) * head_dim;
      attend_one<T>(q + index * head_dim, k + kv_offset, v + kv_offset,
                    slots + row * max_context, length[row], slot_stride, head_dim / 16,
                    static_cast<float>(scale), scores, o + index * head_dim);
    }
  });
}

}  // namespace

namespace pdserve {

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& context_slots,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 3 && values.dim() == 3,
              "decode_attention: query [rows, heads, dim], keys/values [slots, kv_heads, dim]");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous() &&
                  context_slots.is_contiguous() && lengths.is_contiguous(),
              "decode_attention: contiguous inputs only");
  TORCH_CHECK(keys.scalar_type() == query.scalar_type() &&
                  values.scalar_type() == query.scalar_type(),
              "decode_attention: query, keys and values must share one dtype");
  TORCH_CHECK(context_slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "decode_attention: slots and lengths must be int64");
  const int64_t rows = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(head_dim % 16 == 0 && head_dim / 16 <= kMaxChunks,
              "decode_attention: head_dim must be a multiple of 16, at most 256");
  TORCH_CHECK(keys.size(2) == head_dim && query.size(1) % keys.size(1) == 0,
              "decode_attention: head shapes do not match");
  TORCH_CHECK(context_slots.dim() == 2 && context_slots.size(0) == rows && lengths.numel() == rows,
              "decode_attention: one row of slots and one length per query row");
  TORCH_CHECK(lengths.min().item<int64_t>() >= 1 &&
                  lengths.max().item<int64_t>() <= context_slots.size(1),
              "decode_attention: lengths must be within 1..context_slots.size(1)");
  at::Tensor out = at::empty_like(query);
  if (query.scalar_type() == at::kFloat) {
    attend_all<float>(query, keys, values, context_slots, lengths, scale, out);
  } else if (query.scalar_type() == at::kBFloat16) {
    attend_all<c10::BFloat16>(query, keys, values, context_slots, lengths, scale, out);
  } else {
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace pdserve
