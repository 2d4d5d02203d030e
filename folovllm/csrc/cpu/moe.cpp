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
// Decode (1-2 rows per expert) and prefill (many) run the same loops: a tile of R rows walks
// k = 0 .. K-1 with the panel's row k in registers, applied to all R rows; the first tile streams
// the panel from memory, later tiles of the same expert find it in L2 (H x 32 x 4 = 256 KB at
// Qwen3-30B-A3B's shapes). Tiles: AVX-512, 8 rows x (1 gate + 1 up vector) or 8 rows x 2
// vectors = 16 accumulators; AVX2 (FOLOVLLM_CPU_ISA=avx2), half a panel at a time, 6 rows x 2
// vectors = 12 accumulators of its 16 registers.
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
constexpr int64_t ROWS = 8;  // rows per tile: 16 accumulators + 2 weights + 1 broadcast
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
constexpr int64_t ROWS = 6;  // 12 accumulators + 2 weights + 1 broadcast of 16 registers
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
constexpr int64_t ROWS = 4;
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

// Columns q*L .. q*L+L-1 of halves A and B of one panel row (module comment: the layouts).
inline void load_pair(const float* row, int64_t q, vec& a, vec& b) {
  a = vload(row + q * L);
  b = vload(row + HALF + q * L);
}
inline void load_pair(const uint16_t* row, int64_t q, vec& a, vec& b) { vload_bf16_pair(row + 2 * q * L, a, b); }

// --8<-- [start:tile_gate_up]
// Pass 3 for R rows and the L features q*L .. q*L+L-1 of a panel (w: its row k = 0):
// h[r, 0 .. L) = silu(x[r] . gate) * (x[r] . up).
template <int64_t R, typename W>
inline void tile_gate_up(const W* w, int64_t q, int64_t K, const float* x, int64_t ldx, float* h,
                         int64_t ldh) {
  vec g[R], u[R];
  for (int64_t r = 0; r < R; ++r) g[r] = u[r] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vec wg, wu;
    load_pair(w + k * MOE_PANEL, q, wg, wu);
    for (int64_t r = 0; r < R; ++r) {
      const vec xv = vbroadcast(x + r * ldx + k);
      g[r] = vfma(xv, wg, g[r]);
      u[r] = vfma(xv, wu, u[r]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    alignas(64) float gs[L], us[L];
    vstore(gs, g[r]);
    vstore(us, u[r]);
    float* o = h + r * ldh;
    for (int64_t j = 0; j < L; ++j) o[j] = gs[j] / (1.f + std::exp(-gs[j])) * us[j];  // silu(g) * u
  }
}
// --8<-- [end:tile_gate_up]

// Pass 4 for R rows and the outputs q*L .. q*L+L-1 of halves A and B of a panel (w: its row
// k = 0; y: the panel's first output): y[r, o] = scale[r] * (h[r] . down_o), the first cols_a
// of A's and cols_b of B's (the last panel may end before H).
template <int64_t R, typename W>
inline void tile_down(const W* w, int64_t q, int64_t K, const float* h, int64_t ldh, float* y,
                      int64_t ldy, const float* scale, int64_t cols_a, int64_t cols_b) {
  vec acc[R][2];
  for (int64_t r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vec w0, w1;
    load_pair(w + k * MOE_PANEL, q, w0, w1);
    for (int64_t r = 0; r < R; ++r) {
      const vec hv = vbroadcast(h + r * ldh + k);
      acc[r][0] = vfma(hv, w0, acc[r][0]);
      acc[r][1] = vfma(hv, w1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    alignas(64) float a[L], b[L];
    vstore(a, acc[r][0]);
    vstore(b, acc[r][1]);
    float* o = y + r * ldy + q * L;
    for (int64_t j = 0; j < cols_a; ++j) o[j] = a[j] * scale[r];
    for (int64_t j = 0; j < cols_b; ++j) o[HALF + j] = b[j] * scale[r];
  }
}

// All n rows of one expert's segment: tiles of ROWS rows, then one tile of the remainder.
#define FOLO_MOE_ROWS(CALL)                                      \
  int64_t r = 0;                                                 \
  for (; r + ROWS <= n; r += ROWS) CALL(ROWS);                   \
  switch (n - r) {                                               \
    case 11: CALL(11); break;                                    \
    case 10: CALL(10); break;                                    \
    case 9: CALL(9); break;                                      \
    case 8: CALL(8); break;                                      \
    case 7: CALL(7); break;                                      \
    case 6: CALL(6); break;                                      \
    case 5: CALL(5); break;                                      \
    case 4: CALL(4); break;                                      \
    case 3: CALL(3); break;                                      \
    case 2: CALL(2); break;                                      \
    case 1: CALL(1); break;                                      \
    default: break;                                              \
  }

template <typename W>
void rows_gate_up(const W* w, int64_t q, int64_t K, const float* x, int64_t n, float* h, int64_t ldh) {
#define FOLO_CALL(R) tile_gate_up<R>(w, q, K, x + r * K, K, h + r * ldh, ldh)
  FOLO_MOE_ROWS(FOLO_CALL)
#undef FOLO_CALL
}

template <typename W>
void rows_down(const W* w, int64_t q, int64_t K, const float* h, int64_t n, float* y, int64_t ldy,
               const float* scale, int64_t cols_a, int64_t cols_b) {
#define FOLO_CALL(R) tile_down<R>(w, q, K, h + r * K, K, y + r * ldy, ldy, scale + r, cols_a, cols_b)
  FOLO_MOE_ROWS(FOLO_CALL)
#undef FOLO_CALL
}

// --8<-- [start:run_experts]
template <typename W>
void run_experts(const W* w13, const W* w2, const float* xs, float* h, float* ys,
                 const float* sorted_w, const std::vector<int64_t>& touched,
                 const std::vector<int64_t>& start, const std::vector<int64_t>& count, int64_t H,
                 int64_t Ipad, int64_t P13, int64_t P2) {
  const int64_t n_touched = static_cast<int64_t>(touched.size());
  // Pass 3: (expert, panel of 16 features) items; each streams H x 32 weights once.
  at::parallel_for(0, n_touched * P13, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = touched[item / P13], p = item % P13, s0 = start[e];
      const W* panel = w13 + (e * P13 + p) * H * MOE_PANEL;
      for (int64_t q = 0; q < HALF / L; ++q)
        rows_gate_up(panel, q, H, xs + s0 * H, count[e], h + s0 * Ipad + p * HALF + q * L, Ipad);
    }
  });
  // Pass 4: (expert, panel of 32 outputs) items; each streams Ipad x 32 weights once.
  at::parallel_for(0, n_touched * P2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = touched[item / P2], p = item % P2, s0 = start[e];
      const W* panel = w2 + (e * P2 + p) * Ipad * MOE_PANEL;
      for (int64_t q = 0; q < HALF / L; ++q) {
        const int64_t a0 = p * MOE_PANEL + q * L, b0 = a0 + HALF;  // first output of A's, B's part
        const int64_t cols_a = std::clamp<int64_t>(H - a0, 0, L), cols_b = std::clamp<int64_t>(H - b0, 0, L);
        if (cols_a == 0) break;
        rows_down(panel, q, Ipad, h + s0 * Ipad, count[e], ys + s0 * H + p * MOE_PANEL, H, sorted_w + s0,
                  cols_a, cols_b);
      }
    }
  });
}
// --8<-- [end:run_experts]

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
  // gate and up, each zero-padded to [E, Ipad, H] -> [E, P13, 16, H]; side by side
  // [E, P13, 32, H] -> k-major [E, P13, H, 32]
  at::Tensor gate = at::zeros({E, Ipad, H}, w13.options()), up = at::zeros({E, Ipad, H}, w13.options());
  gate.narrow(1, 0, I).copy_(w13.narrow(1, 0, I));
  up.narrow(1, 0, I).copy_(w13.narrow(1, I, I));
  at::Tensor w13p = at::cat({gate.view({E, P13, HALF, H}), up.view({E, P13, HALF, H})}, 2)
                        .transpose(2, 3)
                        .contiguous();
  const bool bf16 = w13.scalar_type() == at::kBFloat16;
  // bfloat16: each row A0..A15 B0..B15 -> A0 B0 A1 B1 .. (view [.., 2, 16], swap, flatten)
  if (bf16) w13p = w13p.view({E, P13, H, 2, HALF}).transpose(3, 4).contiguous().view({E, P13, H, MOE_PANEL});
  // down zero-padded to [E, P2 * 32, Ipad] -> [E, P2, 32, Ipad] -> k-major [E, P2, Ipad, 32]
  at::Tensor down = at::zeros({E, P2 * MOE_PANEL, Ipad}, w2.options());
  down.narrow(1, 0, H).narrow(2, 0, I).copy_(w2);
  at::Tensor w2p = down.view({E, P2, MOE_PANEL, Ipad}).transpose(2, 3).contiguous();
  if (bf16) w2p = w2p.view({E, P2, Ipad, 2, HALF}).transpose(3, 4).contiguous().view({E, P2, Ipad, MOE_PANEL});
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
