"""Stage 07's fused GPTQ dequant-matmul kernel in Triton: y = x @ dequantize(qweight) + bias.

Its plain-torch reference is `gptq_matmul_reference` in `gptq.py`; `stages/07/gptq_triton_cases.py`
compares the two under `TRITON_INTERPRET=1` (on CPU) or compiled (on a GPU).

One program computes a [BLOCK_M, BLOCK_N] tile of y, walking K in steps of BLOCK_K::

    x tile   [BLOCK_M, BLOCK_K]  float, from memory
    codes    [BLOCK_K, BLOCK_N]  int32 words qweight[k // P, n], shifted by (k % P) * bits
    zeros    [BLOCK_K, BLOCK_N]  qzeros[g_idx[k], n // P] >> (n % P) * bits (v2: real zeros)
    scales   [BLOCK_K, BLOCK_N]  scales[g_idx[k], n]
    w        = (codes - zeros) * scales       dequantized in registers, never written out
    acc     += x tile @ w                     tl.dot, accumulated in float32

So global memory sees the 4-bit codes (each int32 word is read by the P rows that share it, from
cache) and not a float matrix: the point of GPTQ for decode, where reading weights is the cost.
Gathering scales and zeros through `g_idx` handles act-order without a permutation.

Left out: split-K for batch-1 decode on large GPUs, autotuning, and the Marlin/Exllama-style
repacked layouts that make the GPU kernels in vLLM faster.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


# --8<-- [start:kernel]
@triton.jit
def gptq_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m, mask_n = offs_m < M, offs_n < N
    zero_shift = (offs_n % PACK) * BITS  # [BN] where output n's zero sits in its qzeros word
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k // PACK)[:, None] * stride_qw + offs_n[None, :],
                        mask=mask_kn, other=0)  # [BK, BN] int32
        codes = (words >> ((offs_k % PACK) * BITS)[:, None]) & MASK
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)  # [BK] group of each input
        zwords = tl.load(qzeros_ptr + g[:, None] * stride_qz + (offs_n // PACK)[None, :],
                         mask=mask_kn, other=0)
        zeros = (zwords >> zero_shift[None, :]) & MASK  # [BK, BN]
        scales = tl.load(scales_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask_kn, other=0.0)
        w = (codes - zeros).to(scales.dtype) * scales  # [BK, BN], as the reference rounds it
        acc += tl.dot(x.to(w.dtype), w, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
# --8<-- [end:kernel]


def gptq_matmul_triton(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
    g_idx: torch.Tensor, bits: int, bias: Optional[torch.Tensor] = None,
    block_m: Optional[int] = None, block_n: int = 64, block_k: int = 32,
) -> torch.Tensor:
    """[M, K] -> [M, N] in `scales`' dtype. Tile sizes: decode (M <= 16) takes BLOCK_M = 16,
    the smallest `tl.dot` accepts; larger batches 64."""
    M, K = x.shape
    N = qweight.shape[1]
    assert qweight.shape[0] * (32 // bits) == K, (qweight.shape, K)
    x = x.to(scales.dtype).contiguous()
    y = torch.empty(M, N, dtype=scales.dtype, device=x.device)
    if block_m is None:
        block_m = 16 if M <= 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    gptq_matmul_kernel[grid](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else scales, y,
        M, N, K,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **({} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": 4}),
    )
    return y
