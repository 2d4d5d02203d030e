"""Lab 06: prefix caching: the chained block hash and the longest cached prefix.

Fill in `hash_block_tokens` and `find_longest_cache_hit` below; `FOLOVLLM_LAB=starter pytest
stages/06` grades them (they replace `hash_block_tokens` of `folovllm/core/block_hash.py`, in
every module that imported it, and `PrefixCache.find_longest_cache_hit` of
`folovllm/core/prefix_cache.py` while stage 06's tests run). Read labs/06/README.md first.

    request A: [s0 .. s15][s16 .. s31][s32..s39 a0..a7][a8 ..]
                 h0=H(-,s0..15)  h1=H(h0,s16..31)  h2=H(h1,s32..39 a0..7)
    request B: [s0 .. s15][s16 .. s31][s32..s39 b0..b7][b8 ..]
                 h0 (hit)        h1 (hit)          h2' != h2 (miss: stop)
"""

from __future__ import annotations

import struct  # noqa: F401  (a stable encoding of the ints: struct.pack)
from typing import Any, Callable, Optional, Sequence

from folovllm.core.block_hash import BlockHash
from folovllm.core.block_pool import KVCacheBlock
from folovllm.core.request import Request

# The engine functions these replace (module:function, module:Class.method).
REPLACES = {
    "hash_block_tokens": "folovllm.core.block_hash:hash_block_tokens",
    "find_longest_cache_hit": "folovllm.core.prefix_cache:PrefixCache.find_longest_cache_hit",
}


def hash_block_tokens(
    hash_fn: Callable[[bytes], bytes], parent_hash_value: bytes, token_ids: Sequence[int],
    extra_keys: Optional[tuple[Any, ...]] = None,
) -> BlockHash:
    """Hash one full block, chained to its parent block's hash::

        block 0: h0 = H(NONE_HASH | t0..t15)      block 1: h1 = H(h0 | t16..t31)   ...

    so `h_i` names the block's tokens *and every token before them*: the K/V of a token depends
    on the whole prefix, so equal hashes must mean equal prefixes, not just equal blocks.

    The encoding is stable across runs and machines (not Python's `hash`, not pickle): the two
    lengths, the parent hash, the token ids as little-endian int64, then `repr(extra_keys)`.
    """
    # TODO 1: the bytes to hash, as the docstring says: two lengths, the parent hash, the tokens
    #         (struct.pack with "<" for little-endian; "I" is a 4-byte unsigned int, "q" an
    #         8-byte signed one), then the extra keys when there are any.
    # TODO 2: return a BlockHash of `hash_fn(data)` that also keeps what was hashed (the parent
    #         hash value, the token ids as a tuple, the extra keys): the block pool compares them
    #         on a hit, so a collision is a miss, never somebody else's K/V.
    raise NotImplementedError("not implemented: see labs/06/README.md")


def find_longest_cache_hit(self, request: Request) -> list[KVCacheBlock]:
    """The cached blocks of the longest cached prefix of `request`, in order. At most
    `num_tokens - 1` tokens: the last token must be computed, since its logits give the next
    token, so a fully cached prompt still computes its last block (at most block_size)."""
    # `self` is the engine's `PrefixCache`: `self.block_hashes(request)` gives the hashes of the
    # request's full blocks, in order; `self.block_pool.get_cached_block(h)` the block that holds
    # exactly that content, or None; `self.block_size`.
    # TODO 1: how many blocks may hit at most, so that the last token is left to compute.
    # TODO 2: walk the request's block hashes from the first, collecting cached blocks; stop at
    #         the first miss (why may nothing after a miss hit? the hashes are chained).
    raise NotImplementedError("not implemented: see labs/06/README.md")
