// The small per-token ops of a decoder layer, each one pass over memory instead of the several
// that the torch version makes (one per aten op, each writing a temporary):
//
//   rms_norm            out = weight * (x / sqrt(mean(x^2) + eps))              layernorm.py
//   fused_add_rms_norm  residual = x + residual; x = rms_norm(residual)         layernorm.py
//   rotary_embedding    RoPE on q and k in place, "rotate half" layout          rotary_embedding.py
//   silu_and_mul        out = silu(gate) * up for x = [gate | up]               activation.py
//
// Arithmetic is in float32 whatever the tensors' dtype, rounded where the torch version rounds.
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"

namespace {

// Rows of a [N, D] or [N1, N2, D] tensor whose last dim is contiguous (a strided view is fine:
// q and k are views into the qkv projection's output).
struct Rows {
  int64_t n1, n2, stride0, stride1, dim;
  Rows(const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "expected a 2-D or 3-D tensor, got ", t.dim(), "-D");
    TORCH_CHECK(t.stride(-1) == 1, "the last dimension must be contiguous");
    dim = t.size(-1);
    n1 = t.size(0);
    stride0 = t.stride(0);
    n2 = t.dim() == 3 ? t.size(1) : 1;
    stride1 = t.dim() == 3 ? t.stride(1) : 0;
  }
  int64_t count() const { return n1 * n2; }
  int64_t offset(int64_t r) const { return (r / n2) * stride0 + (r % n2) * stride1; }
};

// Work per parallel chunk: small tensors (a decode step) stay on the calling thread.
int64_t grain(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <typename scalar_t>
void rms_norm_row(scalar_t* out, const scalar_t* x, const scalar_t* w, int64_t dim, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) {
    float v = static_cast<float>(x[d]);
    sum += v * v;
  }
  const float r = 1.f / std::sqrt(sum / dim + eps);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    scalar_t normed = static_cast<scalar_t>(static_cast<float>(x[d]) * r);  // .to(dtype)
    out[d] = static_cast<scalar_t>(static_cast<float>(w[d]) * static_cast<float>(normed));
  }
}

template <typename scalar_t>
void add_rms_norm_row(scalar_t* x, scalar_t* res, const scalar_t* w, int64_t dim, float eps) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d)  // the residual add, rounded to the dtype as torch does
    res[d] = static_cast<scalar_t>(static_cast<float>(x[d]) + static_cast<float>(res[d]));
  rms_norm_row(x, res, w, dim, eps);
}

template <typename scalar_t>
void rotate_half(scalar_t* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {  // the pair (i, i + D/2) is rotated together
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
    x[i] = static_cast<scalar_t>(x1 * cos[i] - x2 * sin[i]);
    x[i + half] = static_cast<scalar_t>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename scalar_t>
void silu_and_mul_row(scalar_t* y, const scalar_t* gate, const scalar_t* up, int64_t inter) {
#pragma omp simd
  for (int64_t i = 0; i < inter; ++i) {
    const float g = static_cast<float>(gate[i]);
    const scalar_t silu = static_cast<scalar_t>(g / (1.f + std::exp(-g)));  // F.silu
    y[i] = static_cast<scalar_t>(static_cast<float>(silu) * static_cast<float>(up[i]));
  }
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  Rows in(input), o(out);
  TORCH_CHECK(in.count() == o.count() && in.dim == o.dim && weight.numel() == in.dim,
              "rms_norm: out, input and weight shapes disagree");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == input.scalar_type(),
              "rms_norm: weight must be contiguous, of the input's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rms_norm", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, in.count(), grain(in.dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        rms_norm_row(y + o.offset(r), x + in.offset(r), w, in.dim, static_cast<float>(epsilon));
    });
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  TORCH_CHECK(input.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "fused_add_rms_norm: tensors must be contiguous");
  TORCH_CHECK(input.sizes() == residual.sizes() && weight.numel() == input.size(-1),
              "fused_add_rms_norm: input, residual and weight shapes disagree");
  const int64_t dim = input.size(-1), rows = input.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        add_rms_norm_row(x + r * dim, res + r * dim, w, dim, static_cast<float>(epsilon));
    });
  });
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache) {
  Rows q(query), k(key);
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3, "rotary_embedding: q and k must be [T, H, D]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "rotary_embedding: positions must be contiguous int64");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous() &&
                  cos_sin_cache.size(1) == q.dim && k.dim == q.dim,
              "rotary_embedding: cos_sin_cache must be contiguous float32 [max_position, head_dim]");
  const int64_t num_tokens = query.size(0), hq = query.size(1), hk = key.size(1);
  const int64_t half = q.dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cache = cos_sin_cache.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "rotary_embedding", [&] {
    scalar_t* qp = query.data_ptr<scalar_t>();
    scalar_t* kp = key.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, grain(q.dim * (hq + hk)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cache + pos[t] * q.dim;  // [D/2] cos, then [D/2] sin
        const float* sin = cos + half;
        for (int64_t h = 0; h < hq + hk; ++h) {
          scalar_t* x = h < hq ? qp + t * q.stride0 + h * q.stride1
                               : kp + t * k.stride0 + (h - hq) * k.stride1;
          rotate_half(x, cos, sin, half);
        }
      }
    });
  });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  TORCH_CHECK(input.is_contiguous() && out.is_contiguous(), "silu_and_mul: tensors must be contiguous");
  const int64_t inter = input.size(-1) / 2, rows = input.numel() / input.size(-1);
  TORCH_CHECK(out.numel() == rows * inter, "silu_and_mul: out must be [..., input.size(-1) / 2]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(inter), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        silu_and_mul_row(y + r * inter, x + r * 2 * inter, x + r * 2 * inter + inter, inter);
    });
  });
}
