// --8<-- [start:header]
// One call per MoE layer: the experts of a batch, grouped, fused and combined (vLLM's CPU
// `fused_experts_cpu`, in plain loops). The torch versions beside it, in
// model_executor/layers/fused_moe.py: `moe_reference` (the lesson) and `fused_experts` (the same
// steps in torch, the portable fallback).
//
// Why one C++ call: the torch grouped path runs, per touched expert, two oneDNN GEMMs, a SiLU·mul
// and the slicing around them from Python; at decode a step touches ~100 experts per layer with
// one or two tokens each, so those fixed costs (and oneDNN's padding of 1-2 rows to 4) are a
// large part of the layer. Here the whole layer is four passes over flat buffers:
//
//   1. align    counting sort of the T*k (token, expert) pairs by expert (stable: token order
//               kept inside an expert's segment); a pair whose id is -1 (another rank's expert,
//               expert parallelism) is left out
//   2. permute  xs[s] = x[token of pair s] in float32                       [pairs, H]
//   3. gate|up  for each touched expert, each panel of 16 intermediate features:
//                 h[s, i] = silu(xs[s] . gate_i) * (xs[s] . up_i)            [pairs, Ipad]
//               gate and up of the same i sit side by side in the panel, so SiLU·mul is applied
//               in registers, in the same pass that streams the weights
//   4. down     for each touched expert, each panel of 32 outputs:
//                 ys[s, o] = w_s * (h[s] . down_o)                           [pairs, H]
//               (w_s: the pair's routing weight, applied as the row is stored)
//   5. combine  out[t] = sum over t's k slots of ys[s(t, j)], in slot order  [T, H]
//               (each token's row is written by one thread: no atomics, and the sum's order does
//               not depend on the threads)
//
// Threads (at::parallel_for) split passes 3 and 4 over (expert, panel) pairs: every item streams
// one panel of one expert's weights once and writes rows no other item writes.
//
// The layout (`prepack_moe_weight`, once per layer in process_weights_after_loading), weights
// float32 or bfloat16 (read as they are stored, widened to float32 in registers):
//
//   w13 [E, 2I, H]  ->  w13p [E, Ipad/16, H, 32]   panel p, row k = A | B with A = gate, B = up
//                                                  of features 16p .. 16p+15, at input k
//   w2  [E, H, I]   ->  w2p  [E, ceil(H/32), Ipad, 32]   panel p, row k = A | B with A = down
//                                                  of outputs 32p .. 32p+15, B = 32p+16 .. 32p+31
//
//   float32 rows are A0..A15 B0..B15; bfloat16 rows interleave them, A0 B0 A1 B1 ... A15 B15, so
//   that one load of 32 bf16 gives A (each 32-bit lane's low half shifted up) and B (its high
//   half, masked): two plain integer ops, no cross-lane widening.
//
//   Ipad = I rounded up to 16; padded features have zero gate and up (silu(0) * 0 = 0) and zero
//   down columns, padded outputs past H are never stored.
//
// Decode and prefill share one inner loop (`tile`: R rows, the panel's row k in registers,
// applied to every row) and differ in where the weights come from:
//   decode   an expert with 1-2 rows (AVX2; up to 8 on AVX-512): each tile streams the panel
//            straight from memory once, all 32 columns at a time (AVX2: 2 rows x 4 vectors),
//            bfloat16 widened in registers
//   prefill  more rows: k-blocked, as a GEMM is. A block of 128 panel rows (16 KB in float32) is
//            read once and stays in L1 while every tile of rows (AVX2: 3 rows x 4 vectors = 12
//            accumulators) goes over it; bfloat16 blocks are widened to float32 once, into a
//            scratch block, not once per tile. Partial sums wait in a per-thread [n, 32] buffer
//            between blocks.
// Each output is one FMA chain over k in order in both, stored and reloaded exactly between
// blocks: a token's result is bitwise the same whatever its expert's row count (tests).
// --8<-- [end:header]
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

constexpr int64_t MOE_PANEL = 32;  // values per panel row, both layouts
constexpr int64_t HALF = 16;       // w13: gate features per panel (then 16 up)

#if defined(__AVX512F__)
constexpr int64_t L = 16;    // floats per vector
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
// bf16 -> f32 is the 16 bits moved to the top of a 32-bit word: 2L interleaved bf16 A0 B0 A1 B1..
// are L 32-bit lanes; A is each lane shifted left by 16, B each lane with its low half cleared
inline void vload_bf16_pair(const uint16_t* p, vec& a, vec& b) {
  const __m512i raw = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t L = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vload_bf16_pair(const uint16_t* p, vec& a, vec& b) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else  // no AVX2 (x86-64 builds have it; kept for other compilers): one float is a "vector"
constexpr int64_t L = 1;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vbroadcast(const float* p) { return *p; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline void vstore(float* p, vec v) { *p = v; }
inline vec vload(const float* p) { return *p; }
inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void vload_bf16_pair(const uint16_t* p, vec& a, vec& b) {
  a = bf16_to_float(p[0]);
  b = bf16_to_float(p[1]);
}
#endif

constexpr int64_t NV = MOE_PANEL / L;  // vectors per panel row: 4 (AVX2), 2 (AVX-512)
constexpr int64_t NQ = NV / 2;          // of them in half A (then NQ in half B)
// Rows per tile, in registers: R rows x NV vectors of accumulators. AVX2: 2 x 4 read straight
// from the weights (decode: + 4 weights + 2 broadcasts of 16 registers), 3 x 4 from a block in
// L1 (prefill). AVX-512: 8 x 2 both ways (16 of 32 registers).
#if defined(__AVX512F__)
constexpr int64_t DIRECT_ROWS = 8, BLOCK_ROWS = 8;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t DIRECT_ROWS = 2, BLOCK_ROWS = 3;
#else
constexpr int64_t DIRECT_ROWS = 4, BLOCK_ROWS = 4;
#endif
constexpr int64_t KC = 128;  // inputs per block at prefill: 128 x 32 floats = 16 KB, in L1

// One panel row as NV float32 vectors: w[i] = columns i*L .. i*L+L-1 (A = columns 0..15, B =
// 16..31, so i < NQ is in A). bfloat16 rows interleave A and B (header): one load of 2L values
// gives A's vector q and B's vector q, widened by a shift and a mask.
inline void load_row(const float* row, vec w[NV]) {
  for (int64_t i = 0; i < NV; ++i) w[i] = vload(row + i * L);
}
inline void load_row(const uint16_t* row, vec w[NV]) {
  for (int64_t q = 0; q < NQ; ++q) vload_bf16_pair(row + 2 * q * L, w[q], w[NQ + q]);
}

// --8<-- [start:tile]
// out[r, 0..32) (+)= sum over k of x[r, k] * panel row k, for R rows (x row r at x + r * ldx):
// the one inner loop of both passes, R x NV accumulators in registers (`first`: start from zero,
// else from out's partial sums). Each column's sum is one FMA chain in k order, whatever R or
// the path (decode or prefill) that calls it, so a row's result never depends on the batch.
template <int64_t R, typename W>
inline void tile(const W* w, int64_t K, const float* x, int64_t ldx, float* out, bool first) {
  vec acc[R][NV];  // never passed by address: kept in registers
#pragma GCC unroll 16
  for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int64_t i = 0; i < NV; ++i) acc[r][i] = first ? vzero() : vload(out + r * MOE_PANEL + i * L);
  for (int64_t k = 0; k < K; ++k) {
    vec wv[NV];
    load_row(w + k * MOE_PANEL, wv);
#pragma GCC unroll 16
    for (int64_t r = 0; r < R; ++r) {
      const vec xv = vbroadcast(x + r * ldx + k);
#pragma GCC unroll 4
      for (int64_t i = 0; i < NV; ++i) acc[r][i] = vfma(xv, wv[i], acc[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int64_t r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int64_t i = 0; i < NV; ++i) vstore(out + r * MOE_PANEL + i * L, acc[r][i]);
}
// --8<-- [end:tile]

// Decode (a few rows): each tile streams the panel's K rows straight from memory, widened in
// registers. Prefill (many rows): the same sums, k-blocked. Block kb (KC rows of the panel,
// float32: 16 KB) is read from memory once and reused from L1 by every tile of rows; bfloat16
// blocks are widened once into `scratch`, not once per tile. Partial sums wait in out [n, 32]
// between blocks (stored and reloaded exactly: the chains are the decode path's).
inline const float* widen_block(const float* w, int64_t, float*) { return w; }  // read in place
inline const float* widen_block(const uint16_t* w, int64_t kc, float* scratch) {
  for (int64_t k = 0; k < kc; ++k) {
    vec wv[NV];
    load_row(w + k * MOE_PANEL, wv);
    for (int64_t i = 0; i < NV; ++i) vstore(scratch + k * MOE_PANEL + i * L, wv[i]);
  }
  return scratch;
}

// All n rows of one expert against one panel (K rows): out [n, 32] = x [n, K] . panel.
template <typename W>
void panel_rows(const W* w, int64_t K, const float* x, int64_t n, float* out, float* scratch) {
  if (n <= DIRECT_ROWS) {  // decode: one pass over the weights
    switch (n) {
#define FOLO_CASE(R) case R: tile<R>(w, K, x, K, out, true); break;
#if defined(__AVX512F__)
      FOLO_CASE(8) FOLO_CASE(7) FOLO_CASE(6) FOLO_CASE(5)
#endif
#if defined(__AVX512F__) || !(defined(__AVX2__) && defined(__FMA__))
      FOLO_CASE(4) FOLO_CASE(3)
#endif
      FOLO_CASE(2) FOLO_CASE(1)
#undef FOLO_CASE
      default: break;
    }
    return;
  }
  for (int64_t kb = 0; kb < K; kb += KC) {
    const int64_t kc = std::min(KC, K - kb);
    const float* blk = widen_block(w + kb * MOE_PANEL, kc, scratch);
    int64_t r = 0;
    for (; r + BLOCK_ROWS <= n; r += BLOCK_ROWS) tile<BLOCK_ROWS>(blk, kc, x + r * K + kb, K, out + r * MOE_PANEL, kb == 0);
    switch (n - r) {
#define FOLO_CASE(R) case R: tile<R>(blk, kc, x + r * K + kb, K, out + r * MOE_PANEL, kb == 0); break;
#if defined(__AVX512F__)
      FOLO_CASE(7) FOLO_CASE(6) FOLO_CASE(5) FOLO_CASE(4) FOLO_CASE(3)
#elif !(defined(__AVX2__) && defined(__FMA__))
      FOLO_CASE(3)
#endif
      FOLO_CASE(2) FOLO_CASE(1)
#undef FOLO_CASE
      default: break;
    }
  }
}

// h[j] = silu(gate_j) * up_j for one row's 16 features (g = its 32 sums: gate | up). One row per
// call, never inlined: a loop over rows could be vectorised across them, with another exp than
// a single row's, and a row's result would then depend on how many rows its expert got.
__attribute__((noinline)) void silu_and_mul_row(const float* g, float* h) {
  for (int64_t j = 0; j < HALF; ++j) h[j] = g[j] / (1.f + std::exp(-g[j])) * g[HALF + j];
}

// --8<-- [start:run_experts]
// Passes 3 and 4. Each (expert, panel) item computes its rows' 32 sums (panel_rows) into a
// per-thread buffer, then applies its epilogue: SiLU·mul of gate and up (pass 3), the routing
// weight (pass 4).
template <typename W>
void run_experts(const W* w13, const W* w2, const float* xs, float* h, float* ys,
                 const float* sorted_w, const std::vector<int64_t>& touched,
                 const std::vector<int64_t>& start, const std::vector<int64_t>& count, int64_t H,
                 int64_t Ipad, int64_t P13, int64_t P2) {
  const int64_t n_touched = static_cast<int64_t>(touched.size());
  int64_t n_max = 0;
  for (int64_t e : touched) n_max = std::max(n_max, count[e]);
  auto buffers = [&](std::vector<float>& out, std::vector<float>& scratch) {
    out.resize(n_max * MOE_PANEL);
    scratch.resize(KC * MOE_PANEL);
  };
  // Pass 3: (expert, panel of 16 features) items; each streams H x 32 weights once.
  at::parallel_for(0, n_touched * P13, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out, scratch;
    buffers(out, scratch);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = touched[item / P13], p = item % P13, s0 = start[e], n = count[e];
      panel_rows(w13 + (e * P13 + p) * H * MOE_PANEL, H, xs + s0 * H, n, out.data(), scratch.data());
      for (int64_t r = 0; r < n; ++r) silu_and_mul_row(out.data() + r * MOE_PANEL, h + (s0 + r) * Ipad + p * HALF);
    }
  });
  // Pass 4: (expert, panel of 32 outputs) items; each streams Ipad x 32 weights once.
  at::parallel_for(0, n_touched * P2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> out, scratch;
    buffers(out, scratch);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = touched[item / P2], p = item % P2, s0 = start[e], n = count[e];
      panel_rows(w2 + (e * P2 + p) * Ipad * MOE_PANEL, Ipad, h + s0 * Ipad, n, out.data(), scratch.data());
      const int64_t cols = std::min<int64_t>(MOE_PANEL, H - p * MOE_PANEL);  // the last panel may end early
      for (int64_t r = 0; r < n; ++r) {  // ys[s, 32p + c] = w_s * down_c
        const float* d = out.data() + r * MOE_PANEL;
        float* o = ys + (s0 + r) * H + p * MOE_PANEL;
        for (int64_t c = 0; c < cols; ++c) o[c] = d[c] * sorted_w[s0 + r];
      }
    }
  });
}
// --8<-- [end:run_experts]

}  // namespace

namespace {

// One expert's matrix into its panels, in place (prepack_moe_weight): out[p, k, c] = the value
// of panel column c at input k; `col(p, c)` gives the source row for column c (or -1: a padded
// zero), `slot(c)` where c sits in the panel row (bfloat16 interleaves the halves).
template <typename T, typename Col>
void pack_panels(const T* src, int64_t K_src, int64_t P, int64_t K, Col col, bool interleave, T* out) {
  for (int64_t p = 0; p < P; ++p) {
    T* panel = out + p * K * MOE_PANEL;
    for (int64_t c = 0; c < MOE_PANEL; ++c) {
      const int64_t row = col(p, c);
      const int64_t slot = interleave ? (c < HALF ? 2 * c : 2 * (c - HALF) + 1) : c;
      for (int64_t k = 0; k < K; ++k) panel[k * MOE_PANEL + slot] = (row >= 0 && k < K_src) ? src[row * K_src + k] : T(0);
    }
  }
}

template <typename T>
void pack_layer(const T* w13, const T* w2, int64_t E, int64_t I, int64_t H, int64_t P13, int64_t Ipad,
                int64_t P2, bool interleave, T* w13p, T* w2p) {
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      // w13[e] [2I, H]: column c of panel p is gate feature 16p + c (c < 16) or up feature 16p + c - 16
      pack_panels(w13 + e * 2 * I * H, H, P13, H, [&](int64_t p, int64_t c) -> int64_t {
        const int64_t f = p * HALF + (c % HALF);
        return f < I ? (c < HALF ? f : I + f) : -1;
      }, interleave, w13p + e * P13 * H * MOE_PANEL);
      // w2[e] [H, I]: column c of panel p is output 32p + c; inputs past I are zero
      pack_panels(w2 + e * H * I, I, P2, Ipad, [&](int64_t p, int64_t c) -> int64_t {
        const int64_t o = p * MOE_PANEL + c;
        return o < H ? o : -1;
      }, interleave, w2p + e * P2 * Ipad * MOE_PANEL);
    }
  });
}

}  // namespace

std::vector<at::Tensor> prepack_moe_weight(const at::Tensor& w13, const at::Tensor& w2) {
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) &&
                  w13.size(1) == 2 * w2.size(2) && w13.size(2) == w2.size(1),
              "prepack_moe_weight: expected w13 [E, 2I, H] and w2 [E, H, I], got ", w13.sizes(),
              " and ", w2.sizes());
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type() &&
                  (w13.scalar_type() == at::kFloat || w13.scalar_type() == at::kBFloat16),
              "prepack_moe_weight: float32 or bfloat16 weights, both the same, got ",
              w13.scalar_type(), " and ", w2.scalar_type());
  const int64_t E = w13.size(0), I = w2.size(2), H = w2.size(1);
  const int64_t P13 = (I + HALF - 1) / HALF, Ipad = P13 * HALF, P2 = (H + MOE_PANEL - 1) / MOE_PANEL;
  // Written one expert at a time into the final tensors: no layer-sized temporaries (a
  // Qwen3-30B-A3B layer is 2.4 GB in float32).
  const at::Tensor a = w13.contiguous(), b = w2.contiguous();
  at::Tensor w13p = at::empty({E, P13, H, MOE_PANEL}, a.options());
  at::Tensor w2p = at::empty({E, P2, Ipad, MOE_PANEL}, b.options());
  if (a.scalar_type() == at::kBFloat16)  // rows interleave their halves: A0 B0 A1 B1 .. (header)
    pack_layer(reinterpret_cast<const uint16_t*>(a.data_ptr<c10::BFloat16>()),
               reinterpret_cast<const uint16_t*>(b.data_ptr<c10::BFloat16>()), E, I, H, P13, Ipad, P2, true,
               reinterpret_cast<uint16_t*>(w13p.data_ptr<c10::BFloat16>()),
               reinterpret_cast<uint16_t*>(w2p.data_ptr<c10::BFloat16>()));
  else
    pack_layer(a.data_ptr<float>(), b.data_ptr<float>(), E, I, H, P13, Ipad, P2, false, w13p.data_ptr<float>(),
               w2p.data_ptr<float>());
  return {w13p, w2p};
}

at::Tensor fused_experts_cpu(const at::Tensor& hidden_states, const at::Tensor& w13p,
                             const at::Tensor& w2p, const at::Tensor& topk_weights,
                             const at::Tensor& topk_ids, int64_t intermediate_size) {
  TORCH_CHECK(hidden_states.dim() == 2 && topk_ids.dim() == 2 && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_ids.size(0) == hidden_states.size(0),
              "fused_experts_cpu: expected hidden_states [T, H], topk_weights and topk_ids [T, k], got ",
              hidden_states.sizes(), ", ", topk_weights.sizes(), ", ", topk_ids.sizes());
  TORCH_CHECK(hidden_states.scalar_type() == at::kFloat || hidden_states.scalar_type() == at::kBFloat16,
              "fused_experts_cpu: float32 or bfloat16 hidden_states, got ", hidden_states.scalar_type());
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_weights.scalar_type() == at::kFloat,
              "fused_experts_cpu: int64 topk_ids and float32 topk_weights, got ", topk_ids.scalar_type(),
              " and ", topk_weights.scalar_type());
  TORCH_CHECK(w13p.dim() == 4 && w2p.dim() == 4 && w13p.size(3) == MOE_PANEL && w2p.size(3) == MOE_PANEL &&
                  w13p.is_contiguous() && w2p.is_contiguous() && w13p.scalar_type() == w2p.scalar_type(),
              "fused_experts_cpu: the weights must come from prepack_moe_weight, got ", w13p.sizes(),
              " and ", w2p.sizes());
  const int64_t T = hidden_states.size(0), H = hidden_states.size(1), k = topk_ids.size(1);
  const int64_t E = w13p.size(0), P13 = w13p.size(1), Ipad = P13 * HALF, P2 = w2p.size(1);
  TORCH_CHECK(w13p.size(2) == H && w2p.size(0) == E && w2p.size(2) == Ipad &&
                  P2 == (H + MOE_PANEL - 1) / MOE_PANEL && intermediate_size <= Ipad &&
                  intermediate_size > Ipad - HALF,
              "fused_experts_cpu: packed weights ", w13p.sizes(), " and ", w2p.sizes(),
              " do not fit hidden size ", H, " and intermediate size ", intermediate_size);

  at::Tensor out = at::zeros({T, H}, hidden_states.options());
  if (T == 0 || k == 0) return out;
  const at::Tensor ids_c = topk_ids.contiguous(), w_c = topk_weights.contiguous();
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  const float* wts = w_c.data_ptr<float>();

  // 1. align: counting sort by expert; pos[pair] = its row in the sorted order, or -1
  std::vector<int64_t> count(E, 0), start(E, 0);
  for (int64_t p = 0; p < T * k; ++p) {
    TORCH_CHECK(ids[p] >= -1 && ids[p] < E, "fused_experts_cpu: expert id ", ids[p], " is not in 0..", E - 1,
                " (or -1: another rank's)");
    if (ids[p] >= 0) ++count[ids[p]];
  }
  std::vector<int64_t> touched;
  int64_t pairs = 0;
  for (int64_t e = 0; e < E; ++e) {
    start[e] = pairs;
    pairs += count[e];
    if (count[e]) touched.push_back(e);
  }
  std::vector<int64_t> pos(T * k, -1), sorted_token(pairs), cursor(start);
  std::vector<float> sorted_w(pairs);
  for (int64_t p = 0; p < T * k; ++p) {
    if (ids[p] < 0) continue;
    const int64_t s = cursor[ids[p]]++;
    pos[p] = s;
    sorted_token[s] = p / k;
    sorted_w[s] = wts[p];
  }
  if (pairs == 0) return out;

  // 2. permute: the sorted pairs' rows, in float32
  const at::Tensor x = hidden_states.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xs = at::empty({pairs, H}, f32), h = at::empty({pairs, Ipad}, f32), ys = at::empty({pairs, H}, f32);
  float* xsp = xs.data_ptr<float>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (bf16) {
        const c10::BFloat16* src = x.data_ptr<c10::BFloat16>() + sorted_token[s] * H;
        for (int64_t j = 0; j < H; ++j) xsp[s * H + j] = static_cast<float>(src[j]);
      } else {
        std::memcpy(xsp + s * H, x.data_ptr<float>() + sorted_token[s] * H, H * sizeof(float));
      }
    }
  });

  // 3 and 4: gate|up with SiLU·mul, then down scaled by the routing weight
  if (w13p.scalar_type() == at::kBFloat16)
    run_experts(reinterpret_cast<const uint16_t*>(w13p.data_ptr<c10::BFloat16>()),
                reinterpret_cast<const uint16_t*>(w2p.data_ptr<c10::BFloat16>()), xsp, h.data_ptr<float>(),
                ys.data_ptr<float>(), sorted_w.data(), touched, start, count, H, Ipad, P13, P2);
  else
    run_experts(w13p.data_ptr<float>(), w2p.data_ptr<float>(), xsp, h.data_ptr<float>(), ys.data_ptr<float>(),
                sorted_w.data(), touched, start, count, H, Ipad, P13, P2);

  // 5. combine: each token's k rows summed in slot order, into its row of out
  const float* ysp = ys.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = pos[t * k + j];
        if (s < 0) continue;
        const float* y = ysp + s * H;
        for (int64_t c = 0; c < H; ++c) acc[c] += y[c];
      }
      if (bf16) {
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + t * H;
        for (int64_t c = 0; c < H; ++c) o[c] = c10::BFloat16(acc[c]);
      } else {
        std::memcpy(out.data_ptr<float>() + t * H, acc.data(), H * sizeof(float));
      }
    }
  });
  return out;
}
