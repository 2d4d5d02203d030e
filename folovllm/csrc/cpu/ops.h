// folovllm's CPU kernels: what vLLM's csrc/cpu does for its CPU build, in plain C++ loops that
// the compiler vectorises (-O3 -march=native). Each one has a readable torch version beside it
// in Python (the layer's `forward_native`), and tests/test_custom_ops.py compares the two.
#pragma once

#include <ATen/ATen.h>

// attention.cpp
void paged_attention_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& query_rows,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale);

// elementwise.cpp
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon);
void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache);
void silu_and_mul(at::Tensor& out, const at::Tensor& input);
