"""Lab 03: the paged KV cache: the free block queue and `allocate_slots`.

Fill in the four functions below; `FOLOVLLM_LAB=starter pytest stages/03` grades them (they
replace `FreeBlockQueue.append`, `.remove`, `.popleft` of `folovllm/core/block_pool.py` and
`KVCacheManager.allocate_slots` of `folovllm/core/kv_cache_manager.py` while stage 03's tests
run). Read labs/03/README.md first.

The queue is a doubly linked list threaded through the blocks themselves (`block.prev_free`,
`block.next_free`), between two sentinel blocks `self.head` and `self.tail`, so it never has to
check for an empty neighbour; `self.num_free_blocks` counts what lies between them::

    head <-> [7] <-> [2] <-> [9] <-> tail
"""

from __future__ import annotations

from typing import Sequence

from folovllm.core.block_pool import KVCacheBlock
from folovllm.core.kv_cache_manager import cdiv  # noqa: F401  (blocks for n tokens: cdiv(n, block_size))
from folovllm.core.request import Request

# The engine functions these replace (module:Class.method).
REPLACES = {
    "append": "folovllm.core.block_pool:FreeBlockQueue.append",
    "remove": "folovllm.core.block_pool:FreeBlockQueue.remove",
    "popleft": "folovllm.core.block_pool:FreeBlockQueue.popleft",
    "allocate_slots": "folovllm.core.kv_cache_manager:KVCacheManager.allocate_slots",
}


def append(self, block: KVCacheBlock) -> None:
    # TODO: link `block` in just before `self.tail` (four pointers change) and count it.
    raise NotImplementedError("not implemented: see labs/03/README.md")


def remove(self, block: KVCacheBlock) -> None:
    # TODO: unlink `block` from wherever it is, in O(1): its neighbours point at each other,
    #       its own links become None (a block in use has none), and the count drops. A block
    #       that is not in the queue (no links) is a bug of the caller: assert.
    raise NotImplementedError("not implemented: see labs/03/README.md")


def popleft(self) -> KVCacheBlock:
    # TODO: take the oldest free block (the one after `self.head`) out of the queue and return
    #       it; assert there is one (the caller checked `num_free_blocks`).
    raise NotImplementedError("not implemented: see labs/03/README.md")


def allocate_slots(self, request: Request, num_new_tokens: int,
                   new_computed_blocks: Sequence[KVCacheBlock] = ()) -> bool:
    """Make room for `num_new_tokens` more tokens of `request`, after the
    `new_computed_blocks` a prefix hit found (taken by reference); False (and nothing
    allocated or taken) if there are not enough free blocks.

        blocks of request:  [hit][hit][ new ][ new ]
                             |<-computed->|<- num_new_tokens ->|
    """
    # Stage 03's tests never pass `new_computed_blocks` (that is stage 06's prefix cache): you
    # may ignore it here. `self.req_to_blocks` maps a request id to its list of blocks (its block
    # table); `self.block_pool.get_new_blocks(n)` hands out n free blocks.
    # TODO 1: the request's blocks so far (none if it is being admitted).
    # TODO 2: how many more blocks `num_computed_tokens + num_new_tokens` tokens need
    #         (a block holds `self.block_size` tokens; only the last one may be partly empty).
    # TODO 3: admission keeps `self.watermark_blocks` free: a request that holds no block yet
    #         must leave them free, unless the whole cache is free (then nobody could need
    #         them, and a prompt as long as the whole cache must still fit). A running request
    #         may use them. Not enough free blocks (`self.num_free_blocks`) -> return False,
    #         having changed nothing.
    # TODO 4: take the new blocks, store the grown block table, return True.
    raise NotImplementedError("not implemented: see labs/03/README.md")
