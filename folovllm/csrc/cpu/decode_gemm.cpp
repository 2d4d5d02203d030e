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
// The kernel, per panel of 32 outputs (threads split the panels, at::parallel_for):
//
//   for each tile of R rows of x (AVX-512: R = 8, 2 vectors of 16 outputs -> 16 accumulators)
//     for k in 0 .. K-1:  2 weight loads (the panel's row k), R broadcasts of x[r, k], 2R FMAs
//   the first tile streams the panel from memory (one sequential stream, which the hardware
//   prefetcher follows: a software prefetch 1 KB ahead measured 2x slower at 1 row here); the
//   next tiles find it in L2 (K x 128 bytes: 128-384 KB at Qwen3-0.6B's shapes)
//
// AVX2 (16 registers of 8 floats; FOLOVLLM_CPU_ISA=avx2): each panel in two halves of 16
// outputs, 6 rows a tile (12 accumulators + 2 weights + 1 broadcast).
//
// An output's sum is always taken in the same order, k = 0, 1, ..., K-1 in its lane, whatever the
// number of rows in the call, the tile the row falls in, or the thread count: a row's result is
// bitwise the same alone or in a batch (what batch-invariant mode relies on).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

constexpr int64_t PANEL = 32;  // outputs per panel of the packed layout (both ISAs)

#if defined(__AVX512F__)
constexpr int64_t L = 16;       // floats per vector
constexpr int64_t GROUP = 32;   // outputs a tile computes: 2 vectors
constexpr int64_t ROWS = 8;     // x rows per tile: 16 accumulators + 2 weights + 1 broadcast
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
#define FOLO_VECTOR 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t L = 8;
constexpr int64_t GROUP = 16;   // half a panel: 2 vectors
constexpr int64_t ROWS = 6;     // 12 accumulators + 2 weights + 1 broadcast of 16 registers
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
#define FOLO_VECTOR 1
#endif

#ifdef FOLO_VECTOR
constexpr int64_t V = GROUP / L;  // vectors per tile row

// out[r, 0 .. cols) = x[r, :] . w (+ bias) for R rows and one group of GROUP outputs, w pointing
// at the group's first output of k = 0 in the packed panel (a row of the panel is PANEL floats).
template <int64_t R>
inline void tile(const float* w, int64_t K, const float* x, int64_t ldx, float* out, int64_t ldo,
                 const float* bias, int64_t cols) {
  vec acc[R][V];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vec wv[V];
    for (int64_t v = 0; v < V; ++v) wv[v] = vload(w + k * PANEL + v * L);
    for (int64_t r = 0; r < R; ++r) {
      const vec xv = vbroadcast(x + r * ldx + k);
      for (int64_t v = 0; v < V; ++v) acc[r][v] = vfma(xv, wv[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    alignas(64) float row[GROUP];
    for (int64_t v = 0; v < V; ++v) vstore(row + v * L, acc[r][v]);
    float* o = out + r * ldo;
    if (bias)
      for (int64_t j = 0; j < cols; ++j) o[j] = row[j] + bias[j];
    else
      std::memcpy(o, row, cols * sizeof(float));
  }
}

// All M rows against one group: tiles of ROWS rows, then the remainder (fewer accumulators).
inline void group(const float* w, int64_t K, const float* x, int64_t M, float* out, int64_t N,
                  const float* bias, int64_t cols) {
  int64_t r = 0;
  for (; r + ROWS <= M; r += ROWS) tile<ROWS>(w, K, x + r * K, K, out + r * N, N, bias, cols);
  const float* xr = x + r * K;
  float* o = out + r * N;
  switch (M - r) {
    case 7: tile<7>(w, K, xr, K, o, N, bias, cols); break;
    case 6: tile<6>(w, K, xr, K, o, N, bias, cols); break;
    case 5: tile<5>(w, K, xr, K, o, N, bias, cols); break;
    case 4: tile<4>(w, K, xr, K, o, N, bias, cols); break;
    case 3: tile<3>(w, K, xr, K, o, N, bias, cols); break;
    case 2: tile<2>(w, K, xr, K, o, N, bias, cols); break;
    case 1: tile<1>(w, K, xr, K, o, N, bias, cols); break;
    default: break;
  }
}
#endif

#ifdef FOLO_VECTOR
constexpr int64_t GROUP_OR_PANEL = GROUP;
#else
constexpr int64_t GROUP_OR_PANEL = PANEL;
#endif

}  // namespace

at::Tensor pack_decode_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
              "pack_decode_weight: expected a float32 [N, K] weight, got ", weight.scalar_type(),
              " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + PANEL - 1) / PANEL;
  // [N, K] -> zero-padded [panels * 32, K] -> [panels, 32, K] -> [panels, K, 32]
  at::Tensor padded = at::zeros({panels * PANEL, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, PANEL, K}).transpose(1, 2).contiguous();
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == PANEL &&
                  x.size(1) == packed.size(1),
              "decode_linear: x must be [M, K] and the packed weight [N / 32, K, 32], got ",
              x.sizes(), " and ", packed.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "decode_linear: float32 only, got ", x.scalar_type(), " and ", packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), "decode_linear: the packed weight must be contiguous");
  const int64_t N = out_features, panels = packed.size(0);
  TORCH_CHECK(N > (panels - 1) * PANEL && N <= panels * PANEL, "decode_linear: ", N,
              " outputs do not fit ", panels, " panels of ", PANEL);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "decode_linear: the bias must be contiguous float32 [N]");
    b = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // At least ~256 KB of weight per chunk of work: smaller ones cost more to hand out than they save.
  const int64_t grain = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(K * PANEL * 4, 1));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t g = 0; g < PANEL; g += GROUP_OR_PANEL) {
        const int64_t n0 = p * PANEL + g, cols = std::min<int64_t>(GROUP_OR_PANEL, N - n0);
        if (cols <= 0) break;
        const float* bb = b ? b + n0 : nullptr;
#ifdef FOLO_VECTOR
        group(wp + p * K * PANEL + g, K, xp, M, op + n0, N, bb, cols);
#else  // no AVX2: plain loops (x86-64 builds need AVX2; kept for other compilers)
        for (int64_t r = 0; r < M; ++r)
          for (int64_t j = 0; j < cols; ++j) {
            float s = 0.f;
            for (int64_t k = 0; k < K; ++k) s += xp[r * K + k] * wp[(p * K + k) * PANEL + g + j];
            op[r * N + n0 + j] = s + (bb ? bb[j] : 0.f);
          }
#endif
      }
    }
  });
  return out;
}
