"""Sizing the KV cache at start-up: which manager a config gets (its `get_kv_cache_config` cuts
the budget into blocks), and `max_model_len` fitted to the budget when the user left it unset
(vLLM's `estimate_max_model_len`, in `vllm/v1/core/kv_cache_utils.py`)."""

from __future__ import annotations

import logging

from folovllm.config import EngineConfig
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.kv_cache_manager_base import KVCacheManagerBase
from folovllm.core.slot_kv_cache_manager import SlotKVCacheManager, StaticKVCacheManager
from folovllm.kv_cache_interface import KVCacheSpec

logger = logging.getLogger("folovllm")


def get_kv_cache_manager_cls(config: EngineConfig) -> type[KVCacheManagerBase]:
    """Stage 01: slots taken per static batch; 02: slots per request; 03 on: paged blocks
    (stage 06: the same manager, given a prefix cache by `from_config`)."""
    if config.enable_paged_kv:
        return KVCacheManager
    return SlotKVCacheManager if config.enable_continuous_batching else StaticKVCacheManager


# --8<-- [start:fit_max_model_len]
def fit_max_model_len(config: EngineConfig, spec: KVCacheSpec, budget: int) -> EngineConfig:
    """When the user left `max_model_len` unset, shrink the model's (Qwen3-0.6B: 40,960 tokens)
    to what the KV budget holds: one sequence with paged KV, `max_num_seqs` slots without (or,
    when the budget holds fewer than `max_num_seqs` blocks, one slot per block it holds). Every
    stage refuses only a budget smaller than one block."""
    block_bytes = config.block_size * spec.bytes_per_token
    sequences = 1 if config.enable_paged_kv else max(1, min(config.max_num_seqs, budget // block_bytes))
    fits = budget // (sequences * spec.bytes_per_token) // config.block_size * config.block_size
    if 0 < fits < config.max_model_len:
        logger.warning(
            "max_model_len lowered from %d to %d tokens: that is what %d sequence(s) get from a "
            "KV cache of %.1f MiB (set max_model_len or kv_cache_memory to choose)",
            config.max_model_len, fits, sequences, budget / 2**20,
        )
        return config.replace(max_model_len=fits)
    return config
# --8<-- [end:fit_max_model_len]
