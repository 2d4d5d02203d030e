// folovllm's CPU kernels: what vLLM's csrc/cpu does for its CPU build, in plain C++ loops that
// the compiler vectorises (-O3 -march=native). Each one has a readable torch version beside it
// in Python (the layer's `forward_native`), and tests/test_custom_ops.py compares the two.
#pragma once

#include <ATen/ATen.h>

// The blocks that hold a sequence's first seq_len tokens must exist in the cache: a kernel reads
// them through raw pointers, where torch would have raised on a bad index.
inline void check_block_ids(const int64_t* table, int64_t seq_len, int64_t block_size,
                            int64_t num_blocks) {
  for (int64_t b = 0; b < (seq_len + block_size - 1) / block_size; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "block id ", table[b], " is not in the cache (",
                num_blocks, " blocks)");
}

// attention.cpp
void paged_attention_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& query_rows,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale);

// prefill_attention.cpp
void paged_attention_prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_table,
                             int64_t seq_len, double scale);

// elementwise.cpp
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon);
void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache);
void silu_and_mul(at::Tensor& out, const at::Tensor& input);

// lora.cpp (stage 11): y += each token's adapter update, Aᵀ and Bᵀ read in their slots, each
// slot's true rank per part
void bgmv_add_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_at,
                   const std::vector<at::Tensor>& lora_bt, const at::Tensor& ranks,
                   const at::Tensor& token_slots, const c10::optional<at::Tensor>& scales);
void sgmv_add_lora(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_at,
                   const std::vector<at::Tensor>& lora_bt, const at::Tensor& ranks,
                   const at::Tensor& segments, const c10::optional<at::Tensor>& order,
                   const c10::optional<at::Tensor>& scales);

// decode_gemm.cpp
at::Tensor pack_decode_weight(const at::Tensor& weight);
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias);
double stream_read(const at::Tensor& buffer, int64_t streams);

// moe.cpp: one call per MoE layer (grouped by expert, gate|up with SiLU·mul, down, combine)
std::vector<at::Tensor> prepack_moe_weight(const at::Tensor& w13, const at::Tensor& w2);
at::Tensor fused_experts_cpu(const at::Tensor& hidden_states, const at::Tensor& w13p,
                             const at::Tensor& w2p, const at::Tensor& topk_weights,
                             const at::Tensor& topk_ids, int64_t intermediate_size);

// int4_gemm.cpp (stage 07): x [M, K] @ W^T for a GPTQ 4-bit weight in panels of 32 outputs
at::Tensor int4_decode_linear(const at::Tensor& x, const at::Tensor& packed,
                              const c10::optional<at::Tensor>& perm, int64_t group_size,
                              int64_t out_features);

// int4_gemm.cpp (stage 07), opt-in: the same panels with x rounded to int8 per block of 32
// inputs (llama.cpp's Q8_0), integer dot products; changes the result by the rounding of x
at::Tensor int4_decode_linear_q8(const at::Tensor& x, const at::Tensor& packed,
                                 const c10::optional<at::Tensor>& perm, int64_t group_size,
                                 int64_t out_features);
