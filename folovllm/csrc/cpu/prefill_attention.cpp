// Prefill attention over the paged KV cache: FlashAttention's tiling (stage 04) on the CPU.
//
// A prefill (or a chunk of one, stage 05, or the tail after a prefix-cache hit, stage 06) has
// Lq new queries at the end of a sequence of L tokens whose K/V are already in the cache. For
// each (KV head, tile of query rows) the kernel walks the sequence's blocks through its block
// table, as the decode kernel does, and never writes the [Lq, L] score matrix anywhere.
//
// The query rows lie along the vector lanes. The g query heads that share one KV head are
// stacked (row = position x g + head), so each K/V tile is read once per group, and Q is
// transposed once per work item; then every per-row number of the online softmax (its max, its
// sum, its rescaling) is one lane of a vector, and the softmax needs no horizontal reduction
// and no branch per row:
//
//   Qt = (Q * scale)^T                                  [D, rows], once per item, in panels
//   for each tile of TILE_KEYS keys (copied as float32, block by block through the block table):
//       for each panel of NC rows (NC = NV vectors of L lanes):
//           St = K_tile . Qt_panel                      [TILE_KEYS, NC]: row c = key c, all rows
//           causal mask: the row at position p sees keys <= p   (tiles on the diagonal only)
//           m_new = max(m, max over c of St[c])         lane-wise: one vector max per key
//           Pt = exp(St - m_new);  l = l * exp(m - m_new) + sum over c of Pt[c]
//           Ot_panel = Ot_panel * exp(m - m_new) + V_tile^T . Pt      [D, NC]
//   out = Ot^T / l
//
// With the keys along the vector instead (the previous kernel: S = Q . K^T, [rows, keys]) each
// row's max and sum over its keys were horizontal reductions, the running-max test a branch per
// row, and every K tile was transposed into [D, keys] once per work item (each K row of a
// 4,096-token prompt 32 times). Here K and V tiles are only copied (widened to float32), never
// transposed, and the one transpose is Q's, once per item.
//
// Both tile products are one fixed-size register block (`micro_kernel`, ROWS x NV vectors of
// accumulators) that keeps its sums in registers while the depth streams past: the
// "micro-kernel" of a GEMM, not a call to one.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

// --8<-- [start:vector_wrappers]
// The few vector operations the kernel uses, once per ISA; everything below is written once
// through them. L = float lanes per vector; MR = rows of a (keys for St, head dims for Ot) per
// micro-kernel call; a panel is at most NV_MAX vectors of query rows. MR x NV_MAX accumulators
// + NV_MAX b vectors + 1 broadcast must fit the vector registers (AVX-512: 32, AVX2: 16) with
// room to spare: on AVX2, 4 x 3 (12 + 3 + 1 = all 16) left GCC none, and the accumulator it
// spilled to the stack made the kernel 1.5-1.8x slower than 4 x 2.
#if defined(__AVX512F__)
constexpr int64_t L = 16, MR = 8, NV_MAX = 2;  // 16 accumulators, panels of 32 rows
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vround(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for an integer-valued n in [-126, 127]: n + 127 is the float's exponent field
inline vec vexp2i(vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// a <= b ? x : y, lane by lane
inline vec vselect_le(vec a, vec b, vec x, vec y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LE_OQ), y, x);
}
inline bool vany_gt(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
// v, in a register: GCC (-mtune=znver3) otherwise folds a loaded b vector into each of its
// ROWS FMAs as a memory operand, ROWS loads instead of one: the kernel ran 1.8x slower
inline vec vpinned(vec v) { asm("" : "+v"(v)); return v; }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t L = 8, MR = 4, NV_MAX = 2;  // 8 accumulators, panels of 16 rows
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vround(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vexp2i(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vec vselect_le(vec a, vec b, vec x, vec y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LE_OQ)); }
inline bool vany_gt(vec a, vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
inline vec vpinned(vec v) { asm("" : "+x"(v)); return v; }
#else  // no AVX2 (x86-64 builds have it; kept for other compilers): one float is a "vector"
constexpr int64_t L = 1, MR = 4, NV_MAX = 2;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vset1(float x) { return x; }
inline vec vbroadcast(const float* p) { return *p; }
inline vec vload(const float* p) { return *p; }
inline void vstore(float* p, vec v) { *p = v; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }  // std::fma is a library call without FMA
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vsub(vec a, vec b) { return a - b; }
inline vec vmax(vec a, vec b) { return std::max(a, b); }
inline vec vround(vec x) { return std::nearbyint(x); }
inline vec vexp2i(vec n) {
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline vec vselect_le(vec a, vec b, vec x, vec y) { return a <= b ? x : y; }
inline bool vany_gt(vec a, vec b) { return a > b; }
inline vec vpinned(vec v) { return v; }
#endif
// --8<-- [end:vector_wrappers]

// --8<-- [start:vexp]
// e^x for x <= 0 (the softmax only takes exp of a score minus its row's max), lane by lane, the
// same arithmetic in every lane (a row's result does not depend on its lane or its neighbours):
// e^x = 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two
// parts so that n ln 2 is exact), e^r by Cephes' degree-7 polynomial (about 1 ulp). Inputs below
// -87 give e^-87 (~1.6e-38, the smallest normal float's order) instead of a denormal or 0.
inline vec vexp(vec x) {
  x = vmax(x, vset1(-87.f));
  const vec n = vround(vmul(x, vset1(1.44269504088896341f)));
  vec r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vec p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.f)));  // 1 + r + r^2 (1/2 + r/6 + ...): e^0 = 1 exactly
  return vmul(p, vexp2i(n));
}
// --8<-- [end:vexp]

constexpr int64_t TILE_KEYS = 32;       // keys per tile
constexpr int64_t NC = NV_MAX * L;      // rows per panel (AVX2: 16, AVX-512: 32)
constexpr int64_t PANELS_PER_ITEM = 192 / NC;  // rows per work item: 192 (Qt and Ot: 192 KB at D = 128)

// A panel of NV vectors (the last panel of an item may be narrower) takes MR rows of a per call;
// a panel of one vector (an item of one position: a decode of the batch-invariant mode) 2 x MR,
// so that it still has 2 x MR independent accumulators to hide the FMA latency.
template <int64_t NV>
constexpr int64_t rows_per_call() { return NV == 1 ? 2 * MR : MR; }
static_assert(TILE_KEYS % (2 * MR) == 0, "a tile's keys come in whole micro-kernel calls");

// --8<-- [start:micro_kernel]
// The one micro-kernel both tile products use, a GEMM's register block (ROWS x NV vectors):
//
//   c[i, 0:NV*L] (+)= sum_k a(i, k) * b[k, 0:NV*L]      i < ROWS, k < depth,
//   a(i, k) = a[i * a_row + k * a_depth]
//
//   St  = K . Qt:    i = key, k = head dim:  a = K tile  [keys, D] (a_row = D, a_depth = 1),
//                    b = Qt panel [D, NC], c = St [keys, NC] (set)
//   Ot += V^T . Pt:  i = head dim, k = key:  a = V tile  [keys, D] (a_row = 1, a_depth = D),
//                    b = Pt [keys, NC], c = Ot panel [D, NC] (add)
//
// Each b vector is loaded once per k and reused by all ROWS; each a element is broadcast once
// per k and reused by all NV vectors. Every output lane is one sequential chain of FMAs over k,
// whatever ROWS and NV are: a row's result never depends on the shape of the call.
template <int64_t ROWS, int64_t NV, bool ACCUMULATE>
inline void micro_kernel(const float* a, int64_t a_row, int64_t a_depth, const float* b,
                         int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  vec acc[ROWS][NV];
#pragma GCC unroll 16
  for (int64_t i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int64_t j = 0; j < NV; ++j) acc[i][j] = ACCUMULATE ? vload(c + i * ldc + j * L) : vzero();
  for (int64_t k = 0; k < depth; ++k) {
    vec bk[NV];
#pragma GCC unroll 4
    for (int64_t j = 0; j < NV; ++j) bk[j] = vpinned(vload(b + k * ldb + j * L));
#pragma GCC unroll 16
    for (int64_t i = 0; i < ROWS; ++i) {
      const vec ai = vbroadcast(a + i * a_row + k * a_depth);
#pragma GCC unroll 4
      for (int64_t j = 0; j < NV; ++j) acc[i][j] = vfma(ai, bk[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int64_t i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int64_t j = 0; j < NV; ++j) vstore(c + i * ldc + j * L, acc[i][j]);
}
// --8<-- [end:micro_kernel]

// --8<-- [start:online_softmax]
// The online softmax of one panel over one tile, each lane one query row. st [TILE_KEYS, NC]
// holds the scores of keys k0 .. k0+n-1 and becomes Pt; m, l [NC] are the rows' running max
// and sum, ot [D, NC] their output so far. `causal`: some key of the tile lies after some row
// of the panel (pos [NC] = each row's position), so those scores are masked.
template <int64_t NV>
void online_softmax(float* st, int64_t n, int64_t k0, bool causal, const float* pos, float* m,
                    float* l, float* ot, int64_t D) {
  const vec lowest = vset1(std::numeric_limits<float>::lowest());
  for (int64_t j = 0; j < NV; ++j) {
    const vec row_pos = vload(pos + j * L), m_old = vload(m + j * L);
    vec m_new = m_old;  // m starts at the lowest float, not -inf (-ffast-math does not promise -inf)
    for (int64_t c = 0; c < n; ++c) {
      vec s = vload(st + c * NC + j * L);
      if (causal) s = vselect_le(vset1(static_cast<float>(k0 + c)), row_pos, s, lowest);
      m_new = vmax(m_new, s);
    }
    vec sum = vzero();
    for (int64_t c = 0; c < n; ++c) {
      vec s = vload(st + c * NC + j * L);
      if (causal) s = vselect_le(vset1(static_cast<float>(k0 + c)), row_pos, s, lowest);
      vec p = vexp(vsub(s, m_new));  // masked: e^-87, then exactly 0
      if (causal) p = vselect_le(vset1(static_cast<float>(k0 + c)), row_pos, p, vzero());
      vstore(st + c * NC + j * L, p);
      sum = vadd(sum, p);  // keys in order: a row's sum is the same whatever panel holds it
    }
    if (k0 == 0) {  // the first tile: l and O are still 0
      vstore(l + j * L, sum);
    } else {
      // exp(0) = 1 exactly: a lane whose max did not move is multiplied by 1, bitwise a no-op
      const vec correction = vexp(vsub(m_old, m_new));
      vstore(l + j * L, vfma(vload(l + j * L), correction, sum));
      if (vany_gt(m_new, m_old))  // most tiles move no row's max: O stays as it is
        for (int64_t d = 0; d < D; ++d) vstore(ot + d * NC + j * L, vmul(vload(ot + d * NC + j * L), correction));
    }
    vstore(m + j * L, m_new);
  }
}
// --8<-- [end:online_softmax]

// One tile of keys against one panel of NV vectors of query rows: St, the softmax, Ot.
// kt, vt: the tile's K and V rows [TILE_KEYS, D] (n of them valid).
template <int64_t NV>
void panel_step(const float* kt, const float* vt, int64_t n, int64_t k0, bool causal,
                const float* qt, float* ot, float* m, float* l, const float* pos, float* st, int64_t D) {
  constexpr int64_t R = rows_per_call<NV>();
  // St [keys, NC] = K [keys, D] . Qt [D, NC]; keys n .. the next multiple of R are computed on
  // the tile's stale rows and never read
  for (int64_t c0 = 0; c0 < n; c0 += R) micro_kernel<R, NV, false>(kt + c0 * D, D, 1, qt, NC, D, st + c0 * NC, NC);
  online_softmax<NV>(st, n, k0, causal, pos, m, l, ot, D);
  // Ot [D, NC] += V^T [D, keys] . Pt [keys, NC], R head dims at a time (any rest one by one)
  int64_t d0 = 0;
  for (; d0 + R <= D; d0 += R) micro_kernel<R, NV, true>(vt + d0, 1, D, st, NC, n, ot + d0 * NC, NC);
  for (; d0 < D; ++d0) micro_kernel<1, NV, true>(vt + d0, 1, D, st, NC, n, ot + d0 * NC, NC);
}

// What one thread's items work in, allocated once per thread and call: for up to `max_rows`
// query rows (whole panels) Qt and Ot [D, NC] per panel, m, l and positions [NC] per panel;
// one panel's scores St [TILE_KEYS, NC]; the K/V tile [TILE_KEYS, D] as float32.
struct Scratch {
  std::vector<float> qt, ot, pos, m, l, st, kt, vt;
  Scratch(int64_t max_rows, int64_t D)
      : qt(max_rows * D), ot(max_rows * D), pos(max_rows), m(max_rows), l(max_rows),
        st(TILE_KEYS * NC), kt(TILE_KEYS * D, 0.f), vt(TILE_KEYS * D, 0.f) {}
};

template <typename scalar_t>
void prefill_item(scalar_t* out, const scalar_t* query, const scalar_t* key_cache,
                  const scalar_t* value_cache, const int64_t* block_table, int64_t seq_len,
                  int64_t num_queries, int64_t q_begin, int64_t q_end, int64_t kv_head,
                  int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t D,
                  float scale, Scratch& w) {
  // Rows of this item: positions [q_begin, q_end) of the prompt's queries x the g heads of the
  // group, row = (position - q_begin) * g + i, in panels of NC rows; panel p holds its Qt and
  // Ot as [D, NC] at p * D * NC, its m, l and positions at p * NC (so row r is at r):
  //
  //   rows   0 .. NC-1        NC .. 2NC-1     ...  the last panel: its rows, then padding
  //   Qt     [D, NC] panel 0  [D, NC] panel 1 ...
  const int64_t group = num_heads / num_kv_heads, token_stride = num_kv_heads * D;
  const int64_t rows = (q_end - q_begin) * group, panels = (rows + NC - 1) / NC;
  const int64_t first_pos = seq_len - num_queries;  // position of query 0
  std::fill_n(w.qt.begin(), panels * D * NC, 0.f);
  std::fill_n(w.ot.begin(), panels * D * NC, 0.f);
  std::fill_n(w.m.begin(), panels * NC, std::numeric_limits<float>::lowest());
  for (int64_t r = 0; r < panels * NC; ++r)  // padding rows: the last row's position
    w.pos[r] = static_cast<float>(first_pos + q_begin + std::min(r, rows - 1) / group);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = q_begin + r / group, h = kv_head * group + r % group;
    const scalar_t* src = query + (t * num_heads + h) * D;
    float* dst = w.qt.data() + (r / NC) * D * NC + r % NC;
    for (int64_t d = 0; d < D; ++d) dst[d * NC] = static_cast<float>(src[d]) * scale;
  }
  // K/V row of token t of this KV head, through the block table
  auto row = [&](const scalar_t* cache, int64_t t) {
    return cache + (block_table[t / block_size] * block_size + t % block_size) * token_stride + kv_head * D;
  };
  const int64_t last_key = first_pos + q_end - 1;  // the last row's position: no key beyond
  for (int64_t k0 = 0; k0 <= last_key; k0 += TILE_KEYS) {
    const int64_t n = std::min(TILE_KEYS, last_key + 1 - k0);
    // --8<-- [start:kv_tile]
    // The tile's K and V rows [n, D], widened to float32 into one contiguous buffer. Read in
    // place instead, a float32 block's rows of one KV head lie Hkv * D floats apart (4 KiB for
    // Qwen3-0.6B), every row of a tile in the same L1 set: the products ran 1.4x slower. Copied
    // once per KV head (per thread) instead of once per item and tile: no faster, measured, and
    // a buffer as large as the context's K/V.
    for (int64_t c = 0; c < n; ++c) {
      const scalar_t *kp = row(key_cache, k0 + c), *vp = row(value_cache, k0 + c);
      for (int64_t d = 0; d < D; ++d) {
        w.kt[c * D + d] = static_cast<float>(kp[d]);
        w.vt[c * D + d] = static_cast<float>(vp[d]);
      }
    }
    // --8<-- [end:kv_tile]
    // the next tile's K and V rows, while this tile's products run (its blocks are anywhere in
    // the cache: without it the first reads of each row waited on memory)
    for (int64_t t = k0 + TILE_KEYS; t < std::min(k0 + 2 * TILE_KEYS, last_key + 1); ++t) {
      const char *kp = reinterpret_cast<const char*>(row(key_cache, t)),
                 *vp = reinterpret_cast<const char*>(row(value_cache, t));
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
        __builtin_prefetch(kp + b);
        __builtin_prefetch(vp + b);
      }
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t nv = std::min(NV_MAX, (rows - p * NC + L - 1) / L);  // vectors in use
      const float* pp = w.pos.data() + p * NC;
      // A tile wholly after the panel's last row adds exact zeros: skip it. (Rows of other
      // panels or items that do see it are unaffected: a row's numbers are its own lane's.)
      if (k0 > pp[nv * L - 1]) continue;
      const bool causal = k0 + n - 1 > pp[0];
      float *o = w.ot.data() + p * D * NC, *mp = w.m.data() + p * NC, *lp = w.l.data() + p * NC;
      const float* q = w.qt.data() + p * D * NC;
      if (nv == 2)
        panel_step<2>(w.kt.data(), w.vt.data(), n, k0, causal, q, o, mp, lp, pp, w.st.data(), D);
      else
        panel_step<1>(w.kt.data(), w.vt.data(), n, k0, causal, q, o, mp, lp, pp, w.st.data(), D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = q_begin + r / group, h = kv_head * group + r % group;
    scalar_t* dst = out + (t * num_heads + h) * D;
    const float* src = w.ot.data() + (r / NC) * D * NC + r % NC;
    const float inv = 1.f / w.l[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d * NC] * inv);
  }
}
static_assert(NV_MAX == 2, "prefill_item dispatches panels of 1 or 2 vectors");

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
  const int64_t positions_per_item = std::max<int64_t>(1, PANELS_PER_ITEM * NC / group);
  const int64_t tiles = (num_queries + positions_per_item - 1) / positions_per_item;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_prefill", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* kc = key_cache.data_ptr<scalar_t>();
    const scalar_t* vc = value_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Items: (KV head, query tile), head-major so that consecutive items read the same head's
    // K/V (it stays in L2); within a head, later tiles see more keys and go first.
    const int64_t max_rows = (std::min(positions_per_item, num_queries) * group + NC - 1) / NC * NC;
    at::parallel_for(0, tiles * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(max_rows, D);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t h = w / tiles, tile = tiles - 1 - w % tiles;
        const int64_t q0 = tile * positions_per_item;
        const int64_t q1 = std::min(num_queries, q0 + positions_per_item);
        prefill_item(o, q, kc, vc, table, seq_len, num_queries, q0, q1, h, num_heads,
                     num_kv_heads, block_size, D, static_cast<float>(scale), scratch);
      }
    });
  });
}
