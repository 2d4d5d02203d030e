# --8<-- [start:dp_routing_doc]
"""Data parallelism: which engine replica a request goes to (`--data-parallel-routing`).

`folovllm serve --data-parallel-size N` runs N copies of the engine, each in its own process
with its own KV cache and prefix cache (`dp_client.py`). The front sees every request first and
must pick one replica for it; that choice is all a routing policy is::

    request ── tokenized in the front ──► policy.select(request, loads) ──► replica i
                                                     ▲
          loads: requests each replica holds ────────┘ (counted by the front: exact, no lag)

Three policies, each a small class with a name:

- `round_robin`: 0, 1, 2, 0, ... Blind to load and content; right when requests look alike.
- `least_loaded`: the replica with the fewest requests in flight (waiting + running, each
  sample of `n` counted), KV usage as the tie-break (vLLM's `DPLBAsyncMPClient` scores
  `waiting * 4 + running` from each engine's stats). The front counts the requests itself, so
  a burst that arrives between two stats reports still spreads evenly.
- `prefix_aware`: SGLang's cache-aware router in small. The front hashes the request's full
  blocks exactly as the prefix cache does (`hash_block_tokens`, chained), and remembers which
  replica it sent each chain hash to, in a bounded LRU map (an approximate radix tree: a chain
  hash names a whole prefix, so a dict of them is a trie flattened). The request goes to the
  replica holding its *longest* remembered prefix, unless that replica holds more than
  `max_load_imbalance` requests above the least-loaded one; then (and when nothing matches)
  to the least-loaded. The map is approximate: it says where a prefix was *sent*, not whether
  that replica's cache still holds it (it may have been evicted), which costs a miss, never a
  wrong answer: every replica computes what it lacks.

Why a cap: pure affinity sends a popular conversation's every turn to one replica while the
others idle; pure balance scatters the turns of one conversation, so each replica recomputes
its prefix. The cap keeps affinity while it is cheap. What is left out: SGLang's radix tree
also evicts by the replicas' real cache sizes and matches at token (not block) granularity;
vLLM's router (`vllm-router`) adds consistent hashing for many fronts.
"""
# --8<-- [end:dp_routing_doc]

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

from folovllm.core.block_hash import NONE_HASH, hash_block_tokens, sha256_hash


@dataclass
class ReplicaLoad:
    """What a policy knows of one live replica when it routes."""

    index: int
    num_requests: int = 0  # samples the front sent it that have not finished (waiting + running)
    kv_cache_usage: float = 0.0  # 0..1, from the replica's last stats report


@dataclass
class RoutingRequest:
    """What a policy may read of a request: its prompt's token ids (None when the front could
    not read them: a malformed prompt, which the replica will refuse with the engine's
    message) and the chain hashes of its full blocks (filled for `prefix_aware` only)."""

    token_ids: Optional[list[int]] = None
    block_hashes: list[bytes] = field(default_factory=list)


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chain hashes of the prompt's full blocks, the prefix cache's own (`block_hash.py`,
    base model: no extra keys), so a block hash here is one that the replica's cache may hold."""
    hashes: list[bytes] = []
    parent = NONE_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(sha256_hash, parent, token_ids[start:start + block_size]).hash_value
        hashes.append(parent)
    return hashes


class RoutingPolicy:
    """Picks a replica for each request. `loads` lists the live replicas only (a dead one is
    never offered), in index order, never empty."""

    name: ClassVar[str]
    uses_block_hashes: ClassVar[bool] = False  # the front hashes the prompt's blocks for it

    def select(self, request: RoutingRequest, loads: Sequence[ReplicaLoad]) -> int:
        raise NotImplementedError


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, request: RoutingRequest, loads: Sequence[ReplicaLoad]) -> int:
        return loads[next(self._counter) % len(loads)].index


class LeastLoadedPolicy(RoutingPolicy):
    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0  # requests placed by load so far: who wins a full tie next

    def select(self, request: RoutingRequest, loads: Sequence[ReplicaLoad]) -> int:
        chosen = self.least_loaded(loads)
        self._turn += 1
        return chosen

    def least_loaded(self, loads: Sequence[ReplicaLoad]) -> int:
        """Fewest requests, then least KV in use; a tie left after both rotates (else an idle
        server would send every lone request to replica 0, and warm only its cache)."""
        best = min(range(len(loads)), key=lambda i: (loads[i].num_requests, loads[i].kv_cache_usage,
                                                      (i - self._turn) % len(loads)))
        return loads[best].index


class PrefixAwarePolicy(LeastLoadedPolicy):
    name = "prefix_aware"
    uses_block_hashes = True

    def __init__(self, max_load_imbalance: int = 8, max_entries: int = 1 << 16) -> None:
        """`max_load_imbalance`: how many requests more than the least-loaded replica the
        replica holding the prefix may have and still get the request. `max_entries`: chain
        hashes remembered (LRU): the replicas' caches together hold about this many blocks."""
        super().__init__()
        if max_load_imbalance < 0 or max_entries < 1:
            raise ValueError(f"max_load_imbalance must be >= 0 and max_entries >= 1, got "
                             f"{max_load_imbalance} and {max_entries}")
        self.max_load_imbalance = max_load_imbalance
        self.max_entries = max_entries
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # chain hash -> replica, oldest first

    def longest_match(self, request: RoutingRequest, live: set[int]) -> tuple[Optional[int], int]:
        """(replica, blocks) of the longest prefix of the request sent to a live replica; the
        deepest hash found is the longest, since a chain hash names its whole prefix."""
        for depth in range(len(request.block_hashes), 0, -1):
            replica = self.owner.get(request.block_hashes[depth - 1])
            if replica is not None and replica in live:
                return replica, depth
        return None, 0

    def select(self, request: RoutingRequest, loads: Sequence[ReplicaLoad]) -> int:
        by_index = {load.index: load for load in loads}
        matched, _ = self.longest_match(request, set(by_index))
        least = self.least_loaded(loads)
        if matched is not None and \
                by_index[matched].num_requests - by_index[least].num_requests <= self.max_load_imbalance:
            chosen = matched
        else:  # placed by load: the next full tie goes to the next replica
            chosen = least
            self._turn += 1
        for block_hash in request.block_hashes:  # the chosen replica will hold these blocks now
            self.owner[block_hash] = chosen
            self.owner.move_to_end(block_hash)
        while len(self.owner) > self.max_entries:
            self.owner.popitem(last=False)
        return chosen


ROUTING_POLICIES: dict[str, type[RoutingPolicy]] = {
    cls.name: cls for cls in (RoundRobinPolicy, LeastLoadedPolicy, PrefixAwarePolicy)}


def get_routing_policy(name: str, **kwargs: object) -> RoutingPolicy:
    """The policy named `name` (`--data-parallel-routing`); ValueError naming the choices."""
    if name not in ROUTING_POLICIES:
        raise ValueError(f"--data-parallel-routing must be one of {sorted(ROUTING_POLICIES)}, got {name!r}")
    cls = ROUTING_POLICIES[name]
    return cls(**kwargs) if cls is PrefixAwarePolicy else cls()  # type: ignore[arg-type]
