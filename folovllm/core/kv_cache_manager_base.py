"""The one interface every stage's KV cache manager implements (`KVCacheManagerBase`): the
KV cache as the scheduler sees it.

    stage 01  StaticKVCacheManager  slots of max_model_len; a static batch takes and frees its
                                    slots together and reserves the longest member's length
    stage 02  SlotKVCacheManager    the same slots, taken and given back request by request
    stage 03  KVCacheManager        blocks of block_size tokens, handed out as tokens arrive
    stage 06  KVCacheManager        + a prefix cache: full blocks found again by hash
                                    (`get_computed_blocks`), shared by reference count

The scheduler and the engine only talk to `KVCacheManagerBase`; a manager hands out block ids,
and the tensors themselves live on the worker side (`worker/kv_cache.py`), allocated once from
the `KVCacheConfig` (`folovllm/kv_cache_interface.py`, which both sides import).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

from folovllm.core.block_pool import KVCacheBlock
from folovllm.core.prefix_cache import PrefixCacheStats
from folovllm.core.request import Request
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec

if TYPE_CHECKING:
    from folovllm.config import EngineConfig


class KVCacheManagerBase(ABC):
    """What the scheduler asks of a KV cache manager, whatever the stage."""

    kv_cache_config: KVCacheConfig

    @classmethod
    @abstractmethod
    def get_kv_cache_config(cls, config: "EngineConfig", spec: KVCacheSpec, budget: int) -> KVCacheConfig:
        """Cut `budget` bytes into blocks; refuse (ValueError, with the numbers) a budget that
        cannot hold one `max_model_len` sequence."""

    @classmethod
    def from_config(cls, config: "EngineConfig", kv_cache_config: KVCacheConfig) -> "KVCacheManagerBase":
        """The manager for `config`, over the blocks `get_kv_cache_config` cut."""
        return cls(kv_cache_config)  # type: ignore[call-arg]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Blocks already holding a prefix of `request` and how many tokens they cover
        (stage 06 fills this in; without prefix caching nothing is ever cached)."""
        return [], 0

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """What the prefix cache did since the last call (all zeros without one)."""
        return PrefixCacheStats()

    @abstractmethod
    def allocate_slots(
        self, request: Request, num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> bool:
        """Make room for `num_new_tokens` more tokens of `request` (after the
        `new_computed_blocks` a prefix hit found); False, and nothing allocated, if it does
        not fit."""

    @abstractmethod
    def free(self, request: Request, keep_cached: bool = True) -> None:
        """Give back everything `request` holds. `keep_cached=False`: what its blocks hold is
        not to be trusted (its step raised), so none of them stays findable by a prefix-cache
        lookup (stage 06)."""

    @abstractmethod
    def get_block_table(self, request: Request) -> list[int]:
        """The block ids of `request`, in token order."""

    @property
    def num_shared_tokens(self) -> int:
        """Slots that more than one request counts as its own (stage 06 shares full blocks):
        each extra sharer of a block adds `block_size`. 0 without sharing."""
        return 0

    @property
    @abstractmethod
    def num_used_blocks(self) -> int:
        """Blocks (stage 01/02: slots) that requests hold now, a shared block once."""

    @property
    @abstractmethod
    def num_reserved_tokens(self) -> int:
        """Cache slots set aside for requests now (whether or not they hold a token yet)."""
