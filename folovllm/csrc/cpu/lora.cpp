// The batched LoRA operation (Punica's shrink then expand) in one call per layer, reading each
// adapter's A and B where they sit in the stacked slots: lora/punica_wrapper.py holds the torch
// versions (add_lora_reference, sgmv_add_lora, bgmv_add_lora) that tests compare these with.
//
//   y[t, :] += ((x[t] · A_sᵀ) · scale_s) · B_sᵀ       s = the slot of token t (-1: nothing)
//
// The slots are stored for this kernel, k-major (the torch ops read the same memory through
// transposed views, lora/layers.py):
//
//   lora_at [S, in, W]          Aᵀ: row k holds the P fused parts' ranks side by side, P*R <= W
//                               floats (the layer pads W to 16: whole vectors, no tail)
//   lora_bt P x [S, R, out_p]   Bᵀ: row r is rank r's contribution to every output of part p
//   ranks   [S, P]              each slot's true rank per part (0: the adapter leaves that part
//                               alone); only those ranks are computed, whatever R
//
// so both halves are the same loop, a broadcast of one scalar times a contiguous vector:
//
//   shrink   h[t, c..c+L) = Σ_k x[t, k] · Aᵀ[k, c..c+L)   for the column vectors c that hold a
//            true rank of some part: one pass over x for q, k and v together (a tile of up to 4
//            tokens x 4 vectors of accumulators, AVX-512; 4 x 2 on AVX2's 16 registers)
//   expand   y[t, o..o+64) += Σ_{r < rank_p} h[t, p*R + r] · Bᵀ[r, o..o+64)   (4 tokens x 4
//            vectors of outputs; AVX2 4 x 2)
//
// No horizontal sums, no transposes at run time, no gather of weights, no temporaries beyond h.
// Every element is summed in one fixed order (k ascending, then r ascending) whatever the block
// a token falls in: SGMV (a segment's tokens in blocks of 16 sharing each vector of A and B while
// it is in a register or L1) and BGMV (each token alone: decode rows) give bitwise the same y.
// Arithmetic is in float32 whatever the dtype (bfloat16 and float16 are widened on load).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

constexpr int64_t ROWS = 16;  // tokens per block in sgmv: each vector of A and B serves them all
constexpr int TOK = 4;        // tokens per register tile

#if defined(__AVX512F__)
constexpr int64_t L = 16;  // floats per vector
constexpr int SHRINK_V = 4;  // column vectors per shrink tile: 4 x 4 accumulators + 4 loads
constexpr int EXPAND_V = 4;  // output vectors per expand tile (64 outputs)
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const at::BFloat16* p) {  // bf16 is the high half of a float32
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline vec vload(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t L = 8;
constexpr int SHRINK_V = 2;  // 4 x 2 accumulators + 2 loads + 1 broadcast of 16 registers
constexpr int EXPAND_V = 2;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline vec vload(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#else  // no vector ISA: the same loops on scalars
constexpr int64_t L = 1;
constexpr int SHRINK_V = 4;
constexpr int EXPAND_V = 4;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vset1(float v) { return v; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline void vstore(float* p, vec v) { *p = v; }
inline vec vload(const float* p) { return *p; }
#endif

// any other dtype (float64): widened element by element (float32 arithmetic, like the rest)
template <typename T>
inline vec vload(const T* p) {
  float tmp[L];
  for (int64_t i = 0; i < L; ++i) tmp[i] = static_cast<float>(p[i]);
  return vload(static_cast<const float*>(tmp));
}

// n (< L at a tail, else L) elements from p, zeros after them: never reads past p[n - 1].
template <typename T>
inline vec vload_n(const T* p, int64_t n) {
  if (n >= L) return vload(p);
  T tmp[L];
  for (int64_t i = 0; i < L; ++i) tmp[i] = i < n ? p[i] : T(0);
  return vload(tmp);
}

struct LoRAShapes {
  int64_t in, parts, rank, pr, width, readable, hs, slots;  // width = W, hs = h's row stride
  std::vector<int64_t> out, offset;  // each part's width and first column in y
};

LoRAShapes check_shapes(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_at,
                        const std::vector<at::Tensor>& lora_bt, const at::Tensor& ranks,
                        const c10::optional<at::Tensor>& scales) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0),
              "x [T, in] and y [T, out] must be 2-D with the same rows");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == lora_at.scalar_type(),
              "x, y and the slots must have one dtype");
  TORCH_CHECK(!lora_bt.empty(), "lora_bt must hold one [S, R, out_p] tensor per part");
  LoRAShapes s;
  s.in = x.size(1);
  s.slots = lora_at.size(0);
  s.parts = static_cast<int64_t>(lora_bt.size());
  s.rank = lora_bt[0].size(1);
  s.pr = s.parts * s.rank;
  TORCH_CHECK(lora_at.dim() == 3 && lora_at.size(1) == s.in && lora_at.size(2) == s.pr &&
                  lora_at.stride(2) == 1 && lora_at.stride(1) >= s.pr &&
                  lora_at.stride(0) == s.in * lora_at.stride(1),
              "lora_at is ", lora_at.sizes(), " with strides ", lora_at.strides(), ", expected [S, ", s.in,
              ", ", s.pr, "] with rows of at least ", s.pr, " contiguous elements, evenly spaced");
  s.width = lora_at.stride(1);
  // columns up to W may be read as whole vectors when the memory behind the view holds them
  const int64_t needed = (lora_at.storage_offset() + s.slots * s.in * s.width) * lora_at.element_size();
  s.readable = static_cast<int64_t>(lora_at.storage().nbytes()) >= needed ? s.width : s.pr;
  s.hs = (s.pr + L - 1) / L * L;
  int64_t col = 0;
  for (const auto& b : lora_bt) {
    TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.size(0) == s.slots && b.size(1) == s.rank &&
                    b.scalar_type() == x.scalar_type(),
                "each lora_bt must be [S, R, out_p], contiguous, of the slots' dtype");
    s.out.push_back(b.size(2));
    s.offset.push_back(col);
    col += b.size(2);
  }
  TORCH_CHECK(col == y.size(1), "the parts' outputs sum to ", col, ", y has ", y.size(1), " columns");
  TORCH_CHECK(ranks.dim() == 2 && ranks.size(0) == s.slots && ranks.size(1) == s.parts &&
                  ranks.scalar_type() == at::kLong && ranks.is_contiguous(),
              "ranks must be int64 [S, P]");
  const int64_t* rk = ranks.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.slots * s.parts; ++i)
    TORCH_CHECK(0 <= rk[i] && rk[i] <= s.rank, "ranks[", i / s.parts, ", ", i % s.parts, "] = ", rk[i],
                ", allowed 0..", s.rank);
  if (scales.has_value())
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == s.slots && scales->scalar_type() == at::kFloat,
                "scales must be float32 [S]");
  return s;
}

// The column vectors of h a slot needs: those that hold a true rank of one of its parts.
std::vector<std::vector<int64_t>> active_columns(const LoRAShapes& s, const int64_t* ranks) {
  std::vector<std::vector<int64_t>> cols(s.slots);
  for (int64_t slot = 0; slot < s.slots; ++slot)
    for (int64_t c = 0; c < s.pr; c += L)
      for (int64_t p = 0; p < s.parts; ++p) {
        const int64_t lo = p * s.rank, hi = lo + ranks[slot * s.parts + p];
        if (lo < hi && c < hi && lo < c + L) {
          cols[slot].push_back(c);
          break;
        }
      }
  return cols;
}

// h[t, cols[j] .. + L) = scale · Σ_k xs[t][k] · at[k, cols[j] .. + L), TN tokens x V vectors.
template <typename T, int TN, int V>
void shrink_tile(float* h, int64_t hs, const T* const* xs, const T* at, const LoRAShapes& s,
                 const int64_t* cols, float scale) {
  vec acc[TN][V];
  int64_t w[V];
  for (int j = 0; j < V; ++j) w[j] = std::min(L, s.readable - cols[j]);
  for (int t = 0; t < TN; ++t)
    for (int j = 0; j < V; ++j) acc[t][j] = vzero();
  for (int64_t k = 0; k < s.in; ++k) {
    const T* ak = at + k * s.width;
    vec a[V];
    for (int j = 0; j < V; ++j) a[j] = vload_n(ak + cols[j], w[j]);
    for (int t = 0; t < TN; ++t) {
      const vec xb = vset1(static_cast<float>(xs[t][k]));
      for (int j = 0; j < V; ++j) acc[t][j] = vfma(xb, a[j], acc[t][j]);
    }
  }
  const vec sc = vset1(scale);
  for (int t = 0; t < TN; ++t)
    for (int j = 0; j < V; ++j) vstore(h + t * hs + cols[j], vmul(acc[t][j], sc));  // hs: whole vectors
}

template <typename T, int TN>
void shrink_tokens(float* h, int64_t hs, const T* const* xs, const T* at, const LoRAShapes& s,
                   const std::vector<int64_t>& cols, float scale) {
  const int64_t nc = static_cast<int64_t>(cols.size());
  for (int64_t j = 0; j < nc; j += SHRINK_V) {
    const int64_t v = std::min<int64_t>(SHRINK_V, nc - j);  // never more than SHRINK_V
    if (v == 1) shrink_tile<T, TN, 1>(h, hs, xs, at, s, cols.data() + j, scale);
    if constexpr (SHRINK_V >= 2) if (v == 2) shrink_tile<T, TN, 2>(h, hs, xs, at, s, cols.data() + j, scale);
    if constexpr (SHRINK_V >= 3) if (v == 3) shrink_tile<T, TN, 3>(h, hs, xs, at, s, cols.data() + j, scale);
    if constexpr (SHRINK_V >= 4) if (v == 4) shrink_tile<T, TN, 4>(h, hs, xs, at, s, cols.data() + j, scale);
  }
}

// ys[t][o0 .. o0 + width) += Σ_{r < rank} h[t, r] · bt[r, o0 ..], TN tokens x V vectors of outputs
// (the last one possibly partial: widths < L are read and written element by element).
template <typename T, int TN, int V>
void expand_tile(T* const* ys, const float* h, int64_t hs, const T* bt, int64_t out, int64_t rank,
                 int64_t o0) {
  vec acc[TN][V];
  int64_t w[V];
  for (int j = 0; j < V; ++j) w[j] = std::min(L, out - o0 - j * L);
  for (int t = 0; t < TN; ++t)
    for (int j = 0; j < V; ++j) acc[t][j] = vzero();
  for (int64_t r = 0; r < rank; ++r) {
    const T* br = bt + r * out + o0;
    vec b[V];
    for (int j = 0; j < V; ++j) b[j] = vload_n(br + j * L, w[j]);
    for (int t = 0; t < TN; ++t) {
      const vec hb = vset1(h[t * hs + r]);
      for (int j = 0; j < V; ++j) acc[t][j] = vfma(hb, b[j], acc[t][j]);
    }
  }
  for (int t = 0; t < TN; ++t) {
    T* yt = ys[t] + o0;
    for (int j = 0; j < V; ++j) {
      if constexpr (std::is_same_v<T, float>) {
        if (w[j] == L) {
          vstore(yt + j * L, vadd(vload(yt + j * L), acc[t][j]));
          continue;
        }
      }
      float buf[L];
      vstore(buf, acc[t][j]);
      for (int64_t i = 0; i < w[j]; ++i)
        yt[j * L + i] = static_cast<T>(static_cast<float>(yt[j * L + i]) + buf[i]);
    }
  }
}

template <typename T, int TN>
void expand_tokens(T* const* ys, const float* h, int64_t hs, const T* bt, int64_t out, int64_t rank) {
  constexpr int64_t TILE = EXPAND_V * L;
  int64_t o0 = 0;
  for (; o0 + TILE <= out; o0 += TILE) expand_tile<T, TN, EXPAND_V>(ys, h, hs, bt, out, rank, o0);
  for (; o0 < out; o0 += L) expand_tile<T, TN, 1>(ys, h, hs, bt, out, rank, o0);  // the tail
}

// n (<= ROWS) tokens of one slot: shrink then expand, TOK tokens per register tile.
template <typename T>
void add_lora_block(T* const* ys, const T* const* xs, int64_t n, int64_t slot, const T* lora_at,
                    const std::vector<const T*>& lora_bt, const LoRAShapes& s, const int64_t* ranks,
                    const std::vector<int64_t>& cols, const float* scales, float* h) {
  if (cols.empty()) return;  // an empty slot, or an adapter of no part here: adds zero
  const float scale = scales != nullptr ? scales[slot] : 1.f;
  const T* at = lora_at + slot * s.in * s.width;
  for (int64_t t0 = 0; t0 < n; t0 += TOK) {
    float* ht = h + t0 * s.hs;
    switch (std::min<int64_t>(TOK, n - t0)) {
      case 1: shrink_tokens<T, 1>(ht, s.hs, xs + t0, at, s, cols, scale); break;
      case 2: shrink_tokens<T, 2>(ht, s.hs, xs + t0, at, s, cols, scale); break;
      case 3: shrink_tokens<T, 3>(ht, s.hs, xs + t0, at, s, cols, scale); break;
      default: shrink_tokens<T, 4>(ht, s.hs, xs + t0, at, s, cols, scale); break;
    }
  }
  for (int64_t p = 0; p < s.parts; ++p) {
    const int64_t rank = ranks[slot * s.parts + p];
    if (rank == 0) continue;
    const T* bt = lora_bt[p] + slot * s.rank * s.out[p];
    T* yp[ROWS];
    for (int64_t t = 0; t < n; ++t) yp[t] = ys[t] + s.offset[p];
    for (int64_t t0 = 0; t0 < n; t0 += TOK) {
      const float* ht = h + t0 * s.hs + p * s.rank;
      switch (std::min<int64_t>(TOK, n - t0)) {
        case 1: expand_tokens<T, 1>(yp + t0, ht, s.hs, bt, s.out[p], rank); break;
        case 2: expand_tokens<T, 2>(yp + t0, ht, s.hs, bt, s.out[p], rank); break;
        case 3: expand_tokens<T, 3>(yp + t0, ht, s.hs, bt, s.out[p], rank); break;
        default: expand_tokens<T, 4>(yp + t0, ht, s.hs, bt, s.out[p], rank); break;
      }
    }
  }
}

template <typename T>
std::vector<const T*> bt_pointers(const std::vector<at::Tensor>& lora_bt) {
  std::vector<const T*> bs;
  for (const auto& b : lora_bt) bs.push_back(b.data_ptr<T>());
  return bs;
}

const float* scales_ptr(const c10::optional<at::Tensor>& scales) {
  return scales.has_value() ? scales->data_ptr<float>() : nullptr;
}

}  // namespace

void bgmv_add_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_at,
                   const std::vector<at::Tensor>& lora_bt, const at::Tensor& ranks,
                   const at::Tensor& token_slots, const c10::optional<at::Tensor>& scales) {
  const LoRAShapes s = check_shapes(y, x, lora_at, lora_bt, ranks, scales);
  TORCH_CHECK(token_slots.dim() == 1 && token_slots.size(0) == x.size(0) &&
                  token_slots.scalar_type() == at::kLong && token_slots.is_contiguous(),
              "token_slots must be int64 [T]");
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < x.size(0); ++t)
    TORCH_CHECK(slots[t] < s.slots, "token ", t, " reads slot ", slots[t], ", there are ", s.slots);
  const int64_t* rk = ranks.data_ptr<int64_t>();
  const auto cols = active_columns(s, rk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bgmv_add_lora", [&] {
    const auto bs = bt_pointers<scalar_t>(lora_bt);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = lora_at.data_ptr<scalar_t>();
    const float* sc = scales_ptr(scales);
    at::parallel_for(0, x.size(0), 4, [&](int64_t begin, int64_t end) {
      std::vector<float> h(s.hs);
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;  // the base model: nothing to add
        scalar_t* yt = yp + t * y.stride(0);
        const scalar_t* xt = xp + t * x.stride(0);
        add_lora_block(&yt, &xt, 1, slots[t], ap, bs, s, rk, cols[slots[t]], sc, h.data());
      }
    });
  });
}

void sgmv_add_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_at,
                   const std::vector<at::Tensor>& lora_bt, const at::Tensor& ranks,
                   const at::Tensor& segments, const c10::optional<at::Tensor>& order,
                   const c10::optional<at::Tensor>& scales) {
  // segments [K, 3] = (slot, start, end): rows [start, end) of x (or of `order`, the token
  // indices grouped by slot) are all of adapter `slot`.
  const LoRAShapes s = check_shapes(y, x, lora_at, lora_bt, ranks, scales);
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 3 && segments.scalar_type() == at::kLong &&
                  segments.is_contiguous(),
              "segments must be int64 [K, 3] (slot, start, end)");
  const int64_t* seg = segments.data_ptr<int64_t>();
  const int64_t K = segments.size(0), T = x.size(0);
  const int64_t* idx = nullptr;
  int64_t n_idx = T;
  if (order.has_value()) {
    TORCH_CHECK(order->dim() == 1 && order->scalar_type() == at::kLong && order->is_contiguous(),
                "order must be int64 [T']");
    idx = order->data_ptr<int64_t>();
    n_idx = order->size(0);
    for (int64_t i = 0; i < n_idx; ++i)
      TORCH_CHECK(idx[i] >= 0 && idx[i] < T, "order names token ", idx[i], ", there are ", T);
  }
  std::vector<int64_t> work;  // (segment, first row) per block of ROWS tokens
  for (int64_t k = 0; k < K; ++k) {
    const int64_t slot = seg[3 * k], start = seg[3 * k + 1], end = seg[3 * k + 2];
    TORCH_CHECK(slot >= 0 && slot < s.slots && 0 <= start && start <= end && end <= n_idx,
                "segment ", k, " (slot ", slot, ", rows ", start, "..", end, ") is out of range");
    for (int64_t r = start; r < end; r += ROWS) {
      work.push_back(k);
      work.push_back(r);
    }
  }
  const int64_t* rk = ranks.data_ptr<int64_t>();
  const auto cols = active_columns(s, rk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sgmv_add_lora", [&] {
    const auto bs = bt_pointers<scalar_t>(lora_bt);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = lora_at.data_ptr<scalar_t>();
    const float* sc = scales_ptr(scales);
    at::parallel_for(0, static_cast<int64_t>(work.size() / 2), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> h(ROWS * s.hs);
      scalar_t* ys[ROWS];
      const scalar_t* xs[ROWS];
      for (int64_t w = begin; w < end; ++w) {
        const int64_t k = work[2 * w], r0 = work[2 * w + 1], slot = seg[3 * k];
        const int64_t n = std::min(ROWS, seg[3 * k + 2] - r0);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = idx != nullptr ? idx[r0 + i] : r0 + i;
          ys[i] = yp + t * y.stride(0);
          xs[i] = xp + t * x.stride(0);
        }
        add_lora_block(ys, xs, n, slot, ap, bs, s, rk, cols[slot], sc, h.data());
      }
    });
  });
}
