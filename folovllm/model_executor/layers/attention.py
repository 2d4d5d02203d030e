"""The attention layer: the one place where the engine's KV cache meets the model.

The model files compute q, k, v and call `Attention.forward(q, k, v, attn_metadata)`. This layer
writes the new k, v into the KV cache, then lets each query attend to its sequence's cached keys.
Everything the engine decides about a step (which sequences, how many new tokens each, where their
K/V lives) arrives in one `AttentionMetadata`.

KV cache layout, one pair of tensors per layer::

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]

A sequence owns a list of blocks, its *block table*; token `i` of a sequence lives in block
`block_table[i // block_size]` at offset `i % block_size`. Stage 01 and 02 use one block per
sequence whose `block_size` is the whole sequence capacity (a contiguous cache); stage 03 makes
blocks small and hands them out on demand (paged). The attention code is the same for both.

    flat slot = block_id * block_size + offset       (`slot_mapping` holds it for new tokens)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step description of the batch, built once by the model runner before the forward pass
    (vLLM's `CommonAttentionMetadata`); every layer reads the same one.

    The new tokens of all sequences are packed back to back (T tokens in all)::

        tokens:          [a0 a1 a2 | b0 | c0 c1]        T = 6, B = 3
        query_start_loc: [0,        3,   4,     6]      seq b's queries: [qsl[b], qsl[b+1])
        seq_lens:        [3,        9,   2]             context length after this step
        (b0 is a decode: 8 cached tokens + 1 new; a and c are prefills)

    Attributes:
        slot_mapping: [T] flat cache slot where each new token's K/V is written.
        query_start_loc: [B+1] cumulative number of new tokens per sequence.
        seq_lens: [B] tokens in each sequence's context after this step (cached + new).
        block_tables: [B, max_blocks_per_seq] block ids of each sequence (padded with 0).
        max_query_len: longest run of new tokens in the batch (python int).
        max_seq_len: longest context in the batch (python int).
        query_start_loc_cpu, seq_lens_cpu, block_tables_cpu: the same numbers as python lists
            (block tables unpadded), which the runner had before it made the tensors. A backend
            that loops over sequences reads these: a `.tolist()` of the tensors would wait for
            the device, once per layer.

    A backend whose `forward` needs more (which rows decode, gather indices, masks) derives it
    once per step in `AttentionBackend.build_metadata`, as a subclass of this class. Frozen: a
    layer cannot change what the next layer reads.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_tables_cpu: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def from_lists(
        cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
        positions: torch.Tensor, block_size: int,
    ) -> AttentionMetadata:
        """The step's metadata from each sequence's number of new tokens, context length and
        blocks, with the tensors on `positions`' device; positions [T] are the new tokens'
        positions (`ModelRunner.prepare_inputs`), from which each one's slot follows.
        """
        device = positions.device
        width = max(len(t) for t in block_tables)
        tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device
        )  # [B, max_blocks]
        query_start_loc = list(itertools.accumulate(query_lens, initial=0))  # [B+1]
        query_lens_t = torch.tensor(query_lens, dtype=torch.long, device=device)
        # Which sequence each token belongs to, then its slot through that sequence's blocks.
        seq = torch.repeat_interleave(torch.arange(len(query_lens), device=device), query_lens_t)
        slot_mapping = tables[seq, positions // block_size] * block_size + positions % block_size
        return cls(
            slot_mapping=slot_mapping,
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.long, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
            block_tables=tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=list(seq_lens),
            block_tables_cpu=[list(t) for t in block_tables],
        )

    def common_fields(self) -> dict[str, Any]:
        """The fields above, for a backend's metadata (a subclass) to be built from them."""
        return {f.name: getattr(self, f.name) for f in fields(AttentionMetadata)}


class Attention(nn.Module):
    """Scaled dot-product attention over the KV cache with grouped-query heads."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Bound by the model runner once the cache exists: (key_cache, value_cache).
        self.kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # How attention is computed (stage 04 swaps it); set by the model runner.
        self.backend: AttentionBackend = NaiveAttentionBackend()

    # --8<-- [start:attention_forward]
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, Hq, D]; k, v [T, Hkv, D] -> out [T, Hq, D]."""
        assert self.kv_cache is not None, "the model runner must bind a KV cache first"
        key_cache, value_cache = self.kv_cache
        self.backend.store_kv_cache(k, v, key_cache, value_cache, attn_metadata.slot_mapping)
        return self.backend.forward(q, key_cache, value_cache, attn_metadata, self.scale)
    # --8<-- [end:attention_forward]


# --8<-- [start:attention_backend]
class AttentionBackend:
    """One way of computing attention over the paged KV cache (stage 04 adds several).

    Every backend has the same three methods and must give the same output as `naive_attention`:

        build_metadata(common, key_cache) -> md      once per step, by the model runner
        store_kv_cache(k, v, key_cache, value_cache, slot_mapping)   new K/V into their slots
        forward(q [T, Hq, D], key_cache, value_cache, md, scale) -> [T, Hq, D]   every layer

    where query i of sequence b sits at position `seq_lens[b] - query_len[b] + i` and attends
    causally to that sequence's cached tokens (read through `md.block_tables`). `forward` reads
    only its arguments: whatever it needs beyond the common metadata (host lists turned into
    index tensors, which rows decode) `build_metadata` derived before the first layer ran.
    """

    name = "base"

    def build_metadata(self, common: AttentionMetadata, key_cache: torch.Tensor) -> AttentionMetadata:
        """What this backend's `forward` reads, for every layer of the step (vLLM's
        `AttentionMetadataBuilder.build`). `key_cache` is any layer's cache: they share one
        layout (block size, KV heads, head size, dtype). By default the common metadata as is."""
        return common

    def store_kv_cache(
        self, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> None:
        store_kv_cache(k, v, key_cache, value_cache, slot_mapping)

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        raise NotImplementedError
# --8<-- [end:attention_backend]


class NaiveAttentionBackend(AttentionBackend):
    """Stages 01-03: gather K/V, materialise every score (see `naive_attention`)."""

    name = "naive"

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        return naive_attention(q, key_cache, value_cache, md, scale)


@dataclass(frozen=True)
class PrefillRow:
    """A sequence with more than one new token (a prompt, or a chunk of one over its cached
    context): queries q[start:end] over the first `seq_len` tokens of its `blocks`."""

    start: int
    end: int
    seq_len: int
    blocks: torch.Tensor  # [nb] block ids of its context
    first_block: Optional[int]  # the first block when all nb are consecutive (a view), else None


def split_prefills_decodes(
    md: AttentionMetadata, block_size: int, one_query_is_decode: bool = True
) -> tuple[list[PrefillRow], list[int]]:
    """The step's prefills (query_len > 1) and the indices of its decodes (query_len = 1), from
    the host lists: backends that handle the two kinds apart (`sdpa`, `cpu_attn`) start here.
    `one_query_is_decode=False` makes every sequence a prefill (the batch-invariant mode's
    attention, attention_backends/cpu_attn_invariant.py)."""
    qsl = md.query_start_loc_cpu
    prefills, decodes = [], []
    for b, seq_len in enumerate(md.seq_lens_cpu):
        start, end = qsl[b], qsl[b + 1]
        if end - start == 1 and one_query_is_decode:
            decodes.append(b)
        elif end > start:
            nb = -(-seq_len // block_size)  # ceil division
            ids = md.block_tables_cpu[b][:nb]
            consecutive = ids == list(range(ids[0], ids[0] + nb))
            prefills.append(PrefillRow(
                start, end, seq_len, md.block_tables[b, :nb], ids[0] if consecutive else None
            ))
    return prefills, decodes


# --8<-- [start:store_kv_cache]
def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the new tokens' K/V [T, Hkv, D] into their slots of the cache."""
    num_kv_heads, head_dim = key_cache.shape[-2:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
# --8<-- [end:store_kv_cache]


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int
) -> torch.Tensor:
    """Copy each sequence's first `max_seq_len` cached tokens into a dense [B, L, Hkv, D] tensor.

    Token i of sequence b sits at `block_tables[b, i // block_size] * block_size + i % block_size`.
    """
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    if block_tables.shape[1] == 1:  # one block per sequence (contiguous cache): a row gather
        return cache[block_tables[:, 0], :max_seq_len]
    pos = torch.arange(max_seq_len, device=cache.device)  # [L]
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    return cache.view(-1, num_kv_heads, head_dim)[slots]


# --8<-- [start:naive_attention]
def naive_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The reference: gather K/V, materialise the full score matrix, mask, softmax, weight V.

    Queries are padded to [B, max_query_len] so every sequence is one row of a batched matmul.
    Query i of sequence b sits at position `seq_lens[b] - query_len[b] + i`; it may see key j
    when `j <= its position` (causal). Keys past a sequence's length are only ever visible to
    padding queries, whose outputs are thrown away.

    Peak memory: the scores are [B, Hkv, group * max_query_len, max_seq_len] float32 (one row
    per query head and query), which is what stage 04 (FlashAttention) removes.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    B, Lq, Lk = md.num_seqs, md.max_query_len, md.max_seq_len
    device = q.device

    query_lens = md.query_start_loc[1:] - md.query_start_loc[:-1]  # [B]
    # Position of each new token inside its sequence, and its row in the padded [B*Lq] layout.
    seq_idx = torch.repeat_interleave(torch.arange(B, device=device), query_lens)  # [T]
    idx_in_seq = torch.arange(num_tokens, device=device) - md.query_start_loc[seq_idx]  # [T]
    padded_row = seq_idx * Lq + idx_in_seq  # [T]

    q_pad = q.new_zeros(B * Lq, num_heads, head_dim)
    q_pad[padded_row] = q
    # [B, Lq, Hkv, group, D] -> [B, Hkv, group*Lq, D]: the `group` query heads that share one KV
    # head become extra rows of one matmul with it, so K/V are neither repeated nor broadcast
    # (a broadcast batch dim would make matmul copy K and V once more).
    q_pad = q_pad.view(B, Lq, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q_pad = q_pad.reshape(B, num_kv_heads, group * Lq, head_dim)
    k = gather_kv(key_cache, md.block_tables, Lk).transpose(1, 2)  # [B, Hkv, Lk, D]
    v = gather_kv(value_cache, md.block_tables, Lk).transpose(1, 2)  # [B, Hkv, Lk, D]

    # Scale q rather than the scores: [.., group*Lq, D] is smaller than [.., group*Lq, Lk].
    scores = (q_pad.float() * scale) @ k.float().transpose(-1, -2)  # [B, Hkv, group*Lq, Lk]
    scores = scores.view(B, num_kv_heads, group, Lq, Lk)
    q_pos = (md.seq_lens - query_lens)[:, None] + torch.arange(Lq, device=device)  # [B, Lq]
    k_pos = torch.arange(Lk, device=device)  # [Lk]
    visible = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Lq, Lk]
    scores.masked_fill_(~visible[:, None, None], float("-inf"))  # in place: no second copy
    probs = torch.softmax(scores, dim=-1).view(B, num_kv_heads, group * Lq, Lk)
    out = probs @ v.float()  # [B, Hkv, group*Lq, D]
    out = out.view(B, num_kv_heads, group, Lq, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(B * Lq, num_heads, head_dim)[padded_row].to(q.dtype)
# --8<-- [end:naive_attention]
