// Prefill attention over the paged KV cache: FlashAttention's tiling (stage 04) on the CPU.
//
// A prefill (or a chunk of one, stage 05, or the tail after a prefix-cache hit, stage 06) has
// Lq new queries at the end of a sequence of L tokens whose K/V are already in the cache. For
// each (KV head, tile of query rows) the kernel walks the sequence's blocks through its block
// table, as the decode kernel does, and never writes the [Lq, L] score matrix anywhere:
//
//   for each tile of TILE_KEYS keys (read in place, block by block):
//       Kt = the tile's K, transposed to [D, TILE_KEYS]      (so keys lie along the vector)
//       S  = Q_rows . Kt                                     [rows, TILE_KEYS], in registers
//       causal mask: query at position p sees keys <= p      (only tiles on the diagonal)
//       online softmax: m = max(m, rowmax S); O *= exp(m_old - m); l = l * ... + rowsum
//       O += exp(S - m) . V_tile                             [rows, D]
//   out = O / l
//
// The g query heads that share one KV head are processed together (their rows are stacked), so
// each K/V tile is read once per group. The two small matrix products per tile are one
// fixed-size register block (MR x NC accumulators, `micro_kernel`) that keeps its sums in vector
// registers while the depth streams past: the "micro-kernel" of a GEMM, not a call to one.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

// Measured on one AMD EPYC core (AVX-512), 8/4 heads of 64, 1,024-token prompt: 16 or 32 keys
// per tile, 128 rows per item were the best of 16/32/64 keys and 64/128/256 rows.
constexpr int64_t TILE_KEYS = 32;   // keys per tile: two AVX-512 vectors of float32
constexpr int64_t MR = 8;           // rows per micro-kernel call (8 x 32 = 16 accumulators)
constexpr int64_t NC = 32;          // columns per micro-kernel call (= TILE_KEYS)
constexpr int64_t TILE_ROWS = 128;  // query rows (g heads x positions) per work item
constexpr int64_t SMALL_ROWS = 2;   // rows of the micro-kernels for an item of 1-2 rows

// The one micro-kernel both tile products use, a GEMM's register block:
//
//   c[r, 0:NC] (+)= sum_k a[r, k] * b[k, 0:NC]      for NR rows r, k < depth
//
//   S  = Q . Kt:  a = Q rows (depth D),        b = Kt [D, TILE_KEYS],   c = S (set)
//   O += P . V:   a = P rows (depth n keys),   b = V [n, D] at column d0, c = O at d0 (add)
//
// NR x NC accumulators stay in vector registers while the depth streams past: each b vector is
// loaded once per k and reused by every row, each a element broadcast once. (Round 2 had a second
// kernel for P.V, 4 rows x 64 columns, whose V loads GCC folded into every FMA, one load per row:
// by perf it took 50% of the kernel's time against S = Q.Kt's 26% for the same FLOPs.)
#if defined(__AVX512F__)
template <int64_t NR, bool ACCUMULATE>
inline void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                         float* c, int64_t ldc) {
  constexpr int64_t V = NC / 16;  // vectors per row
  __m512 acc[NR][V];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t j = 0; j < V; ++j)
      acc[r][j] = ACCUMULATE ? _mm512_loadu_ps(c + r * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    __m512 bk[V];
    for (int64_t j = 0; j < V; ++j) bk[j] = _mm512_loadu_ps(b + k * ldb + 16 * j);
    for (int64_t r = 0; r < NR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * lda + k]);
      for (int64_t j = 0; j < V; ++j) acc[r][j] = _mm512_fmadd_ps(ar, bk[j], acc[r][j]);
    }
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t j = 0; j < V; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 has 16 vector registers of 8 floats, a quarter of AVX-512's 32 x 16: the NR x NC
// accumulators (32 vectors) do not fit, so the rows go two at a time (8 accumulators + 4 b
// vectors + a broadcast). Each b vector is loaded NR / 2 times instead of once, from L1.
template <int64_t NR, bool ACCUMULATE>
inline void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                         float* c, int64_t ldc) {
  constexpr int64_t V = NC / 8, R = 2;
  for (int64_t r0 = 0; r0 < NR; r0 += R) {
    __m256 acc[R][V];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < V; ++j)
        acc[r][j] = ACCUMULATE ? _mm256_loadu_ps(c + (r0 + r) * ldc + 8 * j) : _mm256_setzero_ps();
    for (int64_t k = 0; k < depth; ++k) {
      __m256 bk[V];
      for (int64_t j = 0; j < V; ++j) bk[j] = _mm256_loadu_ps(b + k * ldb + 8 * j);
      for (int64_t r = 0; r < R; ++r) {
        const __m256 ar = _mm256_set1_ps(a[(r0 + r) * lda + k]);
        for (int64_t j = 0; j < V; ++j) acc[r][j] = _mm256_fmadd_ps(ar, bk[j], acc[r][j]);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < V; ++j) _mm256_storeu_ps(c + (r0 + r) * ldc + 8 * j, acc[r][j]);
  }
}
#else
template <int64_t NR, bool ACCUMULATE>
inline void micro_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                         float* c, int64_t ldc) {
  float acc[NR][NC];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t j = 0; j < NC; ++j) acc[r][j] = ACCUMULATE ? c[r * ldc + j] : 0.f;
  for (int64_t k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    for (int64_t r = 0; r < NR; ++r) {
      const float ar = a[r * lda + k];
#pragma omp simd
      for (int64_t j = 0; j < NC; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t j = 0; j < NC; ++j) c[r * ldc + j] = acc[r][j];
}
#endif

// S[r, :] = q[r, :] . Kt for NR rows.
template <int64_t NR>
inline void qk_tile(const float* q, const float* kt, int64_t D, float* s) {
  micro_kernel<NR, false>(q, D, kt, TILE_KEYS, D, s, TILE_KEYS);
}

// o[r, :] += sum_c p[r, c] * v[c, :] for NR rows, NC columns of O at a time.
template <int64_t NR>
inline void pv_tile(const float* p, const float* v, int64_t n, int64_t D, float* o) {
  if (D % NC == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += NC) micro_kernel<NR, true>(p, TILE_KEYS, v + d0, D, n, o + d0, D);
    return;
  }
  for (int64_t c = 0; c < n; ++c) {  // any other head size: the same sum, through memory
    const float* vc = v + c * D;
    for (int64_t r = 0; r < NR; ++r) {
      const float pr = p[r * TILE_KEYS + c];
      float* orow = o + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] += pr * vc[d];
    }
  }
}

template <typename scalar_t>
void prefill_tile(scalar_t* out, const scalar_t* query, const scalar_t* key_cache,
                  const scalar_t* value_cache, const int64_t* block_table, int64_t seq_len,
                  int64_t num_queries, int64_t q_begin, int64_t q_end, int64_t kv_head,
                  int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t D,
                  float scale) {
  // Rows of this item: positions [q_begin, q_end) of the prompt's queries x the g heads of the
  // group, row = (position - q_begin) * g + i, padded to a multiple of MR.
  const int64_t group = num_heads / num_kv_heads, token_stride = num_kv_heads * D;
  const int64_t rows = (q_end - q_begin) * group;
  // A row's sums are the same sequence of FMAs in a micro-kernel of 2 rows as of 8, so an item
  // of 1-2 rows (one position of a 1- or 2-head group: the batch-invariant mode's decodes) takes
  // the 2-row kernels and computes no padding rows; bitwise the same results either way.
  const bool narrow = rows <= SMALL_ROWS;
  const int64_t padded = narrow ? SMALL_ROWS : (rows + MR - 1) / MR * MR;
  const int64_t first_pos = seq_len - num_queries;  // position of query 0
  std::vector<float> qf(padded * D, 0.f), o(padded * D, 0.f), m(padded, std::numeric_limits<float>::lowest()),
      l(padded, 0.f), s(padded * TILE_KEYS), kt(D * TILE_KEYS), v(TILE_KEYS * D);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = q_begin + r / group, h = kv_head * group + r % group;
    const scalar_t* src = query + (t * num_heads + h) * D;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]) * scale;
  }
  const int64_t last_key = first_pos + q_end - 1;  // the last row's position: no key beyond
  for (int64_t k0 = 0; k0 <= last_key; k0 += TILE_KEYS) {
    const int64_t n = std::min(TILE_KEYS, last_key + 1 - k0);
    // K tile transposed [D, TILE_KEYS] and V tile [TILE_KEYS, D], read through the block table
    for (int64_t c = 0; c < TILE_KEYS; ++c) {
      if (c < n) {
        const int64_t t = k0 + c;
        const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
        const scalar_t* kp = key_cache + slot * token_stride + kv_head * D;
        const scalar_t* vp = value_cache + slot * token_stride + kv_head * D;
        for (int64_t d = 0; d < D; ++d) {
          kt[d * TILE_KEYS + c] = static_cast<float>(kp[d]);
          v[c * D + d] = static_cast<float>(vp[d]);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d * TILE_KEYS + c] = 0.f;
      }
    }
    // the next tile's K and V rows, while this tile's products run (its blocks are anywhere in
    // the cache: without it the copy above waited on memory, 9% of the kernel by perf)
    for (int64_t c = 0; c < TILE_KEYS && k0 + TILE_KEYS + c <= last_key; ++c) {
      const int64_t t = k0 + TILE_KEYS + c;
      const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
      const char* kp = reinterpret_cast<const char*>(key_cache + slot * token_stride + kv_head * D);
      const char* vp = reinterpret_cast<const char*>(value_cache + slot * token_stride + kv_head * D);
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
        __builtin_prefetch(kp + b);
        __builtin_prefetch(vp + b);
      }
    }
    if (narrow) {
      qk_tile<SMALL_ROWS>(qf.data(), kt.data(), D, s.data());
    } else {
      for (int64_t r0 = 0; r0 < padded; r0 += MR)
        qk_tile<MR>(qf.data() + r0 * D, kt.data(), D, s.data() + r0 * TILE_KEYS);
    }
    // mask, online softmax: S becomes P = exp(S - m_new); O and l are rescaled to m_new
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first_pos + q_begin + r / group;
      const int64_t visible = std::min(n, pos - k0 + 1);  // keys k0 .. pos of this tile
      float* sr = s.data() + r * TILE_KEYS;
      if (visible <= 0) {
        for (int64_t c = 0; c < TILE_KEYS; ++c) sr[c] = 0.f;
        continue;
      }
      float mx = m[r];
      for (int64_t c = 0; c < visible; ++c) mx = std::max(mx, sr[c]);
      float correction = 1.f;
      if (mx > m[r]) {  // the running max moved: rescale what l and O hold (most tiles it does not)
        // 0 on the first tile (l and O are still 0; m starts at the lowest float, not -inf,
        // which -ffast-math does not promise to handle)
        correction = m[r] == std::numeric_limits<float>::lowest() ? 0.f : std::exp(m[r] - mx);
        m[r] = mx;
        float* orow = o.data() + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) orow[d] *= correction;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < TILE_KEYS; ++c) {
        const float p = c < visible ? std::exp(sr[c] - mx) : 0.f;
        sr[c] = p;
        sum += p;
      }
      l[r] = l[r] * correction + sum;
    }
    if (narrow) {
      pv_tile<SMALL_ROWS>(s.data(), v.data(), n, D, o.data());
    } else {
      for (int64_t r0 = 0; r0 < padded; r0 += MR)
        pv_tile<MR>(s.data() + r0 * TILE_KEYS, v.data(), n, D, o.data() + r0 * D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = q_begin + r / group, h = kv_head * group + r % group;
    scalar_t* dst = out + (t * num_heads + h) * D;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[r * D + d] * inv);
  }
}

}  // namespace

void paged_attention_prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_table,
                             int64_t seq_len, double scale) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes() && query.is_contiguous() &&
                  out.is_contiguous(),
              "out and query must be contiguous [Lq, Hq, D]");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes() &&
                  key_cache.scalar_type() == query.scalar_type(),
              "key_cache and value_cache must be contiguous [num_blocks, block_size, Hkv, D] of q's dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous(),
              "block_table must be contiguous int64");
  const int64_t num_queries = query.size(0), num_heads = query.size(1), D = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && num_heads % num_kv_heads == 0,
              "head_dim must match the cache's and Hq be a multiple of Hkv");
  TORCH_CHECK(num_queries >= 1 && num_queries <= seq_len &&
                  seq_len <= block_table.numel() * block_size,
              "need 1 <= Lq <= seq_len <= the block table's capacity; got Lq = ", num_queries,
              ", seq_len = ", seq_len);
  const int64_t* table = block_table.data_ptr<int64_t>();
  check_block_ids(table, seq_len, block_size, key_cache.size(0));
  const int64_t group = num_heads / num_kv_heads;
  const int64_t positions_per_item = std::max<int64_t>(1, TILE_ROWS / group);
  const int64_t tiles = (num_queries + positions_per_item - 1) / positions_per_item;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_prefill", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* kc = key_cache.data_ptr<scalar_t>();
    const scalar_t* vc = value_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Items: (KV head, query tile), head-major so that consecutive items read the same head's
    // K/V (it stays in L2); within a head, later tiles see more keys and go first.
    at::parallel_for(0, tiles * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t h = w / tiles, tile = tiles - 1 - w % tiles;
        const int64_t q0 = tile * positions_per_item;
        const int64_t q1 = std::min(num_queries, q0 + positions_per_item);
        prefill_tile(o, q, kc, vc, table, seq_len, num_queries, q0, q1, h, num_heads,
                     num_kv_heads, block_size, D, static_cast<float>(scale));
      }
    });
  });
}
