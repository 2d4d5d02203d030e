"""Lab 04: FlashAttention's tiled online softmax, in plain torch.

Fill in `flash_attention_one_sequence` below; `FOLOVLLM_LAB=starter pytest stages/04` grades it
(it replaces the function of the same name in
`folovllm/model_executor/attention_backends/torch_flash.py`, which the `torch_flash` backend
calls once per sequence, while stage 04's tests run). Read labs/04/README.md first, and the
module docstring of that file: it derives the rescaling you need.

    per tile of queries (block_m rows), per tile of keys (block_n keys, up to the diagonal):
        s     = q_tile @ k_tile^T                      (masked where a key is after the query)
        m_new = max(m, rowmax(s))
        alpha = exp(m - m_new)
        p     = exp(s - m_new)
        l     = alpha * l + rowsum(p)
        acc   = alpha * acc + p @ v_tile
    out = acc / l
"""

from __future__ import annotations

import torch

from folovllm.model_executor.attention_backends.torch_flash import read_kv_tile  # noqa: F401

# The engine function this replaces (module:function).
REPLACES = {
    "flash_attention_one_sequence":
        "folovllm.model_executor.attention_backends.torch_flash:flash_attention_one_sequence",
}


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
    # Shapes: q [Lq, Hq, D]; key_cache / value_cache [num_blocks, block_size, Hkv, D]; the
    # sequence's keys 0..N-1 are read `read_kv_tile(cache, block_table, start, end)` -> [N, Hkv, D].
    # With grouped-query attention Hq = group * Hkv: query head h uses KV head h // group.
    # TODO 1: loop over query tiles of `block_m` rows. Compute in float32 and fold `scale` into q.
    # TODO 2: per query tile, start m = -inf, l = 0, acc = 0 (per head and query row), and loop
    #         over key tiles of `block_n` keys, from key 0 up to the tile's last query position
    #         (keys after it are never read).
    # TODO 3: scores of the tile; hide (-inf) every key after its query's position (only the tiles
    #         that cross the diagonal need it); update m, l and acc as in the module docstring.
    # TODO 4: out = acc / l for the tile's rows, back in q's layout [rows, Hq, D] and dtype.
    raise NotImplementedError("not implemented: see labs/04/README.md")
