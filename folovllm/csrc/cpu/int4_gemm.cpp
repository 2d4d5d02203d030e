// y = x W^T for a GPTQ 4-bit weight, streamed once per call: stage 07's int4 linears at decode
// (1-16 rows), held to the same bandwidth standard as the float32 panels of decode_gemm.cpp.
//
// Why: at a few rows a linear reads every weight once and does 2 flops per weight and row, so
// its time is the bytes it reads. 4-bit codes are an eighth of float32's bytes; the kernel must
// turn them into float32 in registers, at least as fast as memory delivers them, and apply each
// one to every row while it is there.
//
// The layout (`gptq.py:Int4PanelWeight.from_gptq`, once per layer at load): the inputs sorted by
// group (act-order undone: x is gathered through `perm` here), the outputs cut into panels of 32.
// Panel p is one contiguous stream, group after group:
//
//   panel p:  | group 0 codes | group 0 meta | group 1 codes | group 1 meta | ...
//   codes:    G / 4 blocks of 16 int32 words (64 bytes, one cache line, one AVX-512 load);
//             block b, word i, nibble j (bits 4j .. 4j+3) = code of
//                 output n = 32p + 16 (j % 2) + i
//                 input  k = 4b + kk(j),  kk(j) = 2 ((j >> 1) & 1) + (j >> 2)   (of the group)
//
//             word i:  | k+1,hi | k+1,lo | k+3,hi | k+3,lo | k,hi | k,lo | k+2,hi | k+2,lo |
//                      bit 31   (nibbles 7 .. 4: odd k)     (nibbles 3 .. 0: even k)   bit 0
//             (lo / hi: output 32p + i / 32p + 16 + i;  k = 4b)
//   meta:     32 float scales, then 32 float zeros (outputs 32p .. 32p + 31; 0 past N)
//
// Two ways to read a block, no shuffles either way:
//   float32  `(word >> 4j) & 15` of a vector of words is 16 (AVX-512) or 8 (AVX2) consecutive
//            outputs' codes for one input: shift, and, convert, then one FMA per row
//   bf16     (AVX512-BF16, bfloat16 activations) `(word >> 4q) & 0x000F000F` puts input k's code
//            in each lane's low 16 bits and input k+1's in its high 16 bits; or-ing 0x4300 into
//            both makes them the bfloat16 numbers 128 + code (exact), and one `vdpbf16ps` adds
//            x[k] (128 + c[k]) + x[k+1] (128 + c[k+1]) into each float32 accumulator: half the
//            instructions per code of the float32 way, exact products. The 128s are taken back
//            once per group with the zero: (z + 128) * xsum.
//
// The arithmetic: W[n, k] = (code - z) * s per group, so a group's contribution to a row is
//
//   sum_k x[k] (code[k] - z) s  =  s * (sum_k x[k] code[k]  -  z * sum_k x[k])
//
// The inner loop accumulates x * code only (the codes are exact small floats); once per group
// each output takes s * (acc - z * xsum), with xsum = the row's sum over the group (computed once
// per call). Everything in float32, whatever the model's dtype (x is read as float32 or bf16).
//
// Per panel (threads split the panels, at::parallel_for), tiles of ROWS rows (AVX-512: 8 rows x
// 2 vectors = 16 accumulators; AVX2: 3 rows x 4 vectors = 12 of its 16 registers): the first tile
// streams the panel from memory, the next find it in L1/L2 (K / 2 bytes x 32: 16-48 KB here).
// A row's sums are taken in the same order whatever the batch or thread count: a row's result is
// bitwise the same alone or in a batch.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

constexpr int64_t PANEL = 32;        // outputs per panel
constexpr int64_t BLOCK_K = 4;       // inputs per block of 16 words (8 nibbles / 2 halves)
constexpr int64_t BLOCK_WORDS = 16;  // int32 words per block: 64 bytes
constexpr int64_t META_WORDS = 2 * PANEL;  // 32 scales + 32 zeros after each group's codes

#if defined(__AVX512F__)
constexpr int64_t L = 16;   // floats (and int32 words) per vector
constexpr int64_t ROWS = 8; // rows per tile: 8 x 2 accumulators
using vf = __m512;
using vi = __m512i;
inline vi iload(const int32_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
inline vf nibble(vi w, int shift) {
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, shift), _mm512_set1_epi32(15)));
}
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
#define FOLO_INT4_VECTOR 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t L = 8;
constexpr int64_t ROWS = 3; // 3 x 4 accumulators + the words, a code and a broadcast
using vf = __m256;
using vi = __m256i;
inline vi iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vf nibble(vi w, int shift) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, shift), _mm256_set1_epi32(15)));
}
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
#define FOLO_INT4_VECTOR 1
#endif

struct Problem {
  const int32_t* w;     // the packed panels
  int64_t panel_words;  // words per panel
  int64_t groups, G;    // groups along K, inputs per group
  const float* x;       // [M, K] float32, permuted
  const float* xsum;    // [M, groups]: each row's sum over each group
  const uint16_t* xb;   // [M, K] the same x as bfloat16 bits, when the bf16 way is taken; else null
  int64_t M, K, N;
  float* out;           // [M, N] float32
};

#if defined(__AVX512BF16__)
constexpr bool HAS_BF16_DOT = true;
#else
constexpr bool HAS_BF16_DOT = false;
#endif
constexpr float BF16_BIAS = 128.f, ONE = 1.f;  // bfloat16 0x4300 = 128: the codes' offset

#ifdef FOLO_INT4_VECTOR
constexpr int64_t NH = BLOCK_WORDS / L;  // loads per block: 1 (AVX-512) or 2 (AVX2)
constexpr int64_t NV = PANEL / L;        // vectors of outputs per row: 2 or 4

// Input offset (in its block of 4) of nibble j; see the layout above.
constexpr int kk_of(int j) { return 2 * ((j >> 1) & 1) + (j >> 2); }

// Rows r0 .. r0 + R - 1 against panel p: out[r, 32p .. 32p + cols). BF16: the vdpbf16ps way.
template <int64_t R, bool BF16>
void tile(const Problem& P, int64_t p, int64_t r0, int64_t cols) {
  const int32_t* panel = P.w + p * P.panel_words;
  const int64_t blocks = P.G / BLOCK_K, group_words = blocks * BLOCK_WORDS + META_WORDS;
  alignas(64) float total[R][PANEL];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < PANEL; ++n) total[r][n] = 0.f;
  for (int64_t g = 0; g < P.groups; ++g) {
    const int32_t* codes = panel + g * group_words;
    const float* meta = reinterpret_cast<const float*>(codes + blocks * BLOCK_WORDS);
    vf acc[R][NV];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t a = 0; a < NV; ++a) acc[r][a] = vzero();
    if constexpr (BF16) {
#if defined(__AVX512BF16__)
      const uint16_t* xg = P.xb + r0 * P.K + g * P.G;
      const vi mask = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
      for (int64_t b = 0; b < blocks; ++b) {
        const vi w = iload(codes + b * BLOCK_WORDS);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {  // inputs 4b + 2 (q >> 1) and the next, outputs half q & 1
          const vi c = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w, 4 * q), mask), bias);
          const int64_t k = b * BLOCK_K + 2 * (q >> 1);
          for (int64_t r = 0; r < R; ++r) {
            int32_t pair;  // x[k], x[k + 1] as one 32-bit lane
            std::memcpy(&pair, xg + r * P.K + k, sizeof(pair));
            acc[r][q & 1] = _mm512_dpbf16_ps(acc[r][q & 1], (__m512bh)c, (__m512bh)_mm512_set1_epi32(pair));
          }
        }
      }
#endif
    } else {
      const float* xg = P.x + r0 * P.K + g * P.G;
      for (int64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 2
        for (int64_t h = 0; h < NH; ++h) {
          const vi w = iload(codes + b * BLOCK_WORDS + h * L);
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) {
            const vf c = nibble(w, 4 * j);  // outputs 16 (j % 2) + h L + [0, L), input 4b + kk(j)
            const int64_t a = (j & 1) * NH + h;
            for (int64_t r = 0; r < R; ++r)
              acc[r][a] = vfma(vbroadcast(xg + r * P.K + b * BLOCK_K + kk_of(j)), c, acc[r][a]);
          }
        }
      }
    }
    // total += s * (acc - z * xsum), once per group (the bf16 way: z + 128)
    for (int64_t a = 0; a < NV; ++a) {
      vf z = vload(meta + PANEL + a * L);
      if constexpr (BF16) z = vfma(vbroadcast(&BF16_BIAS), vbroadcast(&ONE), z);
      const vf s = vload(meta + a * L);
      for (int64_t r = 0; r < R; ++r) {
        const vf xs = vbroadcast(P.xsum + (r0 + r) * P.groups + g);
        vstore(total[r] + a * L, vfma(s, vfnma(z, xs, acc[r][a]), vload(total[r] + a * L)));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(P.out + (r0 + r) * P.N + p * PANEL, total[r], cols * sizeof(float));
}

template <bool BF16>
void panel_rows_as(const Problem& P, int64_t p, int64_t cols) {
  int64_t r = 0;
  for (; r + ROWS <= P.M; r += ROWS) tile<ROWS, BF16>(P, p, r, cols);
  switch (P.M - r) {
#if defined(__AVX512F__)
    case 7: tile<7, BF16>(P, p, r, cols); break;
    case 6: tile<6, BF16>(P, p, r, cols); break;
    case 5: tile<5, BF16>(P, p, r, cols); break;
    case 4: tile<4, BF16>(P, p, r, cols); break;
    case 3: tile<3, BF16>(P, p, r, cols); break;
#endif
    case 2: tile<2, BF16>(P, p, r, cols); break;
    case 1: tile<1, BF16>(P, p, r, cols); break;
    default: break;
  }
}

void panel_rows(const Problem& P, int64_t p, int64_t cols) {
  if (P.xb)
    panel_rows_as<true>(P, p, cols);
  else
    panel_rows_as<false>(P, p, cols);
}
#else  // no AVX2 (x86-64 builds need it; kept for other compilers): the same sums, plain loops
void panel_rows(const Problem& P, int64_t p, int64_t cols) {
  const int32_t* panel = P.w + p * P.panel_words;
  const int64_t blocks = P.G / BLOCK_K, group_words = blocks * BLOCK_WORDS + META_WORDS;
  for (int64_t r = 0; r < P.M; ++r)
    for (int64_t n = 0; n < cols; ++n) {
      const int64_t i = n % 16, j0 = n / 16;  // word lane, nibble parity
      float total = 0.f;
      for (int64_t g = 0; g < P.groups; ++g) {
        const int32_t* codes = panel + g * group_words;
        const float* meta = reinterpret_cast<const float*>(codes + blocks * BLOCK_WORDS);
        float acc = 0.f;
        for (int64_t k = 0; k < P.G; ++k) {
          const uint32_t word = static_cast<uint32_t>(codes[(k / BLOCK_K) * BLOCK_WORDS + i]);
          const int64_t kk = k % BLOCK_K, j = 4 * (kk & 1) + 2 * (kk >> 1) + j0;  // kk(j) inverted
          acc += P.x[r * P.K + g * P.G + k] * float((word >> (4 * j)) & 15);
        }
        total += meta[n] * (acc - meta[PANEL + n] * P.xsum[r * P.groups + g]);
      }
      P.out[r * P.N + p * PANEL + n] = total;
    }
}
#endif

// -- int8 activations (opt-in: `int4_decode_linear_q8`) -------------------------------------
//
// At 8-16 rows the float32 way is bound by FMAs: each code feeds one FMA per row. llama.cpp's
// Q4_0 x Q8_0 does integer dot products instead; so does this way, on the same panels:
//
//   x is rounded per row and per block of Q8_BLOCK = 32 inputs to int8:  q = round(x / d),
//   d = max |x| / 127 over the block (llama.cpp's Q8_0 rule)        xq [M, K], d [M, K / 32]
//
//   `w & 0x0F0F0F0F` of a block's word i is four bytes: the codes of output 32p + i for its four
//   inputs, in nibble order (k, k+2, k+1, k+3); `(w >> 4) & 0x0F0F0F0F` the same for output
//   32p + 16 + i. xq is stored in that order, so one 32-bit broadcast of a row's four bytes
//   meets them lane for lane, and
//       vpmaddubsw(codes, xq4)   u8 x s8, adjacent pairs summed -> int16 (|.| <= 2 * 15 * 127)
//   adds 4 inputs x 8 outputs of one row in two instructions (with the int16 add). Eight blocks
//   (32 inputs: |sum| <= 8 * 3810 = 30480 < 2^15) stay in int16; then vpmaddwd by 1 -> int32,
//   convert, and one FMA by d adds the block to float32.
//
//   per group:  total += s * (acc - z * xsum),  xsum = sum over the group's blocks of d * sum q
//
// It computes W x^ exactly in float32 arithmetic for x^ = q d, not W x: each output moves by at
// most sum_k |W[n, k]| d(k) / 2 (the tests hold it to that), and the result depends on the
// values of the row only (still the same alone or in a batch). AVX2 integer instructions, 256
// bits; on an AVX-512 build the same code (compiled, not tuned there).
#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t Q8_BLOCK = 32;          // inputs per activation scale (8 blocks of codes)
constexpr int64_t Q8_CODE_BLOCKS = Q8_BLOCK / BLOCK_K;
// rows per tile: 3 x 4 int16 accumulators. The time grows with the rows at any tile height
// (2, 3 and 4 measured alike): the per-row work (broadcast, vpmaddubsw, vpaddw), not re-reading
// the panel, is the limit.
constexpr int64_t Q8_ROWS = 3;
constexpr float INV_127 = 1.f / 127.f;    // d = max |x| * INV_127, q = round(x * 127 / max |x|)

struct ProblemQ8 {
  const int32_t* w;
  int64_t panel_words, groups, G;
  const int8_t* xq;     // [M, K] int8, inputs of each block of 4 in nibble order (k, k+2, k+1, k+3)
  const float* d;       // [M, K / 32] the blocks' scales
  const float* xsum;    // [M, groups] sum of q d over each group
  int64_t M, K, N;
  float* out;
};

// --8<-- [start:tile_q8]
template <int64_t R>
void tile_q8(const ProblemQ8& P, int64_t p, int64_t r0, int64_t cols) {
  const int32_t* panel = P.w + p * P.panel_words;
  const int64_t blocks = P.G / BLOCK_K, group_words = blocks * BLOCK_WORDS + META_WORDS;
  const int64_t dblocks = P.K / Q8_BLOCK;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  alignas(32) float total[R][PANEL];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < PANEL; ++n) total[r][n] = 0.f;
  for (int64_t g = 0; g < P.groups; ++g) {
    const int32_t* codes = panel + g * group_words;
    const float* meta = reinterpret_cast<const float*>(codes + blocks * BLOCK_WORDS);
    __m256 acc[R][4];  // float32: outputs 8v .. 8v + 7 of the panel
    for (int64_t r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t qb = 0; qb < P.G / Q8_BLOCK; ++qb) {
      __m256i a16[R][4];  // int16 pair sums, 8 blocks of 4 inputs
      for (int64_t r = 0; r < R; ++r)
        for (int v = 0; v < 4; ++v) a16[r][v] = _mm256_setzero_si256();
      const int64_t k0 = g * P.G + qb * Q8_BLOCK;
#pragma GCC unroll 8
      for (int64_t b = 0; b < Q8_CODE_BLOCKS; ++b) {
        const int32_t* wb = codes + (qb * Q8_CODE_BLOCKS + b) * BLOCK_WORDS;
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 8));
        // v = 2 half + h: outputs 16 half + 8 h + [0, 8)
        const __m256i c[4] = {_mm256_and_si256(w0, mask), _mm256_and_si256(w1, mask),
                              _mm256_and_si256(_mm256_srli_epi32(w0, 4), mask),
                              _mm256_and_si256(_mm256_srli_epi32(w1, 4), mask)};
        for (int64_t r = 0; r < R; ++r) {
          int32_t four;  // xq of inputs k0 + 4b + (0, 2, 1, 3), one 32-bit lane
          std::memcpy(&four, P.xq + (r0 + r) * P.K + k0 + b * BLOCK_K, sizeof(four));
          const __m256i xb = _mm256_set1_epi32(four);
          for (int v = 0; v < 4; ++v) a16[r][v] = _mm256_add_epi16(a16[r][v], _mm256_maddubs_epi16(c[v], xb));
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const __m256 d = _mm256_broadcast_ss(P.d + (r0 + r) * dblocks + k0 / Q8_BLOCK);
        for (int v = 0; v < 4; ++v)
          acc[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r][v], ones)), d, acc[r][v]);
      }
    }
    for (int v = 0; v < 4; ++v) {  // total += s * (acc - z * xsum)
      const __m256 z = _mm256_loadu_ps(meta + PANEL + 8 * v), s = _mm256_loadu_ps(meta + 8 * v);
      for (int64_t r = 0; r < R; ++r) {
        const __m256 xs = _mm256_broadcast_ss(P.xsum + (r0 + r) * P.groups + g);
        _mm256_storeu_ps(total[r] + 8 * v,
                         _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, xs, acc[r][v]), _mm256_loadu_ps(total[r] + 8 * v)));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(P.out + (r0 + r) * P.N + p * PANEL, total[r], cols * sizeof(float));
}
// --8<-- [end:tile_q8]

void panel_rows_q8(const ProblemQ8& P, int64_t p, int64_t cols) {
  int64_t r = 0;
  for (; r + Q8_ROWS <= P.M; r += Q8_ROWS) tile_q8<Q8_ROWS>(P, p, r, cols);
  switch (P.M - r) {
    case 2: tile_q8<2>(P, p, r, cols); break;
    case 1: tile_q8<1>(P, p, r, cols); break;
    default: break;
  }
}
#define FOLO_INT4_Q8 1
#endif

}  // namespace

namespace {

// The checks both entry points share; -> (groups, panels, panel_words).
struct Shape {
  int64_t M, K, N, G, groups, panels, panel_words;
};

Shape check_shapes(const char* name, const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                   int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, name, ": x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              name, ": x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = out_features, G = group_size;
  TORCH_CHECK(G > 0 && G % BLOCK_K == 0 && K % G == 0, name, ": group size ", G,
              " must be a positive multiple of ", BLOCK_K, " dividing the ", K, " inputs");
  const int64_t groups = K / G, panels = (N + PANEL - 1) / PANEL;
  const int64_t panel_words = groups * (G / BLOCK_K * BLOCK_WORDS + META_WORDS);
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(0) == panels && packed.size(1) == panel_words,
              name, ": the packed weight must be contiguous int32 [", panels, ", ",
              panel_words, "] for ", K, " inputs, ", N, " outputs and groups of ", G, ", got ",
              packed.scalar_type(), " ", packed.sizes());
  return {M, K, N, G, groups, panels, panel_words};
}

const int64_t* checked_perm(const char* name, const c10::optional<at::Tensor>& perm, int64_t K) {
  if (!perm.has_value() || !perm->defined()) return nullptr;
  TORCH_CHECK(perm->dim() == 1 && perm->size(0) == K && perm->scalar_type() == at::kLong &&
                  perm->is_contiguous(),
              name, ": perm must be contiguous int64 [", K, "]");
  const int64_t* pp = perm->data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(pp[k] >= 0 && pp[k] < K, name, ": perm holds ", pp[k], ", not an input");
  return pp;
}

// Row r of x as float32 in the packed (group-sorted) input order.
void gather_row(const at::Tensor& xc, int64_t r, const int64_t* pp, float* dst) {
  const int64_t K = xc.size(1);
  if (xc.scalar_type() == at::kFloat) {
    const float* src = xc.data_ptr<float>() + r * K;
    if (pp)
      for (int64_t k = 0; k < K; ++k) dst[k] = src[pp[k]];
    else
      std::memcpy(dst, src, K * sizeof(float));
  } else {
    const at::BFloat16* src = xc.data_ptr<at::BFloat16>() + r * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[pp ? pp[k] : k]);
  }
}

// At least ~64 KB of codes per chunk of work: smaller ones cost more to hand out than they save.
int64_t panel_grain(int64_t panel_words) {
  return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(panel_words * 4, 1));
}

}  // namespace

at::Tensor int4_decode_linear(const at::Tensor& x, const at::Tensor& packed,
                              const c10::optional<at::Tensor>& perm, int64_t group_size,
                              int64_t out_features) {
  const Shape S = check_shapes("int4_decode_linear", x, packed, group_size, out_features);
  const int64_t M = S.M, K = S.K, N = S.N, G = S.G, groups = S.groups, panels = S.panels,
                panel_words = S.panel_words;
  // x as contiguous float32 in the packed (group-sorted) input order, and each row's sum over
  // each group: one pass, once per call (plain loops: a few torch ops here cost more than this
  // at one row).
  const int64_t* pp = checked_perm("int4_decode_linear", perm, K);
  const at::Tensor xc = x.contiguous();
  at::Tensor xf = at::empty({M, K}, xc.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({M, groups}, xf.options());
  // The bf16 way where the CPU has vdpbf16ps and x is bfloat16 (exact: no rounding of x).
  const bool bf16_dot = HAS_BF16_DOT && xc.scalar_type() == at::kBFloat16;
  at::Tensor xb = bf16_dot ? at::empty({M, K}, xc.options()) : at::Tensor();
  float* xfp = xf.data_ptr<float>();
  float* xsp = xsum.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    float* dst = xfp + r * K;
    gather_row(xc, r, pp, dst);
    if (bf16_dot) {
      const at::BFloat16* src = xc.data_ptr<at::BFloat16>() + r * K;
      at::BFloat16* bdst = xb.data_ptr<at::BFloat16>() + r * K;
      for (int64_t k = 0; k < K; ++k) bdst[k] = src[pp ? pp[k] : k];
    }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) s += dst[k];
      xsp[r * groups + g] = s;
    }
  }
  at::Tensor out = at::empty({M, N}, xf.options());
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  const Problem P{packed.data_ptr<int32_t>(), panel_words, groups, G, xf.data_ptr<float>(),
                  xsum.data_ptr<float>(),
                  bf16_dot ? reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()) : nullptr,
                  M, K, N, out.data_ptr<float>()};
  at::parallel_for(0, panels, panel_grain(panel_words), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) panel_rows(P, p, std::min<int64_t>(PANEL, N - p * PANEL));
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// --8<-- [start:quantize_q8]
at::Tensor int4_decode_linear_q8(const at::Tensor& x, const at::Tensor& packed,
                                 const c10::optional<at::Tensor>& perm, int64_t group_size,
                                 int64_t out_features) {
#ifdef FOLO_INT4_Q8
  const Shape S = check_shapes("int4_decode_linear_q8", x, packed, group_size, out_features);
  const int64_t M = S.M, K = S.K, N = S.N, G = S.G, groups = S.groups;
  TORCH_CHECK(G % Q8_BLOCK == 0, "int4_decode_linear_q8: group size ", G, " must be a multiple of ",
              Q8_BLOCK, " (the activation blocks)");
  const int64_t* pp = checked_perm("int4_decode_linear_q8", perm, K);
  const at::Tensor xc = x.contiguous();
  const int64_t dblocks = K / Q8_BLOCK;
  at::Tensor xq = at::empty({M, K}, xc.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, dblocks}, xc.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({M, groups}, d.options());
  std::vector<float> row(K);
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  float* xsp = xsum.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    gather_row(xc, r, pp, row.data());
    for (int64_t g = 0; g < groups; ++g) xsp[r * groups + g] = 0.f;
    for (int64_t blk = 0; blk < dblocks; ++blk) {
      const float* xb = row.data() + blk * Q8_BLOCK;
      float amax = 0.f;
      for (int64_t k = 0; k < Q8_BLOCK; ++k) amax = std::max(amax, std::abs(xb[k]));
      // d = amax * (1 / 127); x / d taken as x * inv, inv = 127 / amax (llama.cpp's AVX2 rule).
      // The empty asm hides where inv came from: -ffast-math could otherwise compute x * inv
      // as (x * 127) / amax or 1 / d as (1 / c) / amax, which round differently and move the
      // ties of x / d (bfloat16 activations land on them often), so the rounding would depend
      // on the compiler's mood
      const float scale = amax * INV_127;
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      asm("" : "+x"(inv));
      int32_t qsum = 0;
      for (int64_t k = 0; k < Q8_BLOCK; ++k) {
        // nibble order within each block of 4: inputs (0, 2, 1, 3), what `w & 0x0F0F0F0F` holds
        const int64_t at = (k & ~int64_t(3)) + kk_of(2 * (k & 3));
        const int32_t q = static_cast<int32_t>(std::nearbyint(xb[at] * inv));
        xqp[r * K + blk * Q8_BLOCK + k] = static_cast<int8_t>(q);
        qsum += q;
      }
      dp[r * dblocks + blk] = scale;
      xsp[r * groups + blk * Q8_BLOCK / G] += scale * static_cast<float>(qsum);
    }
  }
  at::Tensor out = at::empty({M, N}, d.options());
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  const ProblemQ8 P{packed.data_ptr<int32_t>(), S.panel_words, groups, G, xqp, dp, xsp, M, K, N,
                    out.data_ptr<float>()};
  at::parallel_for(0, S.panels, panel_grain(S.panel_words), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) panel_rows_q8(P, p, std::min<int64_t>(PANEL, N - p * PANEL));
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
#else
  TORCH_CHECK(false, "int4_decode_linear_q8 needs AVX2 (vpmaddubsw)");
#endif
}
// --8<-- [end:quantize_q8]
