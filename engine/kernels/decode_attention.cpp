// One-token attention over the paged KV cache, for decode steps.
//
// Each row (a sequence's new token) has `q_heads` query heads; query head h reads KV head
// h / (q_heads / kv_heads) (grouped-query attention). Its context is `lengths[r]` tokens whose
// keys and values live at `context_slots[r, :]` of one layer of the cache
// (`[slots, kv_heads, head_dim]`): they are read in place, never gathered into a copy, and once
// for all the query heads that share them. Scores, softmax and the weighted sum of values are
// computed in fp32 (bf16 inputs are widened exactly; e^x by a vectorized polynomial within ~2
// ulp of expf); the output is rounded once to the query's dtype. Rows x key heads are spread
// over torch's threads. head_dim must be a multiple of 16 (checked; the Python side only calls
// it then).
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
#include <type_traits>
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

// e^x of each lane, for x <= 0 (scores minus their maximum): x = n ln2 + r, e^x = 2^n e^r with
// e^r from its degree-7 Taylor-like polynomial (Cephes' expf coefficients, within ~2 ulp of
// expf). Lanes below -87 give e^-87 (~1.6e-38), negligible beside the maximum's 1.
PDSERVE_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two so n * ln2_high is exact.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Each lane rounded to the nearest bf16 (ties to even) and widened back: what a probability
// becomes when it meets bf16 values. Inputs are finite.
PDSERVE_AVX512 inline __m512 round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(0xFFFF0000)));
}

// softmax numerators e^(score - max) of one query head's `length` scores, in place; returns
// their sum. bf16: the stored numerators are rounded to bf16 (as torch's CPU flash attention,
// probabilities meet values in the values' dtype); the sum is of the unrounded ones.
template <typename T>
PDSERVE_AVX512 float exponentiate(float* scores, int64_t length, float max_score) {
  const __m512 max_lanes = _mm512_set1_ps(max_score);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; t += 16) {
    const __mmask16 live = length - t >= 16 ? 0xFFFF : (__mmask16)((1u << (length - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + t), max_lanes));
    sum = _mm512_mask_add_ps(sum, live, sum, e);
    _mm512_mask_storeu_ps(scores + t, live, std::is_same<T, float>::value ? e : round_to_bf16(e));
  }
  return _mm512_reduce_add_ps(sum);
}

// How many tokens ahead the loops over a context ask for the next key or value: the slots are
// scattered over the cache (a block of 16 tokens at a time), so the hardware prefetcher cannot
// guess them.
constexpr int64_t kPrefetchDistance = 8;

template <typename T>
inline void prefetch_head(const T* head, int64_t bytes) {  // every cache line of [head, +bytes)
  const char* line = reinterpret_cast<const char*>(head);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(line + offset, _MM_HINT_T0);
}

// One head's `num_chunks` x 16 values from p, as fp32.
template <typename T>
PDSERVE_AVX512 inline void load_head(const T* p, int64_t num_chunks, __m512 (&chunk)[kMaxChunks]) {
  for (int64_t c = 0; c < num_chunks; ++c) chunk[c] = load16(p + 16 * c);
}

// Per-thread scratch of `attend_heads`: the query heads, their accumulators and scores.
// (query and acc hold 16 floats per chunk of each head, read and written as vectors.)
struct HeadScratch {
  std::vector<float> query, acc, scores, max_score, inverse_total;
  HeadScratch(int64_t heads, int64_t num_chunks, int64_t max_context)
      : query(heads * num_chunks * 16), acc(heads * num_chunks * 16),
        scores(heads * max_context), max_score(heads), inverse_total(heads) {}
};

// One row's query heads of `kv_count` consecutive key/value heads (`group` query heads each,
// consecutive too) over its context: each token's keys and values are read once, for every
// query head that uses them, and a token's heads are read together (one stretch of its slot).
template <typename T>
PDSERVE_AVX512 void attend_heads(const T* queries, int64_t kv_count, int64_t group,
                                 const T* keys, const T* values, const int64_t* slots,
                                 int64_t length, int64_t slot_stride, int64_t num_chunks,
                                 float scale, HeadScratch& scratch, T* out) {
  const int64_t heads = kv_count * group, head_dim = num_chunks * 16;
  float* query = scratch.query.data();
  float* acc = scratch.acc.data();
  float* scores = scratch.scores.data();
  float* max_score = scratch.max_score.data();
  for (int64_t i = 0; i < heads * num_chunks; ++i)
    _mm512_storeu_ps(query + 16 * i, load16(queries + 16 * i));
  for (int64_t h = 0; h < heads; ++h) max_score[h] = -std::numeric_limits<float>::infinity();
  const int64_t stretch_bytes = kv_count * head_dim * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < length; ++t) {
    if (t + kPrefetchDistance < length)
      prefetch_head(keys + slots[t + kPrefetchDistance] * slot_stride, stretch_bytes);
    for (int64_t kv = 0; kv < kv_count; ++kv) {
      __m512 chunk[kMaxChunks];
      load_head(keys + slots[t] * slot_stride + kv * head_dim, num_chunks, chunk);
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
        const float* q = query + h * head_dim;
        __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(q), chunk[0]);
        for (int64_t c = 1; c < num_chunks; ++c)
          dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), chunk[c], dot);
        const float score = _mm512_reduce_add_ps(dot) * scale;
        scores[h * length + t] = score;
        max_score[h] = std::max(max_score[h], score);
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    scratch.inverse_total[h] = 1.0f / exponentiate<T>(scores + h * length, length, max_score[h]);
  std::fill(acc, acc + heads * head_dim, 0.0f);
  for (int64_t t = 0; t < length; ++t) {
    if (t + kPrefetchDistance < length)
      prefetch_head(values + slots[t + kPrefetchDistance] * slot_stride, stretch_bytes);
    for (int64_t kv = 0; kv < kv_count; ++kv) {
      __m512 chunk[kMaxChunks];
      load_head(values + slots[t] * slot_stride + kv * head_dim, num_chunks, chunk);
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
        const __m512 weight = _mm512_set1_ps(scores[h * length + t]);
        float* a = acc + h * head_dim;
        for (int64_t c = 0; c < num_chunks; ++c)
          _mm512_storeu_ps(a + 16 * c,
                           _mm512_fmadd_ps(weight, chunk[c], _mm512_loadu_ps(a + 16 * c)));
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const __m512 inverse = _mm512_set1_ps(scratch.inverse_total[h]);
    for (int64_t c = 0; c < num_chunks; ++c)
      store16(out + h * head_dim + 16 * c,
              _mm512_mul_ps(_mm512_loadu_ps(acc + h * head_dim + 16 * c), inverse));
  }
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

// Every row's query heads over its context. One task per row when there are rows enough to
// keep the threads busy (each token's slot then read in one stretch), else one per (row,
// key/value head).
template <typename T>
void attend_rows(const DecodeRowsView<T>& view, double scale) {
  const int64_t q_heads = view.q_heads, head_dim = view.head_dim, kv_heads = view.kv_heads;
  const int64_t group = q_heads / kv_heads, slot_stride = kv_heads * head_dim;
  const int64_t kv_per_task = view.rows >= 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t tasks_per_row = kv_heads / kv_per_task;
  at::parallel_for(0, view.rows * tasks_per_row, 1, [&](int64_t begin, int64_t end) {
    HeadScratch scratch(kv_per_task * group, head_dim / 16, view.max_context);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / tasks_per_row;
      const int64_t first_kv = (index % tasks_per_row) * kv_per_task;
      const int64_t first_head = first_kv * group;
      attend_heads<T>(view.queries + row * view.query_stride + first_head * head_dim,
                      kv_per_task, group, view.keys + first_kv * head_dim,
                      view.values + first_kv * head_dim,
                      view.context_slots + row * view.max_context, view.lengths[row],
                      slot_stride, head_dim / 16, static_cast<float>(scale), scratch,
                      view.out + (row * q_heads + first_head) * head_dim);
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
