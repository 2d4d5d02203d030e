// The batched LoRA operation (Punica's shrink then expand) in one call per layer, reading each
// adapter's A and B where they sit in the stacked slots: lora/punica_wrapper.py holds the torch
// versions (add_lora_reference, sgmv_add_lora, bgmv_add_lora) that tests compare these with.
//
//   y[t, :] += ((x[t] · A_sᵀ) · scale_s) · B_sᵀ       s = the slot of token t (-1: nothing)
//
//   lora_a [S, P*R, in]          the P fused parts' A side by side along the rank
//   lora_b P x [S, out_p, R]     one B per part, expanded into that part's columns of y
//
// What the torch ops cost on a CPU is not their flops (5.6 % of a layer's at rank 16) but their
// number and their copies: BGMV in torch gathers every token's B ([T, out, R], most of a
// layer's LoRA bytes again), SGMV pays a handful of aten calls per adapter per layer. Here:
//
//   bgmv   each token (a decode row) on its own: its h [P*R] from A_s read in place, then the
//          expand; no gather, no temporary beyond h. Parallel over tokens.
//   sgmv   segments of tokens of one slot (a prompt, a chunk; rows listed by `order` when a
//          slot's tokens are not one run): blocks of ROWS tokens share each row of A and each
//          tile of B while it is in L1. Parallel over (segment, block of rows).
//
// The expand reads B [out_p, R] row-major: a dot of R (16) floats per output is a horizontal
// sum per element, so for a block of tokens a tile of OUT_TILE outputs is first transposed into
// bt [R, OUT_TILE] and every token adds h[r] * bt[r, :], a contiguous axpy the compiler
// vectorises (AVX-512: 4 zmm per row of the tile; AVX2: 8 ymm); a lone token (BGMV) takes the
// dots. Arithmetic is in float32 whatever the dtype.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"

namespace {

constexpr int64_t ROWS = 16;      // tokens per block in sgmv: one A row is reused ROWS times
constexpr int64_t OUT_TILE = 64;  // outputs per transposed tile of B

struct LoRAShapes {
  int64_t in, parts, rank, pr;   // pr = parts * rank
  std::vector<int64_t> out, offset;  // each part's width and first column in y
};

LoRAShapes check_shapes(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                        const std::vector<at::Tensor>& lora_b,
                        const c10::optional<at::Tensor>& scales) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0),
              "x [T, in] and y [T, out] must be 2-D with the same rows");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y rows must be contiguous");
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.is_contiguous(), "lora_a must be [S, P*R, in], contiguous");
  TORCH_CHECK(!lora_b.empty(), "lora_b must hold one [S, out_p, R] tensor per part");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == lora_a.scalar_type(),
              "x, y and the slots must have one dtype");
  LoRAShapes s;
  s.in = x.size(1);
  s.parts = static_cast<int64_t>(lora_b.size());
  s.rank = lora_b[0].size(2);
  s.pr = s.parts * s.rank;
  TORCH_CHECK(lora_a.size(1) == s.pr && lora_a.size(2) == s.in, "lora_a is ", lora_a.sizes(),
              ", expected [S, ", s.pr, ", ", s.in, "]");
  int64_t col = 0;
  for (const auto& b : lora_b) {
    TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.size(0) == lora_a.size(0) && b.size(2) == s.rank &&
                    b.scalar_type() == x.scalar_type(),
                "each lora_b must be [S, out_p, R], contiguous, of the slots' dtype");
    s.out.push_back(b.size(1));
    s.offset.push_back(col);
    col += b.size(1);
  }
  TORCH_CHECK(col == y.size(1), "the parts' outputs sum to ", col, ", y has ", y.size(1), " columns");
  if (scales.has_value())
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == lora_a.size(0) &&
                    scales->scalar_type() == at::kFloat,
                "scales must be float32 [S]");
  return s;
}

// h[n, pr] = x_rows · A_slotᵀ (times scale): each row of A is read once for the n tokens, four
// tokens at a time (four independent sums: the FMAs do not wait on each other's latency).
template <typename scalar_t>
void shrink(float* h, const scalar_t* const* xs, int64_t n, const scalar_t* a, const LoRAShapes& s,
            float scale) {
  const int64_t in = s.in;
  for (int64_t r = 0; r < s.pr; ++r) {
    const scalar_t* ar = a + r * in;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const scalar_t *x0 = xs[t], *x1 = xs[t + 1], *x2 = xs[t + 2], *x3 = xs[t + 3];
      float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t d = 0; d < in; ++d) {
        const float av = static_cast<float>(ar[d]);
        d0 += av * static_cast<float>(x0[d]);
        d1 += av * static_cast<float>(x1[d]);
        d2 += av * static_cast<float>(x2[d]);
        d3 += av * static_cast<float>(x3[d]);
      }
      h[t * s.pr + r] = d0 * scale;
      h[(t + 1) * s.pr + r] = d1 * scale;
      h[(t + 2) * s.pr + r] = d2 * scale;
      h[(t + 3) * s.pr + r] = d3 * scale;
    }
    for (; t < n; ++t) {
      const scalar_t* xt = xs[t];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < in; ++d) dot += static_cast<float>(ar[d]) * static_cast<float>(xt[d]);
      h[t * s.pr + r] = dot * scale;
    }
  }
}

// ys[t][offset_p + o] += h[t, p*R : (p+1)*R] · B_p[o, :] for every part p. Few tokens (a
// decode row): one dot of R per output, B read once in place. More: one tile of B at a time,
// transposed so that each token's update is a contiguous axpy (the transpose pays for itself
// from about four tokens on).
template <typename scalar_t>
void expand(scalar_t* const* ys, const float* h, int64_t n, const std::vector<const scalar_t*>& bs,
            const LoRAShapes& s) {
  const int64_t R = s.rank;
  if (n < 4) {
    for (int64_t p = 0; p < s.parts; ++p) {
      const scalar_t* b = bs[p];
      for (int64_t t = 0; t < n; ++t) {
        const float* ht = h + t * s.pr + p * R;
        scalar_t* yt = ys[t] + s.offset[p];
        for (int64_t o = 0; o < s.out[p]; ++o) {
          const scalar_t* bo = b + o * R;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t r = 0; r < R; ++r) dot += static_cast<float>(bo[r]) * ht[r];
          yt[o] = static_cast<scalar_t>(static_cast<float>(yt[o]) + dot);
        }
      }
    }
    return;
  }
  std::vector<float> bt(R * OUT_TILE);  // [R, OUT_TILE]: the tile of B, transposed
  float acc[OUT_TILE];
  for (int64_t p = 0; p < s.parts; ++p) {
    const scalar_t* b = bs[p];
    for (int64_t o0 = 0; o0 < s.out[p]; o0 += OUT_TILE) {
      const int64_t w = std::min(OUT_TILE, s.out[p] - o0);
      for (int64_t j = 0; j < w; ++j)
        for (int64_t r = 0; r < R; ++r) bt[r * OUT_TILE + j] = static_cast<float>(b[(o0 + j) * R + r]);
      for (int64_t t = 0; t < n; ++t) {
        const float* ht = h + t * s.pr + p * R;
#pragma omp simd
        for (int64_t j = 0; j < OUT_TILE; ++j) acc[j] = 0.f;
        for (int64_t r = 0; r < R; ++r) {
          const float hr = ht[r];
          const float* btr = bt.data() + r * OUT_TILE;
#pragma omp simd
          for (int64_t j = 0; j < OUT_TILE; ++j) acc[j] += hr * btr[j];
        }
        scalar_t* yt = ys[t] + s.offset[p] + o0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) yt[j] = static_cast<scalar_t>(static_cast<float>(yt[j]) + acc[j]);
      }
    }
  }
}

// n tokens of one slot: shrink then expand, h kept in a small float buffer.
template <typename scalar_t>
void add_lora_block(scalar_t* const* ys, const scalar_t* const* xs, int64_t n, int64_t slot,
                    const scalar_t* lora_a, const std::vector<const scalar_t*>& lora_b,
                    const LoRAShapes& s, const float* scales, std::vector<float>& h) {
  h.resize(n * s.pr);
  const float scale = scales != nullptr ? scales[slot] : 1.f;
  shrink(h.data(), xs, n, lora_a + slot * s.pr * s.in, s, scale);
  std::vector<const scalar_t*> bs(s.parts);
  for (int64_t p = 0; p < s.parts; ++p) bs[p] = lora_b[p] + slot * s.out[p] * s.rank;
  expand(ys, h.data(), n, bs, s);
}

template <typename scalar_t>
std::vector<const scalar_t*> b_pointers(const std::vector<at::Tensor>& lora_b) {
  std::vector<const scalar_t*> bs;
  for (const auto& b : lora_b) bs.push_back(b.data_ptr<scalar_t>());
  return bs;
}

const float* scales_ptr(const c10::optional<at::Tensor>& scales) {
  return scales.has_value() ? scales->data_ptr<float>() : nullptr;
}

}  // namespace

void bgmv_add_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                   const std::vector<at::Tensor>& lora_b, const at::Tensor& token_slots,
                   const c10::optional<at::Tensor>& scales) {
  const LoRAShapes s = check_shapes(y, x, lora_a, lora_b, scales);
  TORCH_CHECK(token_slots.dim() == 1 && token_slots.size(0) == x.size(0) &&
                  token_slots.scalar_type() == at::kLong && token_slots.is_contiguous(),
              "token_slots must be int64 [T]");
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  const int64_t num_slots = lora_a.size(0);
  for (int64_t t = 0; t < x.size(0); ++t)
    TORCH_CHECK(slots[t] < num_slots, "token ", t, " reads slot ", slots[t], ", there are ", num_slots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bgmv_add_lora", [&] {
    const auto bs = b_pointers<scalar_t>(lora_b);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = lora_a.data_ptr<scalar_t>();
    const float* sc = scales_ptr(scales);
    at::parallel_for(0, x.size(0), 4, [&](int64_t begin, int64_t end) {
      std::vector<float> h;
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;  // the base model: nothing to add
        scalar_t* yt = yp + t * y.stride(0);
        const scalar_t* xt = xp + t * x.stride(0);
        add_lora_block(&yt, &xt, 1, slots[t], ap, bs, s, sc, h);
      }
    });
  });
}

void sgmv_add_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                   const std::vector<at::Tensor>& lora_b, const at::Tensor& segments,
                   const c10::optional<at::Tensor>& order, const c10::optional<at::Tensor>& scales) {
  // segments [K, 3] = (slot, start, end): rows [start, end) of x (or of `order`, the token
  // indices grouped by slot) are all of adapter `slot`.
  const LoRAShapes s = check_shapes(y, x, lora_a, lora_b, scales);
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
    TORCH_CHECK(slot >= 0 && slot < lora_a.size(0) && 0 <= start && start <= end && end <= n_idx,
                "segment ", k, " (slot ", slot, ", rows ", start, "..", end, ") is out of range");
    for (int64_t r = start; r < end; r += ROWS) {
      work.push_back(k);
      work.push_back(r);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sgmv_add_lora", [&] {
    const auto bs = b_pointers<scalar_t>(lora_b);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = lora_a.data_ptr<scalar_t>();
    const float* sc = scales_ptr(scales);
    at::parallel_for(0, static_cast<int64_t>(work.size() / 2), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> h;
      scalar_t* ys[ROWS];
      const scalar_t* xs[ROWS];
      for (int64_t w = begin; w < end; ++w) {
        const int64_t k = work[2 * w], r0 = work[2 * w + 1];
        const int64_t n = std::min(ROWS, seg[3 * k + 2] - r0);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = idx != nullptr ? idx[r0 + i] : r0 + i;
          ys[i] = yp + t * y.stride(0);
          xs[i] = xp + t * x.stride(0);
        }
        add_lora_block(ys, xs, n, seg[3 * k], ap, bs, s, sc, h);
      }
    });
  });
}
