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
//
// `decode_attention_qkv` is a decode-only layer's whole attention in one call: the rotary
// embedding of the new query and key heads, the new KV written into the cache, then the
// attention, read straight from the fused q/k/v product. In Python these were a dozen torch
// operations per layer (transposes, two index_copy_ writes, copies), about 50 us of a batch-1
// step's layer against the kernel's 10.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Where one pass's rows read their queries and contexts, and where their outputs go.
template <typename T>
struct DecodeRowsView {
  const T* queries;       // row r's query heads start at queries + r * query_stride
  int64_t query_stride;
  const T* keys;          // one layer of the cache, [slots, kv_heads, head_dim]
  const T* values;
  const int64_t* context_slots;  // [rows, max_context]
  const int64_t* lengths;        // [rows]
  int64_t rows, q_heads, kv_heads, head_dim, max_context;
  T* out;                 // [rows, q_heads, head_dim], contiguous
};

template <typename T>
void attend_rows(const DecodeRowsView<T>& view, double scale) {
  const int64_t q_heads = view.q_heads, head_dim = view.head_dim;
  const int64_t group = q_heads / view.kv_heads, slot_stride = view.kv_heads * head_dim;
  at::parallel_for(0, view.rows * q_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(view.max_context));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / q_heads, head = index % q_heads;
      const int64_t kv_offset = (head / group) * head_dim;
      attend_one<T>(view.queries + row * view.query_stride + head * head_dim,
                    view.keys + kv_offset, view.values + kv_offset,
                    view.context_slots + row * view.max_context, view.lengths[row], slot_stride,
                    head_dim / 16, static_cast<float>(scale), scores,
                    view.out + index * head_dim);
    }
  });
}

// The new tokens' query, key and value heads: row r's start at query + r * query_stride, ...
template <typename T>
struct NewHeads {
  T* query;
  T* key;
  const T* value;
  int64_t query_stride, key_stride, value_stride;
};

// Rotary embedding of row r's query and key heads (in place) and its key and value written to
// the cache at slot_mapping[r], for every row: the whole batch's new KV is in the cache before
// any row attends.
template <typename T>
void rotate_and_write(const NewHeads<T>& fresh, const DecodeRowsView<T>& view, const T* cos,
                      const T* sin, const int64_t* slot_mapping, T* keys, T* values) {
  const int64_t head_dim = view.head_dim, kv_width = view.kv_heads * head_dim;
  for (int64_t row = 0; row < view.rows; ++row) {
    T* key = fresh.key + row * fresh.key_stride;
    if (cos != nullptr) {
      pdserve::rotate_heads(fresh.query + row * fresh.query_stride, view.q_heads, head_dim,
                            cos + row * head_dim, sin + row * head_dim);
      pdserve::rotate_heads(key, view.kv_heads, head_dim, cos + row * head_dim,
                            sin + row * head_dim);
    }
    std::memcpy(keys + slot_mapping[row] * kv_width, key, kv_width * sizeof(T));
    std::memcpy(values + slot_mapping[row] * kv_width, fresh.value + row * fresh.value_stride,
                kv_width * sizeof(T));
  }
}

void check_context(const at::Tensor& context_slots, const at::Tensor& lengths, int64_t rows) {
  TORCH_CHECK(context_slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  context_slots.is_contiguous() && lengths.is_contiguous(),
              "decode_attention: slots and lengths must be contiguous int64");
  TORCH_CHECK(context_slots.dim() == 2 && context_slots.size(0) == rows && lengths.numel() == rows,
              "decode_attention: one row of slots and one length per query row");
  const int64_t max_context = context_slots.size(1);
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row)
    TORCH_CHECK(length[row] >= 1 && length[row] <= max_context,
                "decode_attention: lengths must be within 1..context_slots.size(1)");
}

void check_cache_layer(const at::Tensor& keys, const at::Tensor& values, at::ScalarType dtype,
                       int64_t head_dim) {
  TORCH_CHECK(keys.dim() == 3 && values.sizes() == keys.sizes() && keys.is_contiguous() &&
                  values.is_contiguous(),
              "decode_attention: keys/values contiguous [slots, kv_heads, dim]");
  TORCH_CHECK(keys.scalar_type() == dtype && values.scalar_type() == dtype,
              "decode_attention: query, keys and values must share one dtype");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "decode_attention: float32 or bfloat16 only");
  TORCH_CHECK(head_dim % 16 == 0 && head_dim / 16 <= kMaxChunks && keys.size(2) == head_dim,
              "decode_attention: head_dim must be a multiple of 16, at most 256, as the cache's");
}

template <typename T>
DecodeRowsView<T> view_of(const T* queries, int64_t query_stride, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& context_slots,
                          const at::Tensor& lengths, int64_t rows, int64_t q_heads,
                          at::Tensor& out) {
  return DecodeRowsView<T>{queries, query_stride, keys.data_ptr<T>(), values.data_ptr<T>(),
                           context_slots.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                           rows, q_heads, keys.size(1), keys.size(2), context_slots.size(1),
                           out.data_ptr<T>()};
}

template <typename T>
void attend_query(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& context_slots, const at::Tensor& lengths, double scale,
                  at::Tensor& out) {
  const int64_t rows = query.size(0), q_heads = query.size(1);
  attend_rows(view_of<T>(query.data_ptr<T>(), q_heads * query.size(2), keys, values,
                         context_slots, lengths, rows, q_heads, out),
              scale);
}

template <typename T>
void rotate_write_attend(at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                         const at::Tensor* cos, const at::Tensor* sin, at::Tensor& keys,
                         at::Tensor& values, const at::Tensor& slot_mapping,
                         const at::Tensor& context_slots, const at::Tensor& lengths,
                         double scale, at::Tensor& out) {
  const NewHeads<T> fresh{query.data_ptr<T>(), key.data_ptr<T>(), value.data_ptr<T>(),
                          query.stride(0),     key.stride(0),     value.stride(0)};
  const auto view = view_of<T>(fresh.query, fresh.query_stride, keys, values, context_slots,
                               lengths, query.size(0), query.size(1) / keys.size(2), out);
  rotate_and_write<T>(fresh, view, cos != nullptr ? cos->data_ptr<T>() : nullptr,
                      sin != nullptr ? sin->data_ptr<T>() : nullptr,
                      slot_mapping.data_ptr<int64_t>(), keys.data_ptr<T>(),
                      values.data_ptr<T>());
  attend_rows(view, scale);
}

}  // namespace

namespace pdserve {

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& context_slots,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(),
              "decode_attention: query contiguous [rows, heads, dim]");
  check_cache_layer(keys, values, query.scalar_type(), query.size(2));
  TORCH_CHECK(query.size(1) % keys.size(1) == 0, "decode_attention: head shapes do not match");
  check_context(context_slots, lengths, query.size(0));
  at::Tensor out = at::empty_like(query);
  if (query.scalar_type() == at::kFloat) {
    attend_query<float>(query, keys, values, context_slots, lengths, scale, out);
  } else {
    attend_query<c10::BFloat16>(query, keys, values, context_slots, lengths, scale, out);
  }
  return out;
}

at::Tensor decode_attention_qkv(at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                                const c10::optional<at::Tensor>& cos,
                                const c10::optional<at::Tensor>& sin, at::Tensor& keys,
                                at::Tensor& values, const at::Tensor& slot_mapping,
                                const at::Tensor& context_slots, const at::Tensor& lengths,
                                double scale) {
  const int64_t rows = query.size(0), head_dim = keys.dim() == 3 ? keys.size(2) : 0;
  check_cache_layer(keys, values, query.scalar_type(), head_dim);
  const int64_t kv_heads = keys.size(1), kv_width = kv_heads * head_dim;
  for (const at::Tensor* heads : std::initializer_list<const at::Tensor*>{&query, &key, &value})
    TORCH_CHECK(heads->dim() == 2 && heads->stride(1) == 1 && heads->size(0) == rows &&
                    heads->scalar_type() == query.scalar_type(),
                "decode_attention_qkv: query, key and value [rows, heads * dim] of one dtype, "
                "unit column stride");
  TORCH_CHECK(key.size(1) == kv_width && value.size(1) == kv_width,
              "decode_attention_qkv: key and value hold the cache's heads");
  TORCH_CHECK(query.size(1) % kv_width == 0,
              "decode_attention_qkv: query heads a multiple of the key heads");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_attention_qkv: cos and sin together");
  if (cos.has_value()) {
    for (const at::Tensor* table : {&*cos, &*sin})
      TORCH_CHECK(table->scalar_type() == query.scalar_type() && table->is_contiguous() &&
                      table->numel() == rows * head_dim,
                  "decode_attention_qkv: cos and sin contiguous [rows, head_dim] of qkv's dtype");
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == rows,
              "decode_attention_qkv: one int64 cache slot per row");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row)
    TORCH_CHECK(slot[row] >= 0 && slot[row] < keys.size(0),
                "decode_attention_qkv: cache slot out of range");
  check_context(context_slots, lengths, rows);
  at::Tensor out = at::empty({rows, query.size(1)}, query.options());
  const at::Tensor* cos_table = cos.has_value() ? &*cos : nullptr;
  const at::Tensor* sin_table = sin.has_value() ? &*sin : nullptr;
  if (query.scalar_type() == at::kFloat) {
    rotate_write_attend<float>(query, key, value, cos_table, sin_table, keys, values,
                               slot_mapping, context_slots, lengths, scale, out);
  } else {
    rotate_write_attend<c10::BFloat16>(query, key, value, cos_table, sin_table, keys, values,
                                       slot_mapping, context_slots, lengths, scale, out);
  }
  return out;
}

}  // namespace pdserve
