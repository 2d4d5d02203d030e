// Decode attention that reads K/V where they are: in the paged cache, through the block table.
//
// The `sdpa` backend copies each sequence's blocks into a dense [L, Hkv, D] tensor for SDPA
// (a gather), then SDPA reads the copy. Here each (sequence, KV head) pair walks its blocks in
// place and reads every cached K and V exactly once:
//
//   for each block b of the sequence (block_tables[s]), each token j in it:
//       k = key_cache[b, j, h]                       [D], contiguous
//       logit[i, t] = scale * q_i . k                for the g query heads i that share h
//   p = softmax(logit[i, :])                         per query head, over the L tokens
//   out_i = sum_t p[i, t] * value_cache[b, j, h]     second walk over the same blocks
//
// Work is split over (sequence, KV head) pairs: each reads its own K/V once, and the g query
// heads of a group reuse every K and V row while it is in L1 (GQA costs nothing extra).
// vLLM's CPU build does the same with hand-written AVX-512 (csrc/cpu/attention.cpp, then
// cpu_attn.cpp); this is the plain-loop version that the compiler vectorises over D.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace {

template <typename scalar_t>
void decode_one(scalar_t* out, const scalar_t* q, const scalar_t* key_cache,
                const scalar_t* value_cache, const int64_t* block_table, int64_t seq_len,
                int64_t block_size, int64_t head_begin, int64_t head_end, int64_t num_kv_heads,
                int64_t group, int64_t head_dim, float scale, std::vector<float>& buf) {
  // KV heads [head_begin, head_end) of one sequence; their query heads are consecutive in q/out.
  const int64_t D = head_dim, token_stride = num_kv_heads * D;
  const int64_t nh = (head_end - head_begin) * group;  // query heads handled here
  buf.resize(nh * D * 2 + nh * seq_len);
  float* qf = buf.data();        // [nh, D] the scaled queries, in float32
  float* acc = qf + nh * D;      // [nh, D] the weighted sum of V
  float* logits = acc + nh * D;  // [nh, L]
  for (int64_t i = 0; i < nh * D; ++i) {
    qf[i] = static_cast<float>(q[i]) * scale;
    acc[i] = 0.f;
  }
  // Pass 1: logits, block by block; a token's heads are one contiguous row of the block.
  for (int64_t t0 = 0; t0 < seq_len; t0 += block_size) {
    const int64_t n = std::min(block_size, seq_len - t0);
    const scalar_t* kb = key_cache + (block_table[t0 / block_size] * block_size * num_kv_heads + head_begin) * D;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < nh; ++i) {
        const scalar_t* k = kb + j * token_stride + (i / group) * D;
        const float* qi = qf + i * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * static_cast<float>(k[d]);
        logits[i * seq_len + t0 + j] = dot;
      }
    }
  }
  // Softmax of each query head's row (max subtracted: exp never overflows).
  for (int64_t i = 0; i < nh; ++i) {
    float* row = logits + i * seq_len;
    float mx = row[0];
    for (int64_t t = 1; t < seq_len; ++t) mx = std::max(mx, row[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < seq_len; ++t) {
      row[t] = std::exp(row[t] - mx);
      sum += row[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < seq_len; ++t) row[t] *= inv;
  }
  // Pass 2: the probabilities weight V, block by block.
  for (int64_t t0 = 0; t0 < seq_len; t0 += block_size) {
    const int64_t n = std::min(block_size, seq_len - t0);
    const scalar_t* vb = value_cache + (block_table[t0 / block_size] * block_size * num_kv_heads + head_begin) * D;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < nh; ++i) {
        const scalar_t* v = vb + j * token_stride + (i / group) * D;
        const float p = logits[i * seq_len + t0 + j];
        float* a = acc + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(v[d]);
      }
    }
  }
  for (int64_t i = 0; i < nh * D; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

}  // namespace

void paged_attention_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& query_rows,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "out and query must be [T, Hq, D]");
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous(), "query and out must be contiguous");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes(),
              "key_cache and value_cache must be contiguous [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "query, out and the caches must have one dtype");
  TORCH_CHECK(query_rows.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong &&
                  seq_lens.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  query_rows.is_contiguous() && seq_lens.is_contiguous(),
              "query_rows, block_tables and seq_lens must be contiguous int64");
  const int64_t num_seqs = query_rows.size(0);
  TORCH_CHECK(block_tables.size(0) == num_seqs && seq_lens.size(0) == num_seqs,
              "query_rows, block_tables and seq_lens need one row per sequence");
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_dim && num_heads % num_kv_heads == 0,
              "head_dim must match the cache's and Hq be a multiple of Hkv");
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t* rows = query_rows.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "seq_lens[", s, "] = ",
                lens[s], " does not fit its block table");
    check_block_ids(tables + s * max_blocks, lens[s], block_size, key_cache.size(0));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_decode", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* kc = key_cache.data_ptr<scalar_t>();
    const scalar_t* vc = value_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // One work item = one sequence's heads; split by KV head too when there are fewer
    // sequences than threads (a lone long decode still uses every core).
    const int64_t splits = num_seqs >= at::get_num_threads() ? 1 : num_kv_heads;
    at::parallel_for(0, num_seqs * splits, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;  // per thread: queries, accumulator, logits
      for (int64_t w = begin; w < end; ++w) {
        const int64_t s = w / splits, part = w % splits;
        const int64_t h0 = part * num_kv_heads / splits, h1 = (part + 1) * num_kv_heads / splits;
        const int64_t offset = (rows[s] * num_heads + h0 * group) * head_dim;
        decode_one(o + offset, q + offset, kc, vc, tables + s * max_blocks, lens[s], block_size,
                   h0, h1, num_kv_heads, group, head_dim, static_cast<float>(scale), buf);
      }
    });
  });
}
