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

import torch

from folovllm.model_executor.layers.attention import AttentionBackend, AttentionMetadata

from flash_attn import flash_attn_varlen_func  # noqa: E402  (ImportError -> clear ValueError upstream)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        block_size = key_cache.shape[1]
        if block_size % 256 != 0:
            raise ValueError(
                f"attention_backend='flash_attn' reads a paged cache only with block_size a "
                f"multiple of 256, got {block_size}; set block_size=256"
            )
        cu_seqlens_k = torch.zeros_like(md.query_start_loc)
        torch.cumsum(md.seq_lens, 0, out=cu_seqlens_k[1:])
        return flash_attn_varlen_func(
            q,
            key_cache,
            value_cache,
            cu_seqlens_q=md.query_start_loc.to(torch.int32),
            cu_seqlens_k=cu_seqlens_k.to(torch.int32),
            max_seqlen_q=md.max_query_len,
            max_seqlen_k=md.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=md.block_tables.to(torch.int32),
        )
