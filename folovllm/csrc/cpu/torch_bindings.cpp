// The Python side of the kernels: `folovllm._custom_ops` builds this file (with the others in
// this folder) on first use and calls these functions.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode,
        "One query per sequence against its K/V, read in place through its block table");
  m.def("paged_attention_prefill", &paged_attention_prefill,
        "The last Lq positions of one sequence against its K/V, causal, tiled (FlashAttention)");
  m.def("rms_norm", &rms_norm, "out = weight * x / rms(x)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm,
        "residual += input; input = weight * residual / rms(residual), both in place");
  m.def("rotary_embedding", &rotary_embedding, "RoPE (rotate-half layout), in place on q and k");
  m.def("pack_decode_weight", &pack_decode_weight,
        "weight [N, K] -> [ceil(N / 32), K, 32] (bfloat16: [ceil(N / 32), ceil(K / 2), 64]), the layout decode_linear streams");
  m.def("decode_linear", &decode_linear, py::arg("x"), py::arg("packed"), py::arg("out_features"),
        py::arg("bias") = py::none(),
        "x [M, K] @ W^T (+ bias) on the packed weight: each weight read once per call");
  m.def("stream_read", &stream_read, py::arg("buffer"), py::arg("streams") = 1,
        "sum of a float32 buffer read as 1-4 side-by-side streams: the machine's best-case read (roofline)");
  m.def("int4_decode_linear", &int4_decode_linear, py::arg("x"), py::arg("packed"), py::arg("perm"),
        py::arg("group_size"), py::arg("out_features"),
        "x [M, K] (float32 / bfloat16) @ W^T for a GPTQ 4-bit weight in int4 panels, in x's dtype");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(x[:, :I]) * x[:, I:]");
  m.def("bgmv_add_lora", &bgmv_add_lora,
        "y += each token's (x A_slot^T) B_slot^T, token by token (decode rows; slot -1: none); "
        "A^T [S, in, W], B^T P x [S, R, out_p], ranks [S, P]");
  m.def("sgmv_add_lora", &sgmv_add_lora,
        "y += (x A_slot^T) B_slot^T for segments (slot, start, end) of tokens, optionally via order");
  m.def("prepack_moe_weight", &prepack_moe_weight,
        "w13 [E, 2I, H], w2 [E, H, I] -> [w13p [E, Ipad/16, H, 32], w2p [E, ceil(H/32), Ipad, 32]]");
  m.def("fused_experts_cpu", &fused_experts_cpu,
        "One MoE layer: pairs grouped by expert, gate|up + SiLU*mul, down, weighted combine");
  m.def("int4_decode_linear_q8", &int4_decode_linear_q8, py::arg("x"), py::arg("packed"), py::arg("perm"),
        py::arg("group_size"), py::arg("out_features"),
        "int4_decode_linear with x rounded to int8 per block of 32 inputs (Q8_0) and integer dot products");
}
