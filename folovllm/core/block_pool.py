# --8<-- [start:block_pool_doc]
"""`BlockPool`: the fixed set of KV cache blocks, handed out and taken back in O(1).

The KV cache memory is cut into `num_blocks` blocks of `block_size` tokens each. A block is
either in use (`ref_cnt > 0`: some request's block table points at it) or free (in the free
queue). Reference counts exist for stage 06, where several requests share a block of a common
prefix; until then every block in use has `ref_cnt == 1`.

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


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
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

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` free blocks (the caller checked there are enough)."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        blocks = [self.free_block_queue.popleft() for _ in range(num_blocks)]
        for block in blocks:
            block.ref_cnt = 1
        return blocks

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; a block nobody references is free again."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)
# --8<-- [end:block_pool]
