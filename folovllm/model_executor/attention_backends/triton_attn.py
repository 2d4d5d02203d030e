"""The `triton` attention backend: our own kernels (in `triton_kernels.py`), launched from here.

    store_kv_cache   store_kvcache_kernel          one program per new token
    forward          prefill_attention_kernel      rows with query_len > 1 (prefills, chunks of
                                                   prefills over cached context)
                     paged_decode_kernel           rows with query_len == 1 (decodes)
                     (+ decode_reduce_kernel)      when a long context is split (flash-decoding)

Both attention kernels look at every sequence of the batch and skip the rows that belong to the
other one, so `forward` never reads the query lengths back from the GPU: no `.item()`, no
`.tolist()`. The grids are sized from shapes and the two python ints of `AttentionMetadata`;
the one branch, "is any row longer than one token?", is `md.max_query_len > 1`.

Tile sizes are fixed per (dtype, head_dim), not autotuned: autotuning would run several configs
at the first call of every new shape, which under `TRITON_INTERPRET=1` (the CPU tests) costs
minutes, and the fixed ones are the usual FlashAttention-2 choices for an H100.
`benchmarks/gpu_attention.py` times them against torch SDPA on a GPU.

Left out: CUDA graphs capture (stage 04 runs eagerly), fp8 KV caches, non-causal attention.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from folovllm.model_executor.attention_backends.triton_kernels import (
    decode_reduce_kernel,
    paged_decode_kernel,
    prefill_attention_kernel,
    store_kvcache_kernel,
)
from folovllm.model_executor.layers.attention import AttentionBackend, AttentionMetadata

# Read once, as triton.jit does when it wraps the kernels: under the interpreter the kernels run
# on CPU tensors, and small tiles keep them fast.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Flash-decoding heuristic (see `decode_num_splits`). Starting points, to be tuned with
# `benchmarks/gpu_attention.py`, which times every split count.
DECODE_PROGRAMS_PER_SM = 4     # (seq, KV head, split) programs per SM that keep it streaming
MIN_KEYS_PER_SPLIT = 256       # below this a split's partials cost more than they save
MAX_DECODE_SPLITS = 16
INTERPRETER_NUM_SMS = 132      # the heuristic's answer under the interpreter: an H100's


# --8<-- [start:tile_configs]
@dataclass(frozen=True)
class TileConfig:
    block_m: int        # queries per program (prefill only)
    block_n: int        # keys per inner step
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Fixed prefill tiles. The KV tile is a multiple of the usual block sizes (16, 32), so one
    step reads whole blocks; with a bigger block (a contiguous cache) it reads part of one."""
    if INTERPRET:
        return TileConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:  # 4-byte tiles: half the shared memory per tile
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def decode_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    if INTERPRET:
        return TileConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
    return TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=2)
# --8<-- [end:tile_configs]


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# --8<-- [start:decode_num_splits]
def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many programs share one (sequence, KV head)'s context (flash-decoding).

    Without a split the grid has num_seqs * num_kv_heads programs; a few long sequences leave
    most SMs idle while each program streams its whole context. Split until the grid reaches
    DECODE_PROGRAMS_PER_SM per SM, while every split keeps MIN_KEYS_PER_SPLIT keys, at most
    MAX_DECODE_SPLITS; a power of two so that few kernel variants get compiled::

        1 seq x 8 KV heads x 4k context, 132 SMs:  wants 66, 16 useful -> 16 splits
        64 seqs x 8 KV heads x 1k:                 wants 2, 4 useful   -> 2 splits
        256 seqs x 8 KV heads:                     grid already full   -> 1
    """
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(DECODE_PROGRAMS_PER_SM * num_sms / programs)
    useful = max_seq_len // MIN_KEYS_PER_SPLIT
    n = max(1, min(wanted, useful, MAX_DECODE_SPLITS))
    return 1 << (n.bit_length() - 1)
# --8<-- [end:decode_num_splits]


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: exact IEEE products (the default would be TF32 on tensor cores, ~1e-3 off)
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRET:
        raise ValueError(
            "the triton attention backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing it, to run the kernels on CPU); got a tensor on {t.device}"
        )


def _cache_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int]:
    assert key_cache.stride() == value_cache.stride(), "key and value caches must share a layout"
    assert key_cache.stride(-1) == 1, "the cache's head_dim must be contiguous"
    return key_cache.stride(0), key_cache.stride(1), key_cache.stride(2)


# --8<-- [start:store_kv_cache_triton]
def store_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`store_kv_cache` as one kernel launch: k, v [T, Hkv, D] -> their slots of the caches."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_device(k)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k and v need a contiguous head_dim"
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key_cache.shape[-2:] == (num_kv_heads, head_dim)
    store_kvcache_kernel[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
    )
# --8<-- [end:store_kv_cache_triton]


# --8<-- [start:prefill_attention]
def prefill_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, md: AttentionMetadata,
    scale: float, out: torch.Tensor, skip_decodes: bool = False,
    config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """Causal attention of every row of the batch (or only rows with query_len > 1 when
    `skip_decodes`) into `out` [T, Hq, D]; K/V, new tokens included, are read from the cache."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    cfg = config or prefill_config(head_dim, q.dtype)
    # Enough query tiles for any split of T tokens into B sequences (see `_find_seq`).
    grid = (num_tokens // cfg.block_m + md.num_seqs, num_heads)
    prefill_attention_kernel[grid](
        q, key_cache, value_cache, out,
        md.query_start_loc, md.seq_lens, md.block_tables,
        scale * math.log2(math.e), md.num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(key_cache, value_cache), md.block_tables.stride(0),
        BLOCK_SIZE=block_size, GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SKIP_DECODES=skip_decodes, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
# --8<-- [end:prefill_attention]


# --8<-- [start:paged_decode_attention]
def paged_decode_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, md: AttentionMetadata,
    scale: float, out: torch.Tensor, num_splits: Optional[int] = None,
    config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """Attention of the rows with query_len == 1 into `out` [T, Hq, D] (other rows untouched).

    `num_splits` None: `decode_num_splits` picks it from the batch's shape."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    cfg = config or decode_config(head_dim, q.dtype)
    if num_splits is None:
        num_splits = decode_num_splits(md.num_seqs, num_kv_heads, md.max_seq_len, _num_sms(q.device))
    dim_pad = triton.next_power_of_2(head_dim)
    if num_splits > 1:  # per (seq, query head, split): unnormalised acc, running max and sum
        part_acc = torch.empty(md.num_seqs, num_heads, num_splits, dim_pad, device=q.device,
                               dtype=torch.float32)
        part_max = torch.empty(md.num_seqs, num_heads, num_splits, device=q.device,
                               dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused
    paged_decode_kernel[(md.num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, out, part_acc, part_max, part_sum,
        md.query_start_loc, md.seq_lens, md.block_tables,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(key_cache, value_cache), md.block_tables.stride(0),
        NUM_HEADS=num_heads, BLOCK_SIZE=block_size,
        # tl.dot needs at least 16 rows: the GROUP real heads, then masked padding
        GROUP=group, GROUP_PAD=max(cfg.block_m, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        decode_reduce_kernel[(md.num_seqs, num_heads)](
            part_acc, part_max, part_sum, out, md.query_start_loc,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        )
    return out
# --8<-- [end:paged_decode_attention]


# --8<-- [start:triton_backend]
class TritonAttentionBackend(AttentionBackend):
    """Stage 04 on CUDA: fused prefill over the paged cache plus PagedAttention decode.

    `decode_num_splits` fixes the flash-decoding split count (None: the heuristic decides).
    """

    name = "triton"

    def __init__(self, decode_num_splits: Optional[int] = None) -> None:
        self.decode_num_splits = decode_num_splits

    def store_kv_cache(
        self, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> None:
        store_kv_cache_triton(k, v, key_cache, value_cache, slot_mapping)

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        _check_device(q)
        out = torch.empty_like(q)  # [T, Hq, D]; every row is written by exactly one kernel
        if md.max_query_len > 1:  # some prefill rows; decode rows are skipped there
            prefill_attention(q, key_cache, value_cache, md, scale, out, skip_decodes=True)
        # Decode rows, if any: a batch without any costs one launch of programs that exit.
        paged_decode_attention(q, key_cache, value_cache, md, scale, out,
                               num_splits=self.decode_num_splits)
        return out
# --8<-- [end:triton_backend]
