"""The KV cache tensors: allocated once at start-up, bound once to the attention layers.

Storage is `[num_blocks, block_size, num_kv_heads, head_dim]` per layer for keys and for values
(see `model_executor/layers/attention.py`). Which request's tokens live in which block is the
KV cache manager's business (`core/`); the tensors only know the `KVCacheConfig`.
"""

from __future__ import annotations

import os

import torch

from folovllm.config import EngineConfig
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec

CPU_DEFAULT_KV_CACHE_MEMORY = 4 * 2**30  # like vLLM's CPU default KV space


def check_fits_in_memory(num_bytes: int, device: str) -> None:
    """Refuse, with the numbers, a cache larger than the device's memory (instead of an OOM
    kill, or minutes of swapping, half-way through allocating it)."""
    if torch.device(device).type == "cuda":
        available = torch.cuda.mem_get_info(torch.device(device))[0]
        where = "free GPU memory"
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "physical RAM"
    if num_bytes > available:
        raise ValueError(
            f"the KV cache needs {num_bytes / 2**30:.2f} GiB but the {where} is "
            f"{available / 2**30:.2f} GiB; lower kv_cache_memory, max_model_len or max_num_seqs"
        )


def cpu_default_kv_cache_memory(config: EngineConfig, spec: KVCacheSpec) -> int:
    """On CPU without `kv_cache_memory`: room for `max_num_seqs` sequences of `max_model_len`
    tokens, at most 4 GiB."""
    full = config.max_num_seqs * config.max_model_len * spec.bytes_per_token
    return min(full, CPU_DEFAULT_KV_CACHE_MEMORY)


class KVCache:
    """Per-layer key and value tensors of shape [num_blocks, block_size, Hkv, D]."""

    def __init__(self, spec: KVCacheSpec, kv_cache_config: KVCacheConfig) -> None:
        self.spec = spec
        self.num_blocks = kv_cache_config.num_blocks
        self.block_size = kv_cache_config.block_size
        check_fits_in_memory(kv_cache_config.num_tokens * spec.bytes_per_token, spec.device)
        shape = (self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.key_caches = [
            torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)
        ]
        self.value_caches = [
            torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)
        ]
