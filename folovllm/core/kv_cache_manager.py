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

import logging

from folovllm.core.block_pool import BlockPool, KVCacheBlock
from folovllm.config import EngineConfig
from folovllm.worker.kv_cache import KVCache, KVCacheSpec, SlotKVCacheManager
from folovllm.core.request import Request

logger = logging.getLogger("folovllm")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int,
                 watermark: float = 0.01) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.kv_cache = KVCache(spec, num_blocks=num_blocks, block_size=block_size)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # --8<-- [start:watermark]
        # Admission keeps a few blocks free so the running requests can still grow a step or
        # two before anyone is preempted (admitting into a full cache preempts at once).
        self.watermark_blocks = int(watermark * num_blocks)
        # --8<-- [end:watermark]

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    # --8<-- [start:allocate_slots]
    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `request`; False (and nothing
        allocated) if there are not enough free blocks."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size) - len(blocks)
        # A new request must leave the watermark free, unless the cache is empty: then nobody
        # runs who could need those blocks, and a prompt as long as the whole cache must fit.
        cache_empty = self.num_free_blocks == self.block_pool.num_blocks
        reserve = 0 if blocks or cache_empty else self.watermark_blocks
        if num_needed > self.num_free_blocks - reserve:
            return False
        if num_needed > 0:
            blocks = blocks + self.block_pool.get_new_blocks(num_needed)
        self.req_to_blocks[request.request_id] = blocks
        return True
    # --8<-- [end:allocate_slots]

    # --8<-- [start:free]
    def free(self, request: Request) -> None:
        """Give back every block of the request (last block first: stage 06's LRU evicts the
        tail of a sequence before its shared head)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
    # --8<-- [end:free]

    def get_block_table(self, request: Request) -> list[int]:
        return [block.block_id for block in self.req_to_blocks[request.request_id]]

    @property
    def num_reserved_tokens(self) -> int:
        """Slots in blocks that are in use (the last block of each request is partly empty)."""
        return (self.block_pool.num_blocks - self.num_free_blocks) * self.block_size


# --8<-- [start:fit_max_model_len]
def fit_max_model_len(config: EngineConfig, spec: KVCacheSpec, budget: int) -> EngineConfig:
    """When the user left `max_model_len` unset, shrink the model's (Qwen3-0.6B: 40,960 tokens)
    to what the KV budget holds: one sequence with paged KV, `max_num_seqs` slots without."""
    sequences = 1 if config.enable_paged_kv else config.max_num_seqs
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


# --8<-- [start:build_kv_cache_manager]
def build_kv_cache_manager(
    config: EngineConfig, spec: KVCacheSpec, budget: int
) -> "KVCacheManager | SlotKVCacheManager":
    """Stage 03: blocks cut from the budget; stage 02: `max_model_len` slots cut from it.
    A budget that cannot hold one full-length sequence is refused with the numbers."""
    if config.enable_paged_kv:
        num_blocks = budget // (config.block_size * spec.bytes_per_token)
        if num_blocks * config.block_size < config.max_model_len:
            needed = cdiv(config.max_model_len, config.block_size) * config.block_size * spec.bytes_per_token
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds {num_blocks} blocks of {config.block_size} "
                f"tokens ({num_blocks * config.block_size} tokens at {spec.bytes_per_token} bytes "
                f"each), fewer than one max_model_len={config.max_model_len} sequence; need at "
                f"least {needed} bytes"
            )
        return KVCacheManager(spec, num_blocks, config.block_size)
    slot_bytes = config.max_model_len * spec.bytes_per_token
    num_slots = min(config.max_num_seqs, budget // slot_bytes)
    if num_slots == 0:
        raise ValueError(
            f"kv_cache_memory={budget} bytes is smaller than one max_model_len="
            f"{config.max_model_len} slot ({slot_bytes} bytes); raise it or lower max_model_len"
        )
    return SlotKVCacheManager(spec, num_slots, slot_size=config.max_model_len)
# --8<-- [end:build_kv_cache_manager]
