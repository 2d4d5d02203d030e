"""Contiguous KV caches (stages 01 and 02): one slot of `max_model_len` tokens per request.

Both stages reserve room for a request's *longest possible* length when it starts, whatever it
ends up using; stage 03 (`kv_cache_manager.py`) reserves at most one partly filled block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from folovllm.core.block_pool import KVCacheBlock
from folovllm.core.kv_cache_manager_base import KVCacheManagerBase
from folovllm.core.request import Request
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec

if TYPE_CHECKING:
    from folovllm.config import EngineConfig


# --8<-- [start:slot_kv_cache_manager]
class SlotKVCacheManager(KVCacheManagerBase):
    """Stage 02: `num_slots` fixed slots, each a contiguous row of `max_model_len` tokens.

    The cache is allocated once; a request takes a free slot when it is admitted and gives it
    back when it finishes or is aborted, and the next request reuses it at once::

        slot 0  [A A A A A A . . . . . . . . . .]   every slot reserves max_model_len tokens,
        slot 1  [B B B B B B B B B B B . . . . .]   however short its request turns out to be:
        slot 2  [C C . . . . . . . . . . . . . .]   the waste stage 03 (paged KV) removes
        slot 3  [free                           ]
    """

    def __init__(self, kv_cache_config: KVCacheConfig) -> None:
        self.kv_cache_config = kv_cache_config  # num_blocks slots of block_size tokens
        # A stack: the most recently freed slot is reused first (its memory is warm).
        self.free_slots: list[int] = list(range(kv_cache_config.num_blocks - 1, -1, -1))
        self.slot_of: dict[str, int] = {}

    @classmethod
    def get_kv_cache_config(cls, config: "EngineConfig", spec: KVCacheSpec, budget: int) -> KVCacheConfig:
        slot_bytes = config.max_model_len * spec.bytes_per_token
        num_slots = min(config.max_num_seqs, budget // slot_bytes)
        if num_slots == 0:
            raise ValueError(
                f"kv_cache_memory={budget} bytes is smaller than one max_model_len="
                f"{config.max_model_len} slot ({slot_bytes} bytes); raise it or lower max_model_len"
            )
        return KVCacheConfig(num_blocks=num_slots, block_size=config.max_model_len)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = ()) -> bool:
        """A request holds a whole slot from admission on, so only admission can fail."""
        if request.request_id in self.slot_of:
            return True
        if not self.free_slots:
            return False
        self.slot_of[request.request_id] = self.free_slots.pop()
        return True

    def free(self, request: Request, keep_cached: bool = True) -> None:
        slot = self.slot_of.pop(request.request_id, None)  # no prefix cache: keep_cached is moot
        if slot is not None:  # nothing to give back for a request that never got a slot
            self.free_slots.append(slot)

    def get_block_table(self, request: Request) -> list[int]:
        return [self.slot_of[request.request_id]]

    @property
    def num_used_blocks(self) -> int:
        return len(self.slot_of)

    @property
    def num_reserved_tokens(self) -> int:
        """Slots in use times their size (a free slot is allocated but reserved for no one)."""
        return len(self.slot_of) * self.kv_cache_config.block_size
# --8<-- [end:slot_kv_cache_manager]


class StaticKVCacheManager(SlotKVCacheManager):
    """Stage 01: a static batch takes its slots together and reserves, in each, room for the
    longest request of the batch (its `capacity`); the slots come back when the batch ends.

    ::

        batch of 3 requests, capacity = the most any member can hold (its prompt + max_tokens,
        at most max_model_len)

        row 0  [p p p p o o o . . . . . . .]   short request: most of its row never used
        row 1  [p p p p p p p p o o o o o o]   longest request decides the capacity
        row 2  [p p o . . . . . . . . . . .]

    The rows are cut from the same arena as stage 02's slots (allocated once at start-up); a
    batch only ever touches the first `capacity` tokens of each, and that is what it reserves.
    """

    def __init__(self, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(kv_cache_config)
        self.capacity = 0

    def allocate_batch(self, requests: list[Request], capacity: int) -> None:
        """Give every member of a new batch a slot (the scheduler never forms a batch larger
        than `num_free_slots`)."""
        assert not self.slot_of, "free the previous batch first"
        assert len(requests) <= self.num_free_slots and capacity <= self.kv_cache_config.block_size
        for request in requests:
            self.allocate_slots(request, capacity)
        self.capacity = capacity

    def free_batch(self) -> None:
        self.slot_of.clear()
        self.free_slots = list(range(self.kv_cache_config.num_blocks - 1, -1, -1))
        self.capacity = 0

    @property
    def num_reserved_tokens(self) -> int:
        return len(self.slot_of) * self.capacity
