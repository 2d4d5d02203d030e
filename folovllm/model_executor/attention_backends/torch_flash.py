"""`torch_flash` backend: FlashAttention's tiled online softmax, in plain torch.

The readable version of the algorithm our Triton kernels run (`triton_kernels.py`): the same
loops, written as Python loops over torch tiles instead of a kernel grid. It is slow (a Python
iteration per tile) and exists to be read, stepped through and compared against `naive`.

The online softmax. For one query row with scores s_1..s_N, attention is

    out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)        with m = max_j s_j

`naive` materialises every s_j first. FlashAttention visits the keys a tile at a time and keeps
three running values: the max so far `m`, the sum `l = sum exp(s_j - m)` and the unnormalised
output `acc = sum exp(s_j - m) v_j`. When a new tile raises the max from m_old to m_new, every
term already summed was exponentiated against m_old, so both sums are rescaled by one factor:

    alpha = exp(m_old - m_new)
    l     = alpha * l   + sum_{j in tile} exp(s_j - m_new)
    acc   = alpha * acc + sum_{j in tile} exp(s_j - m_new) v_j

and after the last tile `out = acc / l`. The result is exact (not an approximation); only a
[BLOCK_M x BLOCK_N] tile of scores exists at any time.

Tiling of one sequence with 4 cached tokens and 8 new ones (BLOCK_M = BLOCK_N = 4)::

                 keys (read through the block table, BLOCK_N at a time)
                 0..3       4..7       8..11
               +----------+----------+----------+
    q 4..7     | full     | diagonal | skipped  |   q position p sees keys 0..p
    (tile 0)   |          | (masked) | (above)  |
               +----------+----------+----------+
    q 8..11    | full     | full     | diagonal |
    (tile 1)   |          |          | (masked) |
               +----------+----------+----------+

"full" tiles lie wholly below the diagonal and need no mask; "diagonal" tiles are masked
element-wise; tiles wholly above the diagonal are never read. A decode is the same picture with a
single query row.

A KV tile is gathered token by token through the block table (token j lives in block
`block_table[j // block_size]` at offset `j % block_size`), so the tile size does not depend on
the cache's block size: with blocks of 16 a 64-key tile spans four blocks; with the contiguous
cache of stages 01-02 (one block per sequence) it is a slice of that block. The whole context is
never gathered.

Left out: everything that makes it fast (one kernel per tile pair, exp2, keeping tiles in
registers); see `triton_attn.py` and `sdpa.py` for the fast paths.
"""

from __future__ import annotations

import torch

from folovllm.model_executor.layers.attention import AttentionBackend, AttentionMetadata


class TorchFlashAttentionBackend(AttentionBackend):
    """FlashAttention (tiled, online softmax) in plain torch; one sequence at a time."""

    name = "torch_flash"

    def __init__(self, block_m: int = 64, block_n: int = 64) -> None:
        self.block_m = block_m  # query rows per tile
        self.block_n = block_n  # keys per tile

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, Hq, D]
        qsl = md.query_start_loc_cpu  # host lists: the loop below needs python ints
        for b, seq_len in enumerate(md.seq_lens_cpu):
            start, end = qsl[b], qsl[b + 1]
            if start == end:
                continue
            out[start:end] = flash_attention_one_sequence(
                q[start:end], key_cache, value_cache, md.block_tables[b],
                context_start=seq_len - (end - start), scale=scale,
                block_m=self.block_m, block_n=self.block_n,
            )
        return out


def read_kv_tile(
    cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """Keys (or values) `start..end-1` of one sequence, read through its block table: [N, Hkv, D].

        position j  ->  slot block_table[j // block_size] * block_size + j % block_size
    """
    block_size, num_kv_heads, head_dim = cache.shape[1:]
    pos = torch.arange(start, end, device=cache.device)  # [N]
    slots = block_table[pos // block_size] * block_size + pos % block_size  # [N]
    return cache.view(-1, num_kv_heads, head_dim)[slots]  # [N, Hkv, D]


# --8<-- [start:flash_attention_one_sequence]
def flash_attention_one_sequence(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_start: int,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of one sequence's new queries q [Lq, Hq, D] over its cached K/V.

    Query i sits at position `context_start + i` and sees keys 0..context_start + i.
    Returns [Lq, Hq, D] in q's dtype; everything inside is float32.
    """
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads  # query heads per KV head (GQA)
    out = torch.empty_like(q)

    for m_start in range(0, num_queries, block_m):
        m_end = min(m_start + block_m, num_queries)
        rows = group * (m_end - m_start)
        first_pos, last_pos = context_start + m_start, context_start + m_end - 1
        # [M, Hq, D] -> [Hkv, group * M, D]: the `group` query heads that share a KV head are
        # stacked as extra rows, so one matmul per KV head serves them all and K/V are not copied.
        q_tile = q[m_start:m_end].float().reshape(-1, num_kv_heads, group, head_dim)
        q_tile = q_tile.permute(1, 2, 0, 3).reshape(num_kv_heads, rows, head_dim)
        q_tile = q_tile * scale  # fold the softmax scale into q once per tile
        q_pos = torch.arange(first_pos, last_pos + 1, device=q.device).repeat(group)  # [group * M]

        m = q_tile.new_full((num_kv_heads, rows, 1), float("-inf"))  # running max
        l = q_tile.new_zeros((num_kv_heads, rows, 1))  # running sum of exp(s - m)
        acc = q_tile.new_zeros((num_kv_heads, rows, head_dim))  # running sum of exp(s - m) v

        # Keys past `last_pos` are above the diagonal for every row of this tile: never read.
        for n_start in range(0, last_pos + 1, block_n):
            n_end = min(n_start + block_n, last_pos + 1)
            k = read_kv_tile(key_cache, block_table, n_start, n_end).float()  # [N, Hkv, D]
            v = read_kv_tile(value_cache, block_table, n_start, n_end).float()  # [N, Hkv, D]

            s = q_tile @ k.permute(1, 2, 0)  # [Hkv, group * M, N] scores, already scaled
            if n_end - 1 > first_pos:  # the tile crosses the diagonal: hide keys after each query
                k_pos = torch.arange(n_start, n_end, device=q.device)  # [N]
                s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))

            # Online softmax. The first tile holds key 0, which every query sees, so m is finite
            # from then on and a fully masked row of a later tile gives p = exp(-inf) = 0.
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # [Hkv, group * M, 1]
            alpha = torch.exp(m - m_new)  # rescales what was summed against the old max
            p = torch.exp(s - m_new)  # [Hkv, group * M, N]
            l = alpha * l + p.sum(dim=-1, keepdim=True)
            acc = alpha * acc + p @ v.transpose(0, 1)  # [Hkv, group * M, D]
            m = m_new

        # [Hkv, group * M, D] -> [Hkv, group, M, D] -> [M, Hq, D]
        out_tile = (acc / l).view(num_kv_heads, group, -1, head_dim).permute(2, 0, 1, 3)
        out[m_start:m_end] = out_tile.reshape(-1, num_heads, head_dim).to(q.dtype)
    return out
# --8<-- [end:flash_attention_one_sequence]
