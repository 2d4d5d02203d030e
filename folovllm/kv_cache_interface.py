"""The KV cache's shape (`KVCacheSpec`) and how its memory is cut (`KVCacheConfig`). At the top
level, as `vllm/v1/kv_cache_interface.py` is, because both sides read them: `core/` cuts the
budget into blocks (`KVCacheManagerBase.get_kv_cache_config`), the worker allocates the tensors
(`worker/kv_cache.py`), and neither imports the other for them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one token's K/V across the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str

    @property
    def bytes_per_token(self) -> int:
        """K and V, every layer: 2 * layers * kv_heads * head_dim * bytes per element."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


@dataclass(frozen=True)
class KVCacheConfig:
    """How the KV memory is cut: `num_blocks` blocks of `block_size` tokens (a stage 01/02
    "block" is a whole slot of `max_model_len` tokens)."""

    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size
