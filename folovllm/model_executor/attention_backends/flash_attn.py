"""`flash_attn` backend: the flash-attn package's kernels, when it is installed (CUDA only).

One call covers a whole mixed step: `flash_attn_varlen_func` takes the packed queries with their
`cu_seqlens_q`, reads K/V straight from the paged cache through `block_table`, and aligns the
causal mask to the bottom right, so a query chunk with cached context and a decode row (query
length 1) are both just "the last `query_len` positions of a sequence of `seq_len`".

Limits of upstream flash-attn 2: paged K/V needs `block_size` to be a multiple of 256, and
fp16/bf16 only. flash-attn is not on this project's CI machines nor on the lent GPU image, so this
backend is exercised only where a user installs it; `stages/04` runs its test when it can.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from folovllm.model_executor.layers.attention import AttentionBackend, AttentionMetadata

from flash_attn import flash_attn_varlen_func  # noqa: E402  (ImportError -> clear ValueError upstream)


@dataclass(frozen=True)
class FlashAttnMetadata(AttentionMetadata):
    """The common metadata plus flash-attn's own spelling of it (int32, cumulative key lengths)."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32, query_start_loc
    cu_seqlens_k: torch.Tensor  # [B+1] int32, where each sequence's context would start if packed
    block_table: torch.Tensor  # [B, max_blocks] int32


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def build_metadata(self, common: AttentionMetadata, key_cache: torch.Tensor) -> FlashAttnMetadata:
        block_size = key_cache.shape[1]
        if block_size % 256 != 0:
            raise ValueError(
                f"attention_backend='flash_attn' reads a paged cache only with block_size a "
                f"multiple of 256, got {block_size}; set block_size=256"
            )
        cu_seqlens_k = torch.zeros_like(common.query_start_loc)
        torch.cumsum(common.seq_lens, 0, out=cu_seqlens_k[1:])
        return FlashAttnMetadata(
            **common.common_fields(),
            cu_seqlens_q=common.query_start_loc.to(torch.int32),
            cu_seqlens_k=cu_seqlens_k.to(torch.int32),
            block_table=common.block_tables.to(torch.int32),
        )

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: FlashAttnMetadata, scale: float,
    ) -> torch.Tensor:
        return flash_attn_varlen_func(
            q,
            key_cache,
            value_cache,
            cu_seqlens_q=md.cu_seqlens_q,
            cu_seqlens_k=md.cu_seqlens_k,
            max_seqlen_q=md.max_query_len,
            max_seqlen_k=md.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=md.block_table,
        )
