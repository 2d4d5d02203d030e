"""Stage 04's Triton kernels: KV store, varlen causal prefill over a paged cache, paged decode.

The launch code (grids, tile sizes, the split heuristic) is in `triton_attn.py`; this file holds
only `@triton.jit` functions. Their plain-torch reference is `naive_attention` in
`folovllm/model_executor/layers/attention.py`, and `stages/04/test_04_triton.py` compares the two (on CPU, under
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


# --8<-- [start:attend_kv_tile]
@triton.jit
def _attend_kv_tile(
    acc, m_i, l_i,                      # running state: [M, DIM_PAD], [M], [M] float32
    q,                                  # [M, DIM_PAD] the tile's queries (M rows, any meaning)
    q_pos,                              # [M] each row's position in its sequence (CAUSAL only)
    start_n, kv_end,                    # this tile's first key; keys >= kv_end are invisible
    k_cache_ptr, v_cache_ptr, block_table_ptr,   # block_table_ptr: this sequence's row
    kv_head, scale_log2e,
    stride_cb, stride_cs, stride_ch,    # cache strides: block, slot in block, head
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BOUNDED: tl.constexpr,              # mask keys >= kv_end (a tile that runs past the end)
    CAUSAL: tl.constexpr,               # mask key j for a row at position p when j > p
    DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax: fold keys [start_n, start_n + BLOCK_N) into (acc, m, l).

        keys:  start_n ... start_n+BLOCK_N-1         token j of the sequence lives at
                 │                                    block_table[j // BLOCK_SIZE] * stride_cb
                 ▼                                  + (j % BLOCK_SIZE) * stride_cs
        K^T [DIM_PAD, BLOCK_N]   V [BLOCK_N, DIM_PAD]   (gathered through the block table)

        s     = q @ K^T * scale * log2(e)            [M, BLOCK_N]
        m_new = max(m, rowmax(s));  alpha = 2^(m - m_new);  p = 2^(s - m_new)
        l     = l * alpha + rowsum(p);  acc = acc * alpha + p @ V
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)                        # [BLOCK_N] key positions
    offs_d = tl.arange(0, DIM_PAD)                                  # [DIM_PAD]
    d_mask = offs_d < HEAD_DIM
    if BOUNDED:
        n_mask = offs_n < kv_end
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
    else:
        n_mask = offs_n >= 0                                        # all true
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
    # [BLOCK_N] element offset of each key's row (int64: caches can exceed 2^31 elements)
    kv_offs = block_ids.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    k = tl.load(k_cache_ptr + kv_offs[None, :] + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [DIM_PAD, BLOCK_N]
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2e  # [M, BLOCK_N] float32
    if CAUSAL:
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    elif BOUNDED:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    # Every caller's first tile has a visible key for every row (key 0, or a split's first
    # key), so m_new is finite from then on and 2^(-inf - m_new) = 0 handles masked keys.
    m_new = tl.maximum(m_i, tl.max(s, 1))                           # [M]
    alpha = tl.exp2(m_i - m_new)                                    # [M] rescales the old state
    p = tl.exp2(s - m_new[:, None])                                 # [M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_offs[:, None] + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, DIM_PAD]
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [M, DIM_PAD]
    return acc, m_new, l_i
# --8<-- [end:attend_kv_tile]


# --8<-- [start:find_seq]
@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, tile, BLOCK_M: tl.constexpr):
    """Which sequence owns query tile `tile` of the flat prefill grid (binary search).

    Sequence b owns the tiles [qsl[b] // BLOCK_M + b, qsl[b+1] // BLOCK_M + b + 1): at least
    cdiv(query_len, BLOCK_M) of them, computed from query_start_loc alone, so the host can size
    the grid as T // BLOCK_M + B without reading the query lengths back from the GPU::

        BLOCK_M = 4, query lens [6, 1, 9]   qsl = [0, 6, 7, 16]
        first tile of b = qsl[b] // 4 + b:  [0, 2, 4]        grid = 16 // 4 + 3 = 7 tiles
        tile:    0    1  | 2    3   | 4    5    6
        seq:     0    0  | 1    1   | 2    2    2
        rows:   0-3  4-5 |  0   --  | 0-3  4-7  8   (-- : spare tile, exits at once)

    Returns the largest b with first_tile(b) <= tile.
    """
    lo = 0
    hi = num_seqs                       # invariant: first_tile(lo) <= tile < first_tile(hi)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid
        else:
            hi = mid
    return lo
# --8<-- [end:find_seq]


# --8<-- [start:prefill_attention_kernel]
@triton.jit
def prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale_log2e, num_seqs,
    stride_qt, stride_qh,               # q [T, Hq, D]
    stride_ot, stride_oh,               # out [T, Hq, D]
    stride_cb, stride_cs, stride_ch,    # caches [num_blocks, BLOCK_SIZE, Hkv, D]
    stride_bt,                          # block_tables row stride
    BLOCK_SIZE: tl.constexpr,           # tokens per KV cache block
    GROUP: tl.constexpr,                # query heads per KV head
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,              # queries per program
    BLOCK_N: tl.constexpr,              # keys per inner step
    SKIP_DECODES: tl.constexpr,         # query_len == 1 rows are left to the decode kernel
    DOT_PRECISION: tl.constexpr,
):
    """Varlen causal attention of BLOCK_M new queries of one sequence and one query head.

    Grid: (T // BLOCK_M + B, Hq); `_find_seq` maps axis 0 to (sequence b, tile of its queries).
    The keys come from the paged cache, so queries can attend to context computed in earlier
    steps (chunked prefill, prefix caching) as well as to this step's tokens::

        sequence b:  | cached context (C keys)   | this step's queries (query_len) |
        positions:    0 ........................ C-1  C ...................... seq_len-1
        query row r of the tile: i = m_start + r, position C + i, sees keys 0 .. C + i

        keys:  0 ............ full_end ............ kv_end
               [ every row sees them ][ causal mask ]     (kv_end = last row's position + 1)

    Keys below `full_end` (a multiple of BLOCK_N) are visible to every row of the tile, so that
    loop runs without any masking; only the last few tiles near the diagonal pay for the mask.
    """
    # --8<-- [start:prefill_which_tile]
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, num_seqs, tile, BLOCK_M)
    q_begin = tl.load(query_start_loc_ptr + seq)                    # first token of seq in q
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    m_start = (tile - (q_begin // BLOCK_M + seq)) * BLOCK_M          # first query index of tile
    done = m_start >= query_len                                     # a spare tile
    if SKIP_DECODES:
        done = done | (query_len == 1)                              # the decode kernel's row
    if done:
        return
    # --8<-- [end:prefill_which_tile]
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len                               # keys cached before this step
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)                        # [BLOCK_M] query index in seq
    offs_d = tl.arange(0, DIM_PAD)
    row_mask = offs_m < query_len
    d_mask = offs_d < HEAD_DIM
    tok = (q_begin + offs_m).to(tl.int64)                           # [BLOCK_M] row in q / out
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, DIM_PAD]
    q_pos = context_len + offs_m                                    # [BLOCK_M] positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # --8<-- [start:prefill_loops]
    full_end = (context_len + m_start + 1) // BLOCK_N * BLOCK_N      # first row sees keys < C+m_start+1
    kv_end = tl.minimum(seq_len, context_len + m_start + BLOCK_M)   # last row sees keys < this

    for start_n in range(0, full_end, BLOCK_N):                     # below the diagonal: no mask
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, q_pos, start_n, kv_end, k_cache_ptr, v_cache_ptr, block_table_ptr,
            kv_head, scale_log2e, stride_cb, stride_cs, stride_ch,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, DIM_PAD, False, False, DOT_PRECISION)
    for start_n in range(full_end, kv_end, BLOCK_N):                # the diagonal: causal mask
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, q_pos, start_n, kv_end, k_cache_ptr, v_cache_ptr, block_table_ptr,
            kv_head, scale_log2e, stride_cb, stride_cs, stride_ch,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, DIM_PAD, True, True, DOT_PRECISION)
    # --8<-- [end:prefill_loops]

    # Padding rows (offs_m >= query_len) computed garbage that is never stored; every real row
    # saw key 0, so l_i > 0.
    l_safe = tl.where(row_mask, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
# --8<-- [end:prefill_attention_kernel]


# --8<-- [start:paged_decode_kernel]
@triton.jit
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,    # [B, Hq, NUM_SPLITS, (DIM_PAD)] float32
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale_log2e,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    NUM_HEADS: tl.constexpr,            # Hq
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,    # query heads per KV head; padded to >= 16
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,           # programs per (sequence, KV head) along the context
    DOT_PRECISION: tl.constexpr,
):
    """PagedAttention for one-query rows; with NUM_SPLITS > 1, flash-decoding.

    Grid: (B, Hkv, NUM_SPLITS). Rows whose query_len is not 1 exit at once (the prefill kernel
    has them), so the host never reads the query lengths back. One program takes the GROUP
    query heads that share a KV head together, so each K/V tile is read once for all of them::

        q rows   [GROUP_PAD, D]  heads kv_head*GROUP ... kv_head*GROUP + GROUP-1 (rest masked)
        context  0 ──────────────────────────────────────────── seq_len
                 | split 0      | split 1      | split 2      |     whole BLOCK_N tiles each
                 each split: online softmax over its keys -> (acc, max, sum) partials,
                 `decode_reduce_kernel` merges them; with one split, the output directly.

    A decode is memory-bound (it reads the whole context for one query), so what matters is
    keeping every SM streaming K/V: a small batch of long sequences has few (seq, KV head)
    pairs, and splitting the context gives each SM its share of the bytes.
    """
    # --8<-- [start:decode_which_keys]
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_begin = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if query_len != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
    kv_start = split * tiles_per_split * BLOCK_N
    kv_end = tl.minimum(kv_start + tiles_per_split * BLOCK_N, seq_len)   # may be <= kv_start
    # --8<-- [end:decode_which_keys]

    # --8<-- [start:decode_load_q]
    g = tl.arange(0, GROUP_PAD)                                     # [GROUP_PAD]
    heads = kv_head * GROUP + g                                     # [GROUP_PAD] query heads
    g_mask = g < GROUP
    offs_d = tl.arange(0, DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    io_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_begin.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=io_mask, other=0.0)        # [GROUP_PAD, DIM_PAD]
    # --8<-- [end:decode_load_q]

    # --8<-- [start:decode_loop]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_start, kv_end, BLOCK_N):                # the query sees every key
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, g, start_n, kv_end, k_cache_ptr, v_cache_ptr, block_table_ptr,
            kv_head, scale_log2e, stride_cb, stride_cs, stride_ch,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, DIM_PAD, True, False, DOT_PRECISION)
    # --8<-- [end:decode_loop]

    # --8<-- [start:decode_write]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_begin.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Partials of an empty split (kv_end <= kv_start) stay (acc 0, max -inf, sum 0): weight 0.
        part = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split   # [GROUP_PAD]
        tl.store(part_max_ptr + part, m_i, mask=g_mask)
        tl.store(part_sum_ptr + part, l_i, mask=g_mask)
        tl.store(part_acc_ptr + part[:, None] * DIM_PAD + offs_d[None, :], acc,
                 mask=g_mask[:, None])
    # --8<-- [end:decode_write]
# --8<-- [end:paged_decode_kernel]


# --8<-- [start:decode_reduce_kernel]
@triton.jit
def decode_reduce_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr,    # [B, Hq, NUM_SPLITS, (DIM_PAD)] float32
    out_ptr, query_start_loc_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Merge the NUM_SPLITS partial softmaxes of one (decode sequence, query head).

    Grid: (B, Hq). Split s holds acc_s = sum_j 2^(s_j - m_s) v_j and l_s = sum_j 2^(s_j - m_s)
    over its keys; rescaling every split to the global max m = max_s m_s gives the answer::

        out = sum_s 2^(m_s - m) acc_s  /  sum_s 2^(m_s - m) l_s
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_begin != 1:
        return
    s = tl.arange(0, SPLITS_PAD)                                    # [SPLITS_PAD]
    s_mask = s < NUM_SPLITS
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + s   # [SPLITS_PAD]
    m_s = tl.load(part_max_ptr + part, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + part, mask=s_mask, other=0.0)
    offs_d = tl.arange(0, DIM_PAD)
    acc_s = tl.load(part_acc_ptr + part[:, None] * DIM_PAD + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)               # [SPLITS_PAD, DIM_PAD]
    m = tl.max(m_s, 0)                                              # finite: split 0 has keys
    w = tl.exp2(m_s - m)                                            # [SPLITS_PAD]; empty -> 0
    out = tl.sum(acc_s * w[:, None], 0) / tl.sum(l_s * w, 0)        # [DIM_PAD]
    tl.store(out_ptr + q_begin.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
# --8<-- [end:decode_reduce_kernel]
