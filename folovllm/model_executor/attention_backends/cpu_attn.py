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
from folovllm.model_executor.layers.attention import (
    AttentionBackend, AttentionMetadata, PrefillRow, split_prefills_decodes)


@dataclass(frozen=True)
class CPUAttnMetadata(AttentionMetadata):
    """The common metadata plus what the kernels take: each prefill's span and blocks, and the
    decoding rows as three int64 tensors (None when the step has no decode)."""

    prefills: list[PrefillRow]
    decode_rows: Optional[torch.Tensor]  # [c] the query row of each decoding sequence
    decode_tables: Optional[torch.Tensor]  # [c, max_blocks] their block tables
    decode_lens: Optional[torch.Tensor]  # [c] their context lengths


class CPUAttentionBackend(AttentionBackend):
    """Prefills and decodes by our kernels, reading the paged cache in place."""

    name = "cpu_attn"

    def __init__(self) -> None:
        self.ops = load_ops()  # raises, saying why, when the kernels cannot be built

    # --8<-- [start:cpu_attn_kernels]
    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: CPUAttnMetadata, scale: float,
    ) -> torch.Tensor:
        # the kernels read q through raw pointers: one contiguous copy (Qwen2/Llama's q is a
        # view into the qkv output; Qwen3's comes out of its q-norm contiguous already)
        q = q.contiguous()
        out = torch.empty_like(q)  # [T, Hq, D]
        for p in md.prefills:  # one prompt (or chunk) against its context, through its blocks
            self.ops.paged_attention_prefill(
                out[p.start:p.end], q[p.start:p.end], key_cache, value_cache,
                p.blocks, p.seq_len, scale,
            )
        if md.decode_rows is not None:  # every decode of the step in one call
            self.ops.paged_attention_decode(
                out, q, key_cache, value_cache,
                md.decode_rows, md.decode_tables, md.decode_lens, scale,
            )
        return out
    # --8<-- [end:cpu_attn_kernels]

    # --8<-- [start:cpu_attn_build_metadata]
    def build_metadata(self, common: AttentionMetadata, key_cache: torch.Tensor) -> CPUAttnMetadata:
        prefills, decodes = split_prefills_decodes(common, key_cache.shape[1])
        rows = tables = lens = None
        if len(decodes) == common.num_seqs:  # a decode-only step: the common tensors as they are
            rows = common.query_start_loc[:-1]  # [B] one query each: row b starts at b
            tables, lens = common.block_tables, common.seq_lens
        elif decodes:
            seqs = torch.tensor(decodes, device=common.seq_lens.device)
            rows = common.query_start_loc[seqs].long()
            tables = common.block_tables[seqs].long().contiguous()
            lens = common.seq_lens[seqs].long()
        return CPUAttnMetadata(**common.common_fields(), prefills=prefills,
                               decode_rows=rows, decode_tables=tables, decode_lens=lens)
    # --8<-- [end:cpu_attn_build_metadata]
