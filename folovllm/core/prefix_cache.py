# --8<-- [start:prefix_cache_doc]
"""Stage 06: automatic prefix caching. A request's full blocks stay findable by content after
it ends, so a later request with the same prefix takes them by reference instead of computing
them again.

Each full block gets a hash chained from its parent's (`block_hash.hash_block_tokens`), so a
block's hash names its whole prefix. Two requests sharing a 40-token system prompt, block_size 16::

    request A: [s0 .. s15][s16 .. s31][s32..s39 a0..a7][a8 ..]
                 h0=H(-,s0..15)  h1=H(h0,s16..31)  h2=H(h1,s32..39 a0..7)
    request B: [s0 .. s15][s16 .. s31][s32..s39 b0..b7][b8 ..]
                 h0 (hit)        h1 (hit)          h2' != h2 (miss: stop)

    block pool:  [5: h0, ref 2] [9: h1, ref 2] [3: h2, ref 1] [12: h2', ref 1]
    A's table:   5  9  3                     B's table: 5  9  12  -> B computes from token 32

Only full blocks are cached (a partial block's content is still changing, and its hash would
name tokens that do not exist yet). On admission the longest run of cached blocks is a hit and
the request starts with `num_computed_tokens` at its end; the last token is always computed,
because its logits give the next token. A block is cached as soon as it is scheduled to be
filled: its K/V is written in that step, before any request in the same step attends to it
(each attention layer stores the whole batch's K/V before computing attention), so the `n`
samples of one prompt, admitted together, already share its blocks.

    PrefixCache      stage 06: hashes blocks as they fill, finds the longest hit, caches blocks
    NullPrefixCache  caching off: never hits, hashes nothing (the same interface)

The map itself (hash -> block), touching a hit block and the lazy eviction of free cached
blocks (least recently freed first) live in `BlockPool`.
"""
# --8<-- [end:prefix_cache_doc]

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

from folovllm.core.block_hash import (
    NONE_HASH,
    BlockHash,
    generate_block_hash_extra_keys,
    hash_block_tokens,
    sha256_hash,
)
from folovllm.core.block_pool import BlockPool, KVCacheBlock
from folovllm.core.request import Request


@dataclass
class PrefixCacheStats:
    """What the prefix cache did over some steps (vLLM's `PrefixCacheStats`).

    Attributes:
        requests: admissions that looked the cache up (a resumed preempted request again).
        queries: tokens those requests had when they looked (prompt, and output if resumed).
        hits: of those, tokens found cached (whole blocks; never a request's last token).
        blocks_saved: hit blocks: taken by reference, neither allocated nor computed.
        evictions: cached blocks handed out for other tokens, their content dropped.
        collisions: lookups that found the hash holding other content (a miss, not wrong KV).
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0
    blocks_saved: int = 0
    evictions: int = 0
    collisions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    # Field by field, not `dataclasses.astuple` (which deep-copies every value through a
    # recursive walk): the engine adds one of these up every step.
    def __add__(self, other: "PrefixCacheStats") -> "PrefixCacheStats":
        return PrefixCacheStats(*map(operator.add, self._values(), other._values()))

    def __sub__(self, other: "PrefixCacheStats") -> "PrefixCacheStats":
        return PrefixCacheStats(*map(operator.sub, self._values(), other._values()))

    def _values(self) -> tuple[int, ...]:
        return (self.requests, self.queries, self.hits, self.blocks_saved, self.evictions, self.collisions)


class NullPrefixCache:
    """Prefix caching off (stages 03-05): never hits, hashes nothing, caches nothing. It is also
    the interface: `PrefixCache` overrides every method."""

    def find_longest_cache_hit(self, request: Request) -> list[KVCacheBlock]:
        return []

    def cache_full_blocks(self, request: Request, blocks: Sequence[KVCacheBlock], num_tokens: int) -> None:
        pass

    def record_admission(self, request: Request, num_hit_blocks: int) -> None:
        pass

    def free(self, request: Request) -> None:
        pass

    def make_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats()


class PrefixCache(NullPrefixCache):
    """Stage 06: the policy over `BlockPool`'s hash map."""

    def __init__(self, block_pool: BlockPool, block_size: int,
                 hash_fn: Callable[[bytes], bytes] = sha256_hash) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.hash_fn = hash_fn
        # request id -> how many of its leading blocks were offered to the map already
        self.num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()
        self._reported = PrefixCacheStats()

    # --8<-- [start:block_hashes]
    def block_hashes(self, request: Request) -> list[BlockHash]:
        """The hashes of every full block of `request`, computing the ones not computed yet
        (blocks fill as tokens are generated: a chat's next turn hits its earlier answers)."""
        hashes, size = request.block_hashes, self.block_size
        for i in range(len(hashes), request.num_tokens // size):
            parent = hashes[-1].hash_value if hashes else NONE_HASH
            start, end = i * size, (i + 1) * size
            extra = generate_block_hash_extra_keys(request, start, end)
            hashes.append(hash_block_tokens(self.hash_fn, parent, request.all_token_ids[start:end], extra))
        return hashes
    # --8<-- [end:block_hashes]

    # --8<-- [start:find_longest_cache_hit]
    def find_longest_cache_hit(self, request: Request) -> list[KVCacheBlock]:
        """The cached blocks of the longest cached prefix of `request`, in order. At most
        `num_tokens - 1` tokens: the last token must be computed, since its logits give the next
        token, so a fully cached prompt still computes its last block (at most block_size)."""
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVCacheBlock] = []
        for block_hash in self.block_hashes(request)[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break  # chained hashes: nothing after a miss can match
            hit.append(block)
        return hit
    # --8<-- [end:find_longest_cache_hit]

    # --8<-- [start:cache_full_blocks]
    def cache_full_blocks(self, request: Request, blocks: Sequence[KVCacheBlock], num_tokens: int) -> None:
        """Offer to the map the blocks of `request` that are full once its first `num_tokens`
        tokens are computed (this step computes them, before anyone reads them)."""
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = num_tokens // self.block_size
        if end <= start:
            return
        hashes = self.block_hashes(request)
        for block, block_hash in zip(blocks[start:end], hashes[start:end]):
            self.block_pool.cache_full_block(block, block_hash)
        self.num_cached_blocks[request.request_id] = end
    # --8<-- [end:cache_full_blocks]

    def record_admission(self, request: Request, num_hit_blocks: int) -> None:
        self.stats.requests += 1
        self.stats.queries += request.num_tokens
        self.stats.hits += num_hit_blocks * self.block_size
        self.stats.blocks_saved += num_hit_blocks

    def free(self, request: Request) -> None:
        """The request gave its blocks back; the cached ones stay findable (a preempted request
        hits them when it is admitted again)."""
        self.num_cached_blocks.pop(request.request_id, None)

    def make_stats(self) -> PrefixCacheStats:
        """What happened since the last call (the engine adds it up after every step)."""
        now = dataclasses.replace(self.stats, evictions=self.block_pool.num_evictions,
                                  collisions=self.block_pool.num_collisions)
        delta, self._reported = now - self._reported, now
        return delta
