"""Stage 04's Triton kernels: KV store, varlen causal prefill over a paged cache, paged decode.

The launch code (grids, tile sizes, the split heuristic) is in `triton_attn.py`; this file holds
only `@triton.jit` functions. Their plain-torch reference is `naive_attention` in
`folovllm/layers/attention.py`, and `stages/04/test_04_triton.py` compares the two (on CPU, under
`TRITON_INTERPRET=1`).

Shared vocabulary (the same as `AttentionMetadata`)::

    q, out          [T, Hq, D]          new tokens of all sequences, packed back to back
    key/value cache [num_blocks, BLOCK_SIZE, Hkv, D]
    query_start_loc [B+1]    sequence b's queries are q[qsl[b] : qsl[b+1]]
    seq_lens        [B]      context length after this step (cached + new)
    block_tables    [B, W]   key j of sequence b lives in block block_tables[b, j // BLOCK_SIZE]
                             at offset j % BLOCK_SIZE

    query i of sequence b sits at position  seq_lens[b] - query_len[b] + i  and sees keys <= it;
    query head h reads KV head  h // GROUP  (GROUP = Hq // Hkv, grouped-query attention)

Every kernel keeps the softmax *online* (FlashAttention): a running max `m`, a running sum `l`
and an unnormalised output `acc`, rescaled by `alpha = 2^(m_old - m_new)` whenever a new KV tile
raises the max, so no [queries x keys] score matrix ever reaches memory. Scores are kept in base 2
(`scale * log2(e)` is folded into them once) so each exponential is one `exp2`.

Key tiles are read through the block table one *token* at a time (a [BLOCK_N] gather of block
ids), so the KV tile size is independent of the cache's block size: with blocks of 16 and tiles
of 64 one tile spans four blocks; with the stage 01-02 contiguous cache (one block per sequence,
block size = capacity) a tile is a slice of that block.

Left out: alibi, sliding windows, soft-capping, fp8 KV caches, and sinks (vLLM's unified kernel
has them; Qwen3, Qwen2 and Llama need none of them).
"""

from __future__ import annotations

import triton
import triton.language as tl


# --8<-- [start:store_kvcache_kernel]
@triton.jit
def store_kvcache_kernel(
    k_ptr, v_ptr,                       # [T, Hkv, D], last dim contiguous (may be a view of qkv)
    key_cache_ptr, value_cache_ptr,     # [num_blocks * BLOCK_SIZE slots, Hkv, D], contiguous
    slot_mapping_ptr,                   # [T] int64: flat slot = block_id * BLOCK_SIZE + offset
    stride_kt, stride_kh,               # k's token and head strides (elements)
    stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,    # next powers of two (tl.arange needs them)
):
    """One program per new token: copy its [Hkv, D] key and value rows into its cache slot.

        k[t] ──────────────► key_cache.view(-1, Hkv, D)[slot_mapping[t]]
        [Hkv, D] tile          one slot = Hkv * D contiguous elements

    The same as `store_kv_cache`'s `index_copy_`, but reading k and v through their strides, so
    the k and v slices of a fused qkv projection are stored without a `.contiguous()` copy.
    """
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t)                            # scalar int64
    h = tl.arange(0, HEADS_PAD)[:, None]                            # [HEADS_PAD, 1]
    d = tl.arange(0, DIM_PAD)[None, :]                              # [1, DIM_PAD]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)                      # [HEADS_PAD, DIM_PAD]
    cache_offs = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(key_cache_ptr + cache_offs, k, mask=mask)
    tl.store(value_cache_ptr + cache_offs, v, mask=mask)
# --8<-- [end:store_kvcache_kernel]
