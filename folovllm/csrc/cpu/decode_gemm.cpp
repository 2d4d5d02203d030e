// y = x W^T (+ b) on a weight re-laid out once at load for streaming: the linears of a decode step
// (1-16 rows, one per sequence), the LM head, and, on the same bytes, prefill.
//
// Why: at a few rows a linear does 2 flops per weight element and row, so a decode step reads
// every weight once and barely computes (Qwen3-0.6B in float32: 2.4 GB per step, ~0.1-0.2 s at
// this machine's bandwidth, against a few ms of arithmetic at batch 1). What matters is reading W
// once, as one sequential stream, and applying each piece of it to *every* row while it is in a
// register.
//
// The layout (`pack_decode_weight`, called once per layer by `process_weights_after_loading`):
//
//   weight [N, K]  ->  packed [ceil(N / 32), K, 32]: panel p holds outputs 32p .. 32p + 31,
//                      k-major, so one k is 32 consecutive floats (128 bytes, two cache lines);
//                      outputs past N are zero
//
// The kernel (threads split the panels, at::parallel_for), float32, by the number of rows M:
//
//   M = 1      one_row_f32: 3 panels (AVX-512: 6) side by side, k in lockstep, 12 accumulators:
//              three sequential streams in flight. One stream is what the hardware prefetcher
//              follows alone, and it tops out where a plain one-stream read does (AVX2 Zen 3:
//              ~21 GB/s); three reach 27-29 GB/s. No software prefetch (at one row it only costs:
//              up to 10-20% slower, measured at 1-16 KB ahead, t0/t1/t2/nta).
//   M = 2..16  decode_rows_f32: groups of 3 panels, k in blocks of 32 (4 KB of a panel), each
//              block run by every tile of R rows in turn (AVX-512: R = 8, 2 vectors of 16
//              outputs -> 16 accumulators; AVX2: R = 3 below), accumulators parked between
//              blocks; every tile prefetches a share of the block 2 ahead, so memory keeps
//              streaming while the FMA units work (at 8 rows a tile does 16-32 FMAs per 128
//              bytes of weight: bound by the FMA units, and the hardware prefetcher, which only
//              follows demand misses, stops after the first tile).
//   M > 16     prefill: per panel, tile_f32 over the whole K for each tile of R rows; the first
//              tile streams the panel, the next find it in L2 (K x 128 bytes: 128-384 KB at
//              Qwen3-0.6B's shapes); a tile prefetches 8 KB ahead into L2 (prefetcht1).
//
// AVX2 (16 registers of 8 floats; FOLOVLLM_CPU_ISA=avx2): the whole panel (4 vectors), 3 rows a
// tile, the panel's two halves of 16 outputs in turn within each k (12 accumulators + 2 weights
// + 1 broadcast): one pass over the panel's cache lines in order per tile (prefill's full tile
// holds the 3 broadcasts instead: 12 + 3 + 1 registers, fewer loads). The loops over rows
// and vectors are unrolled by pragma: without it GCC kept the accumulator array in memory and
// stored it every k (the old 6 x 16 tile ran at 40 GFLOP/s from L2, this one at ~100).
//
// bfloat16 weights (a model loaded with dtype=bfloat16) use panels of k pairs:
//
//   weight [N, K] bf16  ->  packed [ceil(N / 32), ceil(K / 2), 64]: row kk of a panel holds, for
//                           each of its 32 outputs n, (w[n, 2kk], w[n, 2kk + 1]) side by side
//
// which is the operand order of AVX512-BF16's `vdpbf16ps` (per fp32 lane: acc += a0 b0 + a1 b1):
// one instruction multiplies 16 outputs by a pair of x's k (a 32-bit broadcast of x[r, 2kk..]),
// 32 FMAs' worth, and reads half the bytes of float32. Without AVX512-BF16 (the portable path,
// FOLOVLLM_CPU_ISA=avx2) each load of pairs is widened to two float32 vectors by 16-bit shifts
// (a bf16 is the top half of a float32) and multiplied by FMAs in k order. Accumulation is float32
// either way, rounded to bf16 once at the end (what F.linear does in bf16 on CPU).
//
// An output's sum is always taken in the same order, k = 0, 1, ..., K-1 in its lane (bf16 with
// vdpbf16ps: pair by pair), whatever the number of rows in the call, the tile the row falls in, or
// the thread count: a row's result is bitwise the same alone or in a batch (what batch-invariant
// mode relies on).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <functional>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

using c10::BFloat16;

constexpr int64_t PANEL = 32;      // outputs per panel of the packed layout (both ISAs, both dtypes)
constexpr int64_t PF_BYTES = 8192;  // how far ahead a prefill tile (> DECODE_ROWS rows) prefetches
// float32 decode (decode_rows_f32 below): 2-16 rows go through GROUP panels side by side, k in
// blocks of KBLOCK (4 KB of a panel, in L1 across the row tiles), the weight prefetched
// PF_BLOCKS blocks ahead; past DECODE_ROWS rows (prefill) each panel is one pass per row tile.
constexpr int64_t DECODE_ROWS = 16;
constexpr int64_t GROUP = 3;
constexpr int64_t KBLOCK = 32;
constexpr int64_t PF_BLOCKS = 2;

#if defined(__AVX512F__)
constexpr int64_t L = 16;       // floats per vector
constexpr int64_t ROWS = 8;     // x rows per tile: 16 accumulators + 2 weights + 1 broadcast
using vec = __m512;
using ivec = __m512i;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline ivec vload_i(const void* p) { return _mm512_loadu_si512(p); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
// L bf16 pairs -> the float32 of the even (first) and odd (second) element of each pair
inline vec widen_even(ivec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline vec widen_odd(ivec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_srli_epi32(v, 16), 16)); }
constexpr _mm_hint PF_HINT = _MM_HINT_T1;  // into L2 (measured on AVX-512 with the 8-row tile)
#define FOLO_VECTOR 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t L = 8;
constexpr int64_t ROWS = 3;     // 3 rows x 4 vectors: 12 accumulators + 2 weights + 1 broadcast
using vec = __m256;
using ivec = __m256i;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline ivec vload_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec widen_even(ivec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline vec widen_odd(ivec v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(v, 16), 16)); }
constexpr _mm_hint PF_HINT = _MM_HINT_T0;  // into L1 (AVX2, Zen 3: T1 measured 2-8% slower)
#define FOLO_VECTOR 1
#endif

inline float to_float(float v) { return v; }
inline float to_float(BFloat16 v) { return static_cast<float>(v); }

#ifdef FOLO_VECTOR
constexpr int64_t V = PANEL / L;  // vectors per panel row: 2 (AVX-512) or 4 (AVX2)

inline void prefetch_ahead(const void* p) {
  const char* c = static_cast<const char*>(p) + PF_BYTES;
  _mm_prefetch(c, _MM_HINT_T1);
  _mm_prefetch(c + 64, _MM_HINT_T1);
}

// out[r, 0 .. cols) = acc[r] (+ bias), in the output's dtype (bf16: rounded to nearest even once)
template <int64_t R, typename T>
inline void store_rows(vec (&acc)[R][V], T* out, int64_t ldo, const T* bias, int64_t cols) {
  _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) {
    alignas(64) float row[PANEL];
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) vstore(row + v * L, acc[r][v]);
    T* o = out + r * ldo;
    for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<T>(row[j] + (bias ? to_float(bias[j]) : 0.f));
  }
}

// --8<-- [start:tile_f32]
// float32: out[r, 0 .. cols) = x[r, :] . w (+ bias) for R rows and one panel, w at its k = 0.
template <int64_t R>
inline void tile_f32(const float* w, int64_t K, const float* x, int64_t ldx, float* out, int64_t ldo,
                     const float* bias, int64_t cols) {
  vec acc[R][V];
  _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (R >= 2) prefetch_ahead(w + k * PANEL);
    if constexpr (V == 4 && R == 3) {
      // AVX2's full tile: the 3 broadcasts held (12 accumulators + 3 x + 1 weight = all 16
      // registers), each weight vector loaded once: 7 loads per 12 FMAs instead of 10, ~10% faster
      // where the tile is compute-bound (prefill, the panel in L2). Same FMAs, same order.
      vec xv[R];
      _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) xv[r] = vbroadcast(x + r * ldx + k);
      _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) {
        const vec wv = vload(w + k * PANEL + v * L);
        _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) acc[r][v] = vfma(xv[r], wv, acc[r][v]);
      }
      continue;
    }
    // two vectors of the panel row at a time, each applied to every row (AVX2: 2 halves)
    _Pragma("GCC unroll 16") for (int64_t h = 0; h < V; h += 2) {
      const vec w0 = vload(w + k * PANEL + h * L), w1 = vload(w + k * PANEL + (h + 1) * L);
      _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) {
        const vec xv = vbroadcast(x + r * ldx + k);
        acc[r][h] = vfma(xv, w0, acc[r][h]);
        acc[r][h + 1] = vfma(xv, w1, acc[r][h + 1]);
      }
    }
  }
  store_rows<R>(acc, out, ldo, bias, cols);
}
// --8<-- [end:tile_f32]

// --8<-- [start:one_row]
// One row against P panels side by side (P = 12 / V: 12 accumulators, AVX2 3 panels, AVX-512
// 6), k in lockstep: P sequential streams in flight at once, K x 128 bytes apart. One stream is
// what the hardware prefetcher follows by itself and tops out at what a plain one-stream read
// gets (~21 GB/s on the AVX2 Zen 3 here); three reach 27-29 GB/s (docs/performance.md).
// Each output is still one lane summed in k order: the same bits as tile_f32<R>.
template <int64_t P>
inline void one_row_f32(const float* w, int64_t K, const float* x, float* out, const float* bias,
                        int64_t cols_last) {
  vec acc[P][V];
  _Pragma("GCC unroll 16") for (int64_t q = 0; q < P; ++q)
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) acc[q][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    const vec xv = vbroadcast(x + k);
    _Pragma("GCC unroll 16") for (int64_t q = 0; q < P; ++q)
      _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v)
        acc[q][v] = vfma(xv, vload(w + q * K * PANEL + k * PANEL + v * L), acc[q][v]);
  }
  _Pragma("GCC unroll 16") for (int64_t q = 0; q < P; ++q) {
    vec (&row)[1][V] = *reinterpret_cast<vec(*)[1][V]>(&acc[q]);
    store_rows<1>(row, out + q * PANEL, 0, bias ? bias + q * PANEL : nullptr, q == P - 1 ? cols_last : PANEL);
  }
}
// --8<-- [end:one_row]

// R rows, one panel, k in [k0, k1): the accumulators come from and go back to acc_s ([R, 32]
// floats; stores and loads are exact, so the sum is the same as in one pass). `lines` cache lines
// of the weight are prefetched per k from pf (the block PF_BLOCKS ahead; see decode_rows_f32).
template <int64_t R>
inline void tile_f32_block(const float* w, int64_t k0, int64_t k1, const float* x, int64_t ldx,
                           float* acc_s, const char* pf, int64_t lines) {
  vec acc[R][V];
  _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) acc[r][v] = vload(acc_s + r * PANEL + v * L);
  for (int64_t k = k0; k < k1; ++k) {
    if (lines == 2) {
      _mm_prefetch(pf + (k - k0) * 128, PF_HINT);
      _mm_prefetch(pf + (k - k0) * 128 + 64, PF_HINT);
    } else if (lines == 1) {
      _mm_prefetch(pf + (k - k0) * 64, PF_HINT);
    }
    _Pragma("GCC unroll 16") for (int64_t h = 0; h < V; h += 2) {
      const vec w0 = vload(w + k * PANEL + h * L), w1 = vload(w + k * PANEL + (h + 1) * L);
      _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) {
        const vec xv = vbroadcast(x + r * ldx + k);
        acc[r][h] = vfma(xv, w0, acc[r][h]);
        acc[r][h + 1] = vfma(xv, w1, acc[r][h + 1]);
      }
    }
  }
  _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) vstore(acc_s + r * PANEL + v * L, acc[r][v]);
}

template <int64_t R>
inline void rest_f32_block(const float* w, int64_t k0, int64_t k1, const float* x, int64_t ldx, float* acc_s,
                           const char* pf, int64_t lines, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) tile_f32_block<R>(w, k0, k1, x, ldx, acc_s, pf, lines);
    else rest_f32_block<R - 1>(w, k0, k1, x, ldx, acc_s, pf, lines, m);
  }
}

// --8<-- [start:decode_rows]
// 2-16 rows against g_n <= GROUP panels (w: the first; they follow each other in memory):
//
//   for each block of KBLOCK k (4 KB of each panel):
//     for each panel of the group:            GROUP streams in flight, as one_row_f32's
//       for each tile of ROWS rows:           the first tile reads the block from memory, the
//         acc[tile] += x[tile, block] . w     others from L1; accumulators parked in acc_s
//
// At 8 rows this is bound by the FMA units (AVX2: 3 tiles, 32 FMAs per 128 bytes), so memory
// must keep streaming while they work: the hardware prefetcher only follows demand misses, which
// stop after the first tile, so every block asks for the one PF_BLOCKS ahead, one line per k
// from each of the first two tiles (two lines from a lone tile), spread over the block's work.
// (The whole-panel tiles this replaces streamed in the first tile and computed from L2 in the
// others, memory idle: 8 rows cost 2x one row on AVX2; now ~1.5x.)
inline void decode_rows_f32(const float* w, int64_t g_n, int64_t K, const float* x, int64_t M, float* out,
                            int64_t N, const float* bias, int64_t n0, const char* end) {
  alignas(64) float acc[GROUP * DECODE_ROWS * PANEL];  // [g_n, M, 32], 6 KB
  std::fill(acc, acc + g_n * M * PANEL, 0.f);
  const int64_t tiles = (M + ROWS - 1) / ROWS;
  for (int64_t k0 = 0; k0 < K; k0 += KBLOCK) {
    const int64_t k1 = std::min(K, k0 + KBLOCK);
    for (int64_t g = 0; g < g_n; ++g) {
      const float* wp = w + g * K * PANEL;
      float* a = acc + g * M * PANEL;
      const char* pf = reinterpret_cast<const char*>(wp + (k0 + PF_BLOCKS * KBLOCK) * PANEL);
      const bool ahead = pf + KBLOCK * PANEL * sizeof(float) <= end;  // past the last panel: nothing
      int64_t r = 0;
      for (int64_t t = 0; r < M; r += ROWS, ++t) {
        const int64_t lines = !ahead ? 0 : tiles == 1 ? 2 : t < 2 ? 1 : 0;
        rest_f32_block<ROWS>(wp, k0, k1, x + r * K, K, a + r * PANEL, pf + t * KBLOCK * 64, lines,
                             std::min(ROWS, M - r));
      }
    }
  }
  for (int64_t g = 0; g < g_n; ++g) {
    const int64_t c0 = n0 + g * PANEL, cols = std::min(PANEL, N - c0);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < cols; ++j)
        out[r * N + c0 + j] = acc[(g * M + r) * PANEL + j] + (bias ? bias[c0 + j] : 0.f);
  }
}
// --8<-- [end:decode_rows]

#if defined(__AVX512BF16__)
// --8<-- [start:tile_bf16]
// bf16 with vdpbf16ps: w a panel of k pairs [Kp][32][2], x rows of bf16 (2 Kp of them, zero past K).
template <int64_t R>
inline void tile_bf16(const BFloat16* w, int64_t Kp, const BFloat16* x, int64_t ldx, const float*,
                      BFloat16* out, int64_t ldo, const BFloat16* bias, int64_t cols) {
  vec acc[R][V];
  _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t kk = 0; kk < Kp; ++kk) {
    const BFloat16* wk = w + kk * 2 * PANEL;
    if constexpr (R >= 2) prefetch_ahead(wk);
    const __m512bh w0 = (__m512bh)vload_i(wk), w1 = (__m512bh)vload_i(wk + 2 * L);
    _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) {
      int32_t pair;  // (x[r, 2kk], x[r, 2kk + 1]) as one 32-bit lane
      std::memcpy(&pair, x + r * ldx + 2 * kk, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
    }
  }
  store_rows<R>(acc, out, ldo, bias, cols);
}
// --8<-- [end:tile_bf16]
#else
// bf16, portable: each load of L pairs widened to float32 (even k, then odd k), FMAs in k order;
// xf is x in float32 ([rows, 2 Kp], zero past K).
template <int64_t R>
inline void tile_bf16(const BFloat16* w, int64_t Kp, const BFloat16*, int64_t ldx, const float* xf,
                      BFloat16* out, int64_t ldo, const BFloat16* bias, int64_t cols) {
  vec acc[R][V];
  _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r)
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t kk = 0; kk < Kp; ++kk) {
    const BFloat16* wk = w + kk * 2 * PANEL;
    if constexpr (R >= 2) prefetch_ahead(wk);
    _Pragma("GCC unroll 16") for (int64_t v = 0; v < V; ++v) {
      const ivec pairs = vload_i(wk + v * 2 * L);
      const vec we = widen_even(pairs), wo = widen_odd(pairs);
      _Pragma("GCC unroll 16") for (int64_t r = 0; r < R; ++r) {
        acc[r][v] = vfma(vbroadcast(xf + r * ldx + 2 * kk), we, acc[r][v]);
        acc[r][v] = vfma(vbroadcast(xf + r * ldx + 2 * kk + 1), wo, acc[r][v]);
      }
    }
  }
  store_rows<R>(acc, out, ldo, bias, cols);
}
#endif

// All M rows against one panel: tiles of ROWS rows, then the remainder (fewer accumulators).
// x rows (and xf, the float32 copy bf16 uses without vdpbf16ps) are ldx apart.
template <int64_t R>
inline void rest_f32(const float* w, int64_t K, const float* x, int64_t ldx, float* o, int64_t N,
                     const float* bias, int64_t cols, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) tile_f32<R>(w, K, x, ldx, o, N, bias, cols);
    else rest_f32<R - 1>(w, K, x, ldx, o, N, bias, cols, m);
  }
}

inline void panel_rows(const float* w, int64_t K, const float* x, int64_t ldx, const float*, int64_t M,
                       float* out, int64_t N, const float* bias, int64_t cols) {
  int64_t r = 0;
  for (; r + ROWS <= M; r += ROWS) tile_f32<ROWS>(w, K, x + r * ldx, ldx, out + r * N, N, bias, cols);
  if (M > r) rest_f32<ROWS - 1>(w, K, x + r * ldx, ldx, out + r * N, N, bias, cols, M - r);
}

template <int64_t R>
inline void rest_bf16(const BFloat16* w, int64_t Kp, const BFloat16* x, int64_t ldx, const float* xf,
                      BFloat16* o, int64_t N, const BFloat16* bias, int64_t cols, int64_t m) {
  if constexpr (R > 0) {
    if (m == R) tile_bf16<R>(w, Kp, x, ldx, xf, o, N, bias, cols);
    else rest_bf16<R - 1>(w, Kp, x, ldx, xf, o, N, bias, cols, m);
  }
}

inline void panel_rows(const BFloat16* w, int64_t Kp, const BFloat16* x, int64_t ldx, const float* xf,
                       int64_t M, BFloat16* out, int64_t N, const BFloat16* bias, int64_t cols) {
  int64_t r = 0;
  for (; r + ROWS <= M; r += ROWS)
    tile_bf16<ROWS>(w, Kp, x + r * ldx, ldx, xf ? xf + r * ldx : nullptr, out + r * N, N, bias, cols);
  if (M > r)
    rest_bf16<ROWS - 1>(w, Kp, x + r * ldx, ldx, xf ? xf + r * ldx : nullptr, out + r * N, N, bias, cols, M - r);
}
#else  // no AVX2: plain loops (x86-64 builds need AVX2; kept for other compilers)
inline void panel_rows(const float* w, int64_t K, const float* x, int64_t ldx, const float*, int64_t M,
                       float* out, int64_t N, const float* bias, int64_t cols) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * ldx + k] * w[k * PANEL + j];
      out[r * N + j] = s + (bias ? bias[j] : 0.f);
    }
}

inline void panel_rows(const BFloat16* w, int64_t Kp, const BFloat16* x, int64_t ldx, const float*,
                       int64_t M, BFloat16* out, int64_t N, const BFloat16* bias, int64_t cols) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < 2 * Kp; ++k)
        s += static_cast<float>(x[r * ldx + k]) * static_cast<float>(w[(k / 2) * 2 * PANEL + 2 * j + k % 2]);
      out[r * N + j] = static_cast<BFloat16>(s + (bias ? static_cast<float>(bias[j]) : 0.f));
    }
}
#endif

}  // namespace

at::Tensor pack_decode_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "pack_decode_weight: expected a float32 or bfloat16 [N, K] weight, got ", weight.scalar_type(),
              " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + PANEL - 1) / PANEL;
  if (weight.scalar_type() == at::kFloat) {
    // [N, K] -> zero-padded [panels * 32, K] -> [panels, 32, K] -> [panels, K, 32]
    at::Tensor padded = at::zeros({panels * PANEL, K}, weight.options());
    padded.narrow(0, 0, N).copy_(weight);
    return padded.view({panels, PANEL, K}).transpose(1, 2).contiguous();
  }
  // bf16: [N, K] -> zero-padded [panels * 32, 2 Kp] -> [panels, 32, Kp, 2] -> [panels, Kp, 32, 2]
  // -> [panels, Kp, 64]
  const int64_t Kp = (K + 1) / 2;
  at::Tensor padded = at::zeros({panels * PANEL, 2 * Kp}, weight.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
  return padded.view({panels, PANEL, Kp, 2}).permute({0, 2, 1, 3}).contiguous().view({panels, Kp, 2 * PANEL});
}

namespace {

// Threads split the panels; `rows(begin, end)` computes every row of panels [begin, end).
template <typename F>
void for_each_panel_range(int64_t panels, int64_t panel_bytes, const F& rows) {
  // At least ~256 KB of weight per chunk of work: smaller ones cost more to hand out than they save.
  const int64_t grain = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(panel_bytes, 1));
  at::parallel_for(0, panels, grain, rows);
}

// ... or `rows(p, n0, cols)`, panel by panel.
template <typename F>
void for_each_panel(int64_t panels, int64_t N, int64_t panel_bytes, const F& rows) {
  for_each_panel_range(panels, panel_bytes, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * PANEL, cols = std::min<int64_t>(PANEL, N - n0);
      if (cols > 0) rows(p, n0, cols);
    }
  });
}

#ifdef FOLO_VECTOR
// One row, panels [begin, end): ONE_ROW_PANELS at a time, then the rest one by one.
constexpr int64_t ONE_ROW_PANELS = 12 / V;

template <int64_t P>
inline void one_row_rest(const float* w, int64_t K, const float* x, float* out, const float* bias,
                         int64_t cols_last, int64_t n) {
  if constexpr (P > 0) {
    if (n == P) one_row_f32<P>(w, K, x, out, bias, cols_last);
    else one_row_rest<P - 1>(w, K, x, out, bias, cols_last, n);
  }
}

inline void one_row_panels(const float* w, int64_t K, const float* x, float* out, int64_t N, const float* bias,
                           int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; p += ONE_ROW_PANELS) {
    const int64_t n = std::min(ONE_ROW_PANELS, end - p), n0 = p * PANEL;
    const int64_t cols_last = std::min<int64_t>(PANEL, N - (p + n - 1) * PANEL);
    one_row_rest<ONE_ROW_PANELS>(w + p * K * PANEL, K, x, out + n0, bias ? bias + n0 : nullptr, cols_last, n);
  }
}
#endif

}  // namespace

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias) {
  const bool bf16 = packed.scalar_type() == at::kBFloat16;
  const int64_t width = bf16 ? 2 * PANEL : PANEL;  // a panel row: 32 floats, or 32 pairs of bf16
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == width &&
                  (bf16 ? (x.size(1) + 1) / 2 : x.size(1)) == packed.size(1),
              "decode_linear: x must be [M, K] and the packed weight [N / 32, K, 32] (bfloat16: [N / 32, "
              "K / 2, 64]), got ", x.sizes(), " and ", packed.sizes());
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.scalar_type() == packed.scalar_type(),
              "decode_linear: float32 or bfloat16 only, x and weight alike, got ", x.scalar_type(), " and ",
              packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), "decode_linear: the packed weight must be contiguous");
  const int64_t N = out_features, panels = packed.size(0);
  TORCH_CHECK(N > (panels - 1) * PANEL && N <= panels * PANEL, "decode_linear: ", N,
              " outputs do not fit ", panels, " panels of ", PANEL);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "decode_linear: the bias must be contiguous [N] in x's dtype");
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (!bf16) {
    const at::Tensor xc = x.contiguous();
    const float* xp = xc.data_ptr<float>();
    const float* wp = packed.data_ptr<float>();
    const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
#ifdef FOLO_VECTOR
    if (M <= DECODE_ROWS) {  // decode: stream the weight (one_row_f32, decode_rows_f32)
      const char* end = reinterpret_cast<const char*>(wp + panels * K * PANEL);
      for_each_panel_range(panels, K * PANEL * 4, [&](int64_t begin, int64_t stop) {
        if (M == 1) return one_row_panels(wp, K, xp, op, N, b, begin, stop);
        for (int64_t p = begin; p < stop; p += GROUP)
          decode_rows_f32(wp + p * K * PANEL, std::min(GROUP, stop - p), K, xp, M, op, N, b, p * PANEL, end);
      });
      return out;
    }
#endif
    for_each_panel(panels, N, K * PANEL * 4, [&](int64_t p, int64_t n0, int64_t cols) {
      panel_rows(wp + p * K * PANEL, K, xp, K, nullptr, M, op + n0, N, b ? b + n0 : nullptr, cols);
    });
    return out;
  }
  // bf16: x rows of an even length 2 Kp (a zero past an odd K), and in float32 where the tile widens
  const int64_t Kp = packed.size(1), ldx = 2 * Kp;
  at::Tensor xc = x.contiguous();
  if (ldx != K) xc = at::constant_pad_nd(xc, {0, 1});
#if defined(FOLO_VECTOR) && !defined(__AVX512BF16__)
  const at::Tensor xf = xc.to(at::kFloat);
  const float* xfp = xf.data_ptr<float>();
#else
  const float* xfp = nullptr;
#endif
  const BFloat16* xp = xc.data_ptr<BFloat16>();
  const BFloat16* wp = packed.data_ptr<BFloat16>();
  const BFloat16* b = has_bias ? bias->data_ptr<BFloat16>() : nullptr;
  BFloat16* op = out.data_ptr<BFloat16>();
  for_each_panel(panels, N, Kp * 2 * PANEL * 2, [&](int64_t p, int64_t n0, int64_t cols) {
    panel_rows(wp + p * Kp * 2 * PANEL, Kp, xp, ldx, xfp, M, op + n0, N, b ? b + n0 : nullptr, cols);
  });
  return out;
}

// --8<-- [start:stream_read]
// The best case of reading memory, for benchmarks/roofline.py's bandwidth: the sum of a float32
// buffer with vector adds and nothing else, as `streams` chunks of STREAM_CHUNK bytes read side
// by side (1: one sequential pass; 3: what one_row_f32 does, panels K x 128 bytes apart); threads
// split the buffer. torch's `sum` reads ~2x slower on one thread (its reduction is not this
// loop), so it understates the limit.
namespace {

constexpr int64_t STREAM_CHUNK = 128 * 1024;  // bytes: a Qwen3-0.6B panel at K = 1,024

#ifdef FOLO_VECTOR
template <int64_t S>
double stream_sum(const float* p, int64_t spans) {
  constexpr int64_t chunk = STREAM_CHUNK / sizeof(float), span = S * chunk;
  return at::parallel_reduce(0, spans, 1, 0.0, [&](int64_t begin, int64_t end, double total) {
    vec acc[S][2];
    _Pragma("GCC unroll 16") for (int64_t j = 0; j < S; ++j) acc[j][0] = acc[j][1] = vzero();
    for (int64_t b = begin; b < end; ++b)
      for (int64_t i = 0; i < chunk; i += 4 * L)  // 128 bytes (two cache lines) of each stream per step
        _Pragma("GCC unroll 16") for (int64_t j = 0; j < S; ++j) {
          const float* q = p + b * span + j * chunk + i;
          acc[j][0] = vadd(acc[j][0], vadd(vload(q), vload(q + L)));
          acc[j][1] = vadd(acc[j][1], vadd(vload(q + 2 * L), vload(q + 3 * L)));
        }
    alignas(64) float lanes[L];
    for (int64_t j = 0; j < S; ++j) {
      vstore(lanes, vadd(acc[j][0], acc[j][1]));
      for (int64_t l = 0; l < L; ++l) total += lanes[l];
    }
    return total;
  }, std::plus<double>());
}
#endif

}  // namespace

double stream_read(const at::Tensor& buffer, int64_t streams) {
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous() && streams >= 1 && streams <= 4,
              "stream_read: a contiguous float32 buffer and 1-4 streams");
  const float* p = buffer.data_ptr<float>();
  const int64_t n = buffer.numel(), span = streams * STREAM_CHUNK / static_cast<int64_t>(sizeof(float));
  const int64_t spans = n / span;
  double total = 0.0;
#ifdef FOLO_VECTOR
  switch (streams) {
    case 1: total = stream_sum<1>(p, spans); break;
    case 2: total = stream_sum<2>(p, spans); break;
    case 3: total = stream_sum<3>(p, spans); break;
    default: total = stream_sum<4>(p, spans); break;
  }
#else
  for (int64_t i = 0; i < spans * span; ++i) total += p[i];
#endif
  for (int64_t i = spans * span; i < n; ++i) total += p[i];  // the tail past the last whole span
  return total;
}
// --8<-- [end:stream_read]
