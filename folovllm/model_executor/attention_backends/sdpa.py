"""`sdpa` backend: `torch.nn.functional.scaled_dot_product_attention`, stage 04's CPU default
when our compiled kernels are off (`custom_ops="none"`; with them, `cpu_attn.py`).

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

Per step, not per layer: everything derived from the metadata (which rows decode, the decode
calls and their gather indices and masks, whether a prefill's blocks are consecutive) is
`SDPAMetadata`, built by `build_metadata` before the first layer runs and read by all of them.
Before it, each layer paid `.tolist()` host syncs and rebuilt the same index tensors: with 28
layers (Qwen3-0.6B) that was most of the backend's Python time on a decode step.

The gather is `index_select` over whole blocks (`cache.index_select(0, block_ids)`), not advanced
indexing (`cache[block_ids]`): the same copy, but `index_select` copies each block as one run of
memory while `aten::index` computes an offset per element. Measured on one thread, Qwen3-0.6B
heads, 520 cached tokens: 0.06 ms against 0.31 ms per K gather.

Left out: reading the paged cache without the gather (that needs a kernel that follows block
tables itself: `triton_attn.py` on GPU, `torch_flash.py` as the readable version).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from folovllm.model_executor.layers.attention import (
    AttentionBackend, AttentionMetadata, PrefillRow, split_prefills_decodes)


@dataclass(frozen=True)
class DecodeCall:
    """c decoding sequences attended to in one SDPA call."""

    rows: torch.Tensor  # [c] the query row of each sequence
    block_ids: torch.Tensor  # [c * nb] blocks to gather, sequence after sequence
    num_blocks: int  # nb, per sequence (the longest one's)
    longest: int  # Lk
    mask: Optional[torch.Tensor]  # [c, 1, 1, Lk] keys each sequence may see; None = all


@dataclass(frozen=True)
class SDPAMetadata(AttentionMetadata):
    """The common metadata plus the step's plan: one SDPA call per prefill, decodes in calls."""

    prefills: list[PrefillRow]
    decode_calls: list[DecodeCall]


class SDPAAttentionBackend(AttentionBackend):
    """Fused SDPA per prefill sequence, decodes batched; K/V gathered from the paged cache."""

    name = "sdpa"

    def __init__(self, decode_chunk_bytes: int = 1 << 20) -> None:
        self.decode_chunk_bytes = decode_chunk_bytes

    # --8<-- [start:sdpa_forward]
    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: SDPAMetadata, scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, Hq, D]
        for p in md.prefills:  # its queries against its whole context
            out[p.start:p.end] = prefill_attention(
                q[p.start:p.end],
                context_kv(key_cache, p.blocks, p.seq_len, p.first_block),
                context_kv(value_cache, p.blocks, p.seq_len, p.first_block),
                scale,
            )
        for call in md.decode_calls:  # the decoding rows, one query each
            decode_attention(q, out, key_cache, value_cache, call, scale)
        return out
    # --8<-- [end:sdpa_forward]

    # --8<-- [start:sdpa_build_metadata]
    def build_metadata(self, common: AttentionMetadata, key_cache: torch.Tensor) -> SDPAMetadata:
        """Which rows prefill and which decode, and the decode calls, once per step."""
        block_size, num_kv_heads, head_dim = key_cache.shape[1:]
        prefills, decodes = split_prefills_decodes(common, block_size)
        seq_lens = common.seq_lens_cpu

        # Decodes: longest first, cut into calls of about `decode_chunk_bytes` of K each.
        bytes_per_token = num_kv_heads * head_dim * key_cache.element_size()
        max_tokens = max(1, self.decode_chunk_bytes // bytes_per_token)  # per call, padded
        decodes.sort(key=lambda b: seq_lens[b], reverse=True)
        calls, chunk_start = [], 0
        tables, device = common.block_tables, common.seq_lens.device
        while chunk_start < len(decodes):
            longest = seq_lens[decodes[chunk_start]]  # sorted: the first is the longest
            num = max(1, min(len(decodes) - chunk_start, max_tokens // longest))
            seqs = decodes[chunk_start:chunk_start + num]
            chunk_start += num
            nb = -(-longest // block_size)
            seqs_t = torch.tensor(seqs, device=device)
            lens = [seq_lens[b] for b in seqs]
            mask = None
            if lens[-1] != longest:  # padded: hide each sequence's keys past its length
                lens_t = torch.tensor(lens, device=device)
                mask = torch.arange(longest, device=device) < lens_t[:, None]  # [c, Lk]
                mask = mask[:, None, None, :]  # [c, 1, 1, Lk], broadcast over heads and the query
            calls.append(DecodeCall(
                rows=common.query_start_loc[seqs_t],
                block_ids=tables[seqs_t, :nb].reshape(-1),  # [c * nb]
                num_blocks=nb, longest=longest, mask=mask,
            ))
        return SDPAMetadata(**common.common_fields(), prefills=prefills, decode_calls=calls)
    # --8<-- [end:sdpa_build_metadata]


# --8<-- [start:sdpa_decode]
def decode_attention(
    q: torch.Tensor, out: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    call: DecodeCall, scale: float,
) -> None:
    """One query per sequence, c sequences in one SDPA call, into their rows of `out`."""
    k = gather_blocks(key_cache, call.block_ids, call.num_blocks, call.longest)  # [c, Lk, Hkv, D]
    v = gather_blocks(value_cache, call.block_ids, call.num_blocks, call.longest)
    o = F.scaled_dot_product_attention(
        q.index_select(0, call.rows).unsqueeze(2),  # [c, Hq, 1, D]
        k.transpose(1, 2), v.transpose(1, 2),  # [c, Hkv, Lk, D]
        attn_mask=call.mask, scale=scale, enable_gqa=True,
    )  # [c, Hq, 1, D]
    out.index_copy_(0, call.rows, o.squeeze(2))
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
def context_kv(
    cache: torch.Tensor, blocks: torch.Tensor, seq_len: int, first_block: Optional[int] = None
) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence whose blocks are `blocks` [nb]:
    [seq_len, Hkv, D].

    A view when the blocks are consecutive in the cache (`first_block` given), else a copy.
    """
    if first_block is not None:
        return cache[first_block:first_block + blocks.shape[0]].flatten(0, 1)[:seq_len]  # a view
    return gather_blocks(cache, blocks, blocks.shape[0], seq_len)[0]
# --8<-- [end:sdpa_context_kv]


def gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, num_blocks: int, seq_len: int
) -> torch.Tensor:
    """Blocks `block_ids` [c * nb] of the cache, as c sequences of their first `seq_len` tokens:
    [c, seq_len, Hkv, D] (a copy).

        block_ids [7 2 9 | 4 5 0]  (c = 2, nb = 3, block_size = 16, seq_len = 40)
        -> cache.index_select(0, ids)  [6, 16, Hkv, D] -> [2, 48, Hkv, D] -> [2, 40, Hkv, D]
    """
    block_size, num_kv_heads, head_dim = cache.shape[1:]
    if num_blocks == 1:  # one (possibly huge, stages 01-02) block each: copy only seq_len tokens
        return cache[:, :seq_len].index_select(0, block_ids)
    blocks = cache.index_select(0, block_ids)  # [c * nb, block_size, Hkv, D]
    return blocks.view(-1, num_blocks * block_size, num_kv_heads, head_dim)[:, :seq_len]
