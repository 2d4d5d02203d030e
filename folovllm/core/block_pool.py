# --8<-- [start:block_pool_doc]
"""`BlockPool`: the fixed set of KV cache blocks, handed out and taken back in O(1).

The KV cache memory is cut into `num_blocks` blocks of `block_size` tokens each. A block is
either in use (`ref_cnt > 0`: that many requests' block tables point at it) or free (in the free
queue). Until stage 06 every block in use has `ref_cnt == 1`; with prefix caching several
requests share the blocks of a common prefix.

The free queue is a doubly linked list, not a `deque`: stage 06 keeps freed blocks that still
hold a cached prefix in this queue (as an LRU, oldest first) and must take one out of the middle
when a new request hits it. A linked list removes from the middle in O(1)::

    head <-> [7] <-> [2] <-> [9] <-> [4] <-> tail       allocate: pop from the head (oldest)
                             ^ remove(9) in O(1)        free: append at the tail
"""
# --8<-- [end:block_pool_doc]

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from folovllm.core.block_hash import BlockHash


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # Stage 06: set while the block is in the prefix cache's map (full, its K/V computed or being
    # computed this step); it stays set when the block is freed, until the block is handed out
    # again for other tokens (lazy eviction).
    block_hash: Optional[BlockHash] = None
    # links of the free queue (None while the block is in use)
    prev_free: Optional["KVCacheBlock"] = field(default=None, repr=False)
    next_free: Optional["KVCacheBlock"] = field(default=None, repr=False)


# --8<-- [start:free_block_queue]
class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinel head and tail."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free, self.tail.prev_free = self.tail, self.head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self.tail.prev_free = self.tail, block
        self.num_free_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def popleft(self) -> KVCacheBlock:
        block = self.head.next_free
        assert block is not None and block is not self.tail, "no free block"
        self.remove(block)
        return block
    # --8<-- [end:free_block_queue]

    def block_ids(self) -> list[int]:
        ids, node = [], self.head.next_free
        while node is not None and node is not self.tail:
            ids.append(node.block_id)
            node = node.next_free
        return ids


# --8<-- [start:block_pool]
class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must have at least one block, got {num_blocks}")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # Stage 06 (empty without prefix caching): hash value -> the block that holds that
        # content, in use or free. One block per hash: a second block computed with the same
        # content (two requests that missed together) is simply not cached.
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}
        self.num_evictions = 0  # cached blocks handed out for other tokens
        self.num_collisions = 0  # lookups that found the hash with other content
        self.num_shared_refs = 0  # references beyond the first, over all blocks in use

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references, cached or not: all of them can be handed out."""
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` free blocks, least recently freed first (the caller checked there
        are enough). A block that still held cached content loses it now: lazy eviction."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        blocks = [self.free_block_queue.popleft() for _ in range(num_blocks)]
        for block in blocks:
            self._maybe_evict_cached_block(block)
            block.ref_cnt = 1
        return blocks

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; a block nobody references is free again (and,
        if cached, still findable until it is handed out)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)
            else:
                self.num_shared_refs -= 1
# --8<-- [end:block_pool]

    # -- stage 06: the prefix cache's map -------------------------------------------------------

    # --8<-- [start:prefix_cache_map]
    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVCacheBlock]:
        """The block holding exactly this content, or None. The hash finds a candidate; its
        stored tokens, parent hash and extra keys must then equal ours, or it is a collision
        (counted) and a miss: a weak hash can cost a recompute, never wrong K/V."""
        block = self.cached_block_hash_to_block.get(block_hash.hash_value)
        if block is None:
            return None
        if block.block_hash != block_hash:
            self.num_collisions += 1
            return None
        return block

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Make a full block findable by its hash, unless another block already holds it."""
        if block.block_hash is not None:
            assert block.block_hash == block_hash, f"block {block.block_id} cached twice"
            return  # a hit block: already in the map
        if block_hash.hash_value in self.cached_block_hash_to_block:
            return  # a duplicate (or a collision): keep the first
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash.hash_value] = block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A request takes hit blocks by reference: one more owner each, and a free one leaves
        the free queue (O(1), from the middle) so it cannot be evicted while in use."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            else:
                self.num_shared_refs += 1
            block.ref_cnt += 1

    def uncache_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Make blocks unfindable (their content may be wrong); they stay with their owners."""
        for block in blocks:
            if block.block_hash is not None:
                del self.cached_block_hash_to_block[block.block_hash.hash_value]
                block.block_hash = None

    def _maybe_evict_cached_block(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        del self.cached_block_hash_to_block[block.block_hash.hash_value]
        block.block_hash = None
        self.num_evictions += 1
    # --8<-- [end:prefix_cache_map]
