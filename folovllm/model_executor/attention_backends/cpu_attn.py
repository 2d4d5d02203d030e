"""`cpu_attn` backend: attention read straight out of the paged KV cache by our C++ kernels
(`csrc/cpu/`), the CPU default when they build (`EngineConfig.custom_ops`); vLLM's CPU backend
is `cpu_attn.py` too.

    decodes   attention.cpp          one query per sequence; all decodes of the step in one call
    prefills  prefill_attention.cpp  a prompt or a chunk of one over its cached context, tiled
                                     like FlashAttention (stage 04), one call per sequence

Why: `sdpa` copies every sequence's K and V out of the cache (the gather) before SDPA reads them
again, so each cached byte moves three times (read, write the copy, read the copy), and decodes
pay a padded SDPA call per chunk of sequences. The kernels walk each sequence's block table and
read every cached K and V row in place. On this CPU torch's own SDPA prefill kernel does its
tile products with MKL's sgemm, which is slow on AMD (the same reason `dense_linear` uses
oneDNN); ours are loops the compiler vectorises. Measured on docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from folovllm._custom_ops import load_ops
from folovllm.model_executor.attention_backends.sdpa import (
    SDPAAttentionBackend,
    _Prefill,
    split_prefills_decodes,
)
from folovllm.model_executor.layers.attention import AttentionMetadata


@dataclass
class _CPUPlan:
    prefills: list[_Prefill]
    decode_rows: Optional[torch.Tensor]  # [c] the query row of each decoding sequence (int64)
    decode_tables: Optional[torch.Tensor]  # [c, max_blocks] their block tables (int64)
    decode_lens: Optional[torch.Tensor]  # [c] their context lengths (int64)


class CPUAttentionBackend(SDPAAttentionBackend):
    """Prefills and decodes by our kernels; the step plan (which rows decode, each prefill's
    blocks) is the parent's, built once per step."""

    name = "cpu_attn"

    def __init__(self) -> None:
        super().__init__()
        self.ops = load_ops()  # raises, saying why, when the kernels cannot be built

    # --8<-- [start:cpu_attn_kernels]
    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        # the kernels read q through raw pointers: one contiguous copy (Qwen2/Llama's q is a
        # view into the qkv output; Qwen3's comes out of its q-norm contiguous already)
        return super().forward(q.contiguous(), key_cache, value_cache, md, scale)

    def prefill(
        self, q: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, p: _Prefill, scale: float,
    ) -> None:
        """One prompt (or chunk) against its cached context, read in place through its blocks."""
        self.ops.paged_attention_prefill(
            out[p.start:p.end], q[p.start:p.end], key_cache, value_cache,
            p.blocks, p.seq_len, scale,
        )

    def decode(
        self, q: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, plan: _CPUPlan, scale: float,
    ) -> None:
        """Every decode of the step in one call."""
        if plan.decode_rows is not None:
            self.ops.paged_attention_decode(
                out, q, key_cache, value_cache,
                plan.decode_rows, plan.decode_tables, plan.decode_lens, scale,
            )
    # --8<-- [end:cpu_attn_kernels]

    # --8<-- [start:cpu_attn_plan]
    def _build_plan(self, md: AttentionMetadata, key_cache: torch.Tensor) -> _CPUPlan:
        prefills, decodes, _ = split_prefills_decodes(md, key_cache.shape[1])
        if not decodes:
            return _CPUPlan(prefills, None, None, None)
        seqs = torch.tensor(decodes, device=md.seq_lens.device)
        return _CPUPlan(
            prefills,
            decode_rows=md.query_start_loc[seqs].long(),
            decode_tables=md.block_tables[seqs].long().contiguous(),
            decode_lens=md.seq_lens[seqs].long(),
        )
    # --8<-- [end:cpu_attn_plan]
