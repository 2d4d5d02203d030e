# --8<-- [start:block_table]
"""`KVCacheManager` (stage 03): paged KV cache, a block table per request.

Instead of reserving `max_model_len` tokens per request up front (stage 02), a request gets
blocks of `block_size` tokens as its tokens arrive: a new block only when the last one is full.
The blocks of one request need not be adjacent; its *block table* lists them in order::

    block_size = 4, request with 10 tokens          physical KV cache (num_blocks = 8)
    logical block 0: tokens 0-3   -> block 5         0 [. . . .]   4 [. . . .]
    logical block 1: tokens 4-7   -> block 1         1 [t4 t5 t6 t7] 5 [t0 t1 t2 t3]
    logical block 2: tokens 8-9   -> block 6         2 [. . . .]   6 [t8 t9 . .] <- 2 slots free
                                                     3 [. . . .]   7 [. . . .]
    block_table = [5, 1, 6]

    slot of token i = block_table[i // block_size] * block_size + i % block_size
    token 9 -> block_table[2] * 4 + 1 = 25

Only the last block of a request can be partly empty, so at most `block_size - 1` slots per
request are wasted (internal fragmentation), instead of `max_model_len - len` in stage 02.
"""
# --8<-- [end:block_table]

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

from folovllm.core.block_hash import sha256_hash
from folovllm.core.block_pool import BlockPool, KVCacheBlock
from folovllm.core.kv_cache_manager_base import KVCacheManagerBase
from folovllm.core.prefix_cache import NullPrefixCache, PrefixCache, PrefixCacheStats
from folovllm.core.request import Request
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec

if TYPE_CHECKING:
    from folovllm.config import EngineConfig


def cdiv(a: int, b: int) -> int:
    """Ceiling division: blocks needed for `a` tokens in blocks of `b`."""
    return -(-a // b)


class KVCacheManager(KVCacheManagerBase):
    """Stage 03's paged cache; with `enable_caching` (stage 06) its full blocks are also a
    prefix cache (`PrefixCache`), otherwise a `NullPrefixCache` that never hits.

    `hash_fn` (bytes -> bytes) hashes blocks: SHA-256 unless a test wants a weaker one."""

    def __init__(self, kv_cache_config: KVCacheConfig, watermark: float = 0.01,
                 enable_caching: bool = False,
                 hash_fn: Optional[Callable[[bytes], bytes]] = None) -> None:
        self.kv_cache_config = kv_cache_config
        self.block_size = kv_cache_config.block_size
        num_blocks = kv_cache_config.num_blocks
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # request id -> (its block list, the same as ids): `get_block_table` runs for every row
        # of every step, and copying a list of ints is ~10x cheaper than reading each block's
        # id; valid while `req_to_blocks` holds that very list (allocate_slots makes a new one
        # when the table grows)
        self.block_ids_cache: dict[str, tuple[list[KVCacheBlock], list[int]]] = {}
        # --8<-- [start:choose_prefix_cache]
        self.prefix_cache = NullPrefixCache()
        if enable_caching:
            self.prefix_cache = PrefixCache(self.block_pool, self.block_size, hash_fn or sha256_hash)
        # --8<-- [end:choose_prefix_cache]
        # --8<-- [start:watermark]
        # Admission keeps a few blocks free so the running requests can still grow a step or
        # two before anyone is preempted (admitting into a full cache preempts at once).
        self.watermark_blocks = int(watermark * num_blocks)
        # --8<-- [end:watermark]

    # --8<-- [start:get_kv_cache_config]
    @classmethod
    def get_kv_cache_config(cls, config: "EngineConfig", spec: KVCacheSpec, budget: int) -> KVCacheConfig:
        """Blocks of `block_size` tokens cut from the budget; it must hold one full-length
        sequence (a longer request could never run, even alone)."""
        num_blocks = budget // (config.block_size * spec.bytes_per_token)
        if num_blocks * config.block_size < config.max_model_len:
            needed = cdiv(config.max_model_len, config.block_size) * config.block_size * spec.bytes_per_token
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds {num_blocks} blocks of {config.block_size} "
                f"tokens ({num_blocks * config.block_size} tokens at {spec.bytes_per_token} bytes "
                f"each), fewer than one max_model_len={config.max_model_len} sequence; need at "
                f"least {needed} bytes"
            )
        return KVCacheConfig(num_blocks=num_blocks, block_size=config.block_size)
    # --8<-- [end:get_kv_cache_config]

    @classmethod
    def from_config(cls, config: "EngineConfig", kv_cache_config: KVCacheConfig) -> "KVCacheManager":
        return cls(kv_cache_config, enable_caching=config.enable_prefix_caching)

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    # --8<-- [start:get_computed_blocks]
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """At admission: the cached blocks of the longest cached prefix of `request` and the
        tokens they hold (whole blocks; ([], 0) without prefix caching). Nothing is taken yet:
        `allocate_slots` takes them if the request is admitted. A request that asks for prompt
        log-probabilities reads no cached block (vLLM's `skip_reading_prefix_cache`): a cached
        position is never computed, so it would have no logits to score."""
        if request.sampling_params.skip_reading_prefix_cache:
            return [], 0
        blocks = self.prefix_cache.find_longest_cache_hit(request)
        return blocks, len(blocks) * self.block_size
    # --8<-- [end:get_computed_blocks]

    # --8<-- [start:allocate_slots]
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens of `request`, after the
        `new_computed_blocks` a prefix hit found (taken by reference); False (and nothing
        allocated or taken) if there are not enough free blocks.

            blocks of request:  [hit][hit][ new ][ new ]
                                 |<-computed->|<- num_new_tokens ->|
        """
        admitting = request.request_id not in self.req_to_blocks
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(new_computed_blocks)
        # A hit block nobody holds sits in the free queue: taking it uses up a free block too.
        num_hits_free = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        # A new request must leave the watermark free, unless the cache is empty: then nobody
        # runs who could need those blocks, and a prompt as long as the whole cache must fit.
        cache_empty = self.num_free_blocks == self.block_pool.num_blocks
        reserve = 0 if blocks or cache_empty else self.watermark_blocks
        if max(num_needed, 0) + num_hits_free > self.num_free_blocks - reserve:
            return False
        self.block_pool.touch(new_computed_blocks)  # first: handing out blocks may evict
        new_blocks = list(new_computed_blocks)
        if num_needed > 0:
            new_blocks += self.block_pool.get_new_blocks(num_needed)
        if new_blocks or admitting:  # (a decode adds a block once every block_size steps)
            blocks = blocks + new_blocks
            self.req_to_blocks[request.request_id] = blocks
        # Only committed tokens are hashed: a block filled by draft tokens (stage 09) is cached
        # once its drafts are accepted, by a later step's call.
        self.prefix_cache.cache_full_blocks(request, blocks, min(num_computed + num_new_tokens, request.num_tokens))
        if admitting:
            self.prefix_cache.record_admission(request, len(new_computed_blocks))
        return True
    # --8<-- [end:allocate_slots]

    # --8<-- [start:free]
    def free(self, request: Request, keep_cached: bool = True) -> None:
        """Give back every block of the request, last block first: the free queue is the
        eviction order (least recently freed first), so the tail of a sequence is evicted
        before its head, which other requests are likelier to share."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_ids_cache.pop(request.request_id, None)
        if not keep_cached:
            # Blocks cached for it when they were scheduled may never have been written (its
            # step raised). A miss is cheap, wrong K/V is not.
            self.block_pool.uncache_blocks(blocks)
        self.block_pool.free_blocks(reversed(blocks))
        self.prefix_cache.free(request)
    # --8<-- [end:free]

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        return self.prefix_cache.make_stats()

    def get_block_table(self, request: Request) -> list[int]:
        blocks = self.req_to_blocks[request.request_id]
        cached = self.block_ids_cache.get(request.request_id)
        if cached is None or cached[0] is not blocks or len(cached[1]) != len(blocks):
            cached = (blocks, [block.block_id for block in blocks])
            self.block_ids_cache[request.request_id] = cached
        return list(cached[1])  # a copy: the step's output keeps it as it is now

    @property
    def num_shared_tokens(self) -> int:
        return self.block_pool.num_shared_refs * self.block_size

    @property
    def num_used_blocks(self) -> int:
        return self.block_pool.num_blocks - self.num_free_blocks

    @property
    def num_reserved_tokens(self) -> int:
        """Slots in blocks that are in use (the last block of each request is partly empty)."""
        return (self.block_pool.num_blocks - self.num_free_blocks) * self.block_size
