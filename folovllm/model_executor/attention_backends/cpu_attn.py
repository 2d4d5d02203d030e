"""`cpu_attn` backend: decodes read the paged KV cache in place, with our C++ kernel
(`csrc/cpu/attention.cpp`); prefills go to SDPA as in the `sdpa` backend. The CPU default
when the kernels build (`EngineConfig.custom_ops`); vLLM's CPU backend is `cpu_attn.py` too.

Why: `sdpa` copies every decoding sequence's K and V out of the cache (the gather) before SDPA
reads them again, so a decode step moves each cached byte three times (read, write the copy,
read the copy) and pays a padded SDPA call per chunk of sequences. The kernel walks each
sequence's block table and reads every cached K and V row once, all decodes in one call.
Measured on docs/performance.md.

Prefills stay with SDPA: a prompt's queries share their K/V, which SDPA's tiled kernel turns
into matrix products; a per-query loop would not.
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
    """Prefills by SDPA (the parent's), decodes by the paged kernel, all in one call."""

    name = "cpu_attn"

    def __init__(self) -> None:
        super().__init__()
        self.ops = load_ops()  # raises, saying why, when the kernels cannot be built

    # --8<-- [start:cpu_attn_decode]
    def decode(
        self, q: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, plan: _CPUPlan, scale: float,
    ) -> None:
        if plan.decode_rows is not None:
            self.ops.paged_attention_decode(
                out, q.contiguous(), key_cache, value_cache,
                plan.decode_rows, plan.decode_tables, plan.decode_lens, scale,
            )

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
    # --8<-- [end:cpu_attn_decode]
