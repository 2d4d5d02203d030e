"""`sdpa` backend: `torch.nn.functional.scaled_dot_product_attention`, stage 04's CPU default.

SDPA picks a fused kernel by device and inputs; on CPU with float inputs that is
`aten._scaled_dot_product_flash_attention_for_cpu`, a tiled online-softmax kernel (the algorithm
of `torch_flash.py`, in C++), so no [queries x keys] score matrix reaches memory. SDPA wants
dense K/V, so this backend gathers each sequence's context out of the paged cache first:

    key_cache [num_blocks, block_size, Hkv, D]
    block_table of seq b: [7, 2, 9]            (n = 40 tokens, block_size = 16)
    K of seq b = key_cache[[7, 2, 9]].flatten(0, 1)[:40]      -> [40, Hkv, D]   (a copy)
    ... or a view, no copy, when the blocks are consecutive (key_cache[7:10] for [7, 8, 9]),
    which is always the case for the one-block-per-sequence cache of stages 01-02

One step mixes two kinds of sequences, handled differently because their costs differ:

- Prefills (query_len > 1): one SDPA call per sequence. A plain prefill (query_len = seq_len) is
  `is_causal=True`, which the fused kernel does without any mask. A prefill with cached context
  (chunked prefill, a prefix-cache hit) needs the causal mask aligned to the bottom right; SDPA's
  `is_causal` aligns it to the top left, so we pass an explicit [Lq, Lk] boolean mask (one per
  sequence, shared by every head). `torch.nn.attention.bias.causal_lower_right` would build the
  same mask on CPU, and cannot be created under a `TorchDispatchMode` (the stage 04 tests use one).
- Decodes (query_len = 1): batched, several sequences per SDPA call, contexts padded to the
  longest of the call and masked with a [c, 1, 1, Lk] key mask. Calls are cut so each gathered
  K (or V) stays under `decode_chunk_bytes` (1 MiB), so SDPA reads K/V back while the gather
  has just left them in cache. Measured on one CPU thread (`benchmarks/attention_cpu.py` and
  16x1024 / 64x256 / 128x64 / 256x128 decode batches on a 1 MiB-L2 EPYC): 0.5-2 MiB per call is
  the fastest; 4-8 MiB is up to 1.4x slower and all decodes in one call 2.5x slower. One call per
  sequence is as fast for long contexts but pays Python overhead on many short ones. Sequences
  are sorted by length first, so each call pads little.

GQA: `enable_gqa=True`, which the fused CPU kernel supports directly. Measured against
`repeat_interleave` of K/V: the same on prefills (the kernel's compute dominates), 2.5x faster on
decodes (where copying K/V `group` times is most of the work).

Left out: reading the paged cache without the gather (that needs a kernel that follows block
tables itself: `triton_attn.py` on GPU, `torch_flash.py` as the readable version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from folovllm.model_executor.layers.attention import AttentionBackend, AttentionMetadata


class SDPAAttentionBackend(AttentionBackend):
    """Fused SDPA per prefill sequence, decodes batched; K/V gathered from the paged cache."""

    name = "sdpa"

    def __init__(self, decode_chunk_bytes: int = 1 << 20) -> None:
        self.decode_chunk_bytes = decode_chunk_bytes

    # --8<-- [start:sdpa_forward]
    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, Hq, D]
        query_start_loc = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        decodes: list[int] = []
        for b, seq_len in enumerate(seq_lens):
            start, end = query_start_loc[b], query_start_loc[b + 1]
            if end - start == 1:
                decodes.append(b)
            elif end > start:
                out[start:end] = prefill_attention(
                    q[start:end],
                    context_kv(key_cache, md.block_tables[b], seq_len),
                    context_kv(value_cache, md.block_tables[b], seq_len),
                    scale,
                )
        if decodes:
            self._decode(q, out, key_cache, value_cache, md, decodes, query_start_loc, seq_lens,
                         scale)
        return out
    # --8<-- [end:sdpa_forward]

    # --8<-- [start:sdpa_decode]
    def _decode(
        self, q: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, md: AttentionMetadata, decodes: list[int],
        query_start_loc: list[int], seq_lens: list[int], scale: float,
    ) -> None:
        """One query per sequence: batch them, about `decode_chunk_bytes` of K per SDPA call."""
        block_size, num_kv_heads, head_dim = key_cache.shape[1:]
        bytes_per_token = num_kv_heads * head_dim * key_cache.element_size()
        max_tokens = max(1, self.decode_chunk_bytes // bytes_per_token)  # per call, padded

        decodes = sorted(decodes, key=lambda b: seq_lens[b], reverse=True)
        chunk_start = 0
        while chunk_start < len(decodes):
            longest = seq_lens[decodes[chunk_start]]  # sorted: the first is the longest
            num = max(1, min(len(decodes) - chunk_start, max_tokens // longest))
            seqs = decodes[chunk_start:chunk_start + num]
            chunk_start += num

            device = q.device
            rows = torch.tensor([query_start_loc[b] for b in seqs], device=device)  # [c]
            lens = [seq_lens[b] for b in seqs]
            tables = md.block_tables[torch.tensor(seqs, device=device)]  # [c, W]
            k = batched_context_kv(key_cache, tables, longest)  # [c, Lk, Hkv, D]
            v = batched_context_kv(value_cache, tables, longest)
            mask = None
            if lens[-1] != longest:  # padded: hide each sequence's keys past its length
                lens_t = torch.tensor(lens, device=device)
                mask = torch.arange(longest, device=device) < lens_t[:, None]  # [c, Lk]
                mask = mask[:, None, None, :]  # [c, 1, 1, Lk], broadcast over heads and the query
            o = F.scaled_dot_product_attention(
                q[rows].unsqueeze(2),  # [c, Hq, 1, D]
                k.transpose(1, 2), v.transpose(1, 2),  # [c, Hkv, Lk, D]
                attn_mask=mask, scale=scale, enable_gqa=True,
            )  # [c, Hq, 1, D]
            out[rows] = o.squeeze(2)
    # --8<-- [end:sdpa_decode]


# --8<-- [start:sdpa_prefill]
def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [Lq, Hq, D] are the last Lq positions of a sequence whose K/V are k, v [Lk, Hkv, D]."""
    num_queries, num_keys = q.shape[0], k.shape[0]
    mask = None
    if num_queries != num_keys:
        # Causal aligned to the bottom right: query i sits at position Lk - Lq + i.
        #   Lq = 2, Lk = 5:   key  0 1 2 3 4
        #                     q 0  x x x x .
        #                     q 1  x x x x x
        q_pos = torch.arange(num_keys - num_queries, num_keys, device=q.device)  # [Lq]
        mask = torch.arange(num_keys, device=q.device) <= q_pos[:, None]  # [Lq, Lk]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, Hq, Lq, D]
        k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),  # [1, Hkv, Lk, D]
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
    )  # [1, Hq, Lq, D]
    return out.squeeze(0).transpose(0, 1)  # [Lq, Hq, D]
# --8<-- [end:sdpa_prefill]


# --8<-- [start:sdpa_context_kv]
def context_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence: [seq_len, Hkv, D].

    A view when the sequence's blocks are consecutive in the cache, else a copy of its blocks.
    """
    block_size = cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)]  # [nb], ceil division
    first = int(blocks[0])
    if blocks.shape[0] == 1 or bool((blocks[1:] - blocks[:-1] == 1).all()):
        return cache[first:first + blocks.shape[0]].flatten(0, 1)[:seq_len]  # a view
    return cache[blocks].flatten(0, 1)[:seq_len]  # [nb * block_size, Hkv, D] -> [seq_len, Hkv, D]
# --8<-- [end:sdpa_context_kv]


def batched_context_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first `seq_len` cached tokens of several sequences: [c, seq_len, Hkv, D] (a copy)."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    if num_blocks == 1:  # one (possibly huge) block each: copy only its first seq_len tokens
        return cache[block_tables[:, 0], :seq_len]
    blocks = cache[block_tables[:, :num_blocks]]  # [c, nb, block_size, Hkv, D]
    return blocks.flatten(1, 2)[:, :seq_len]
