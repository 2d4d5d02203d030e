"""Stage 06: block hashes. A full block's hash names its tokens and every token before them
(`hash_block_tokens`), so equal hashes find equal prefixes (`prefix_cache.py`); `BlockHash` keeps
what was hashed, so that `BlockPool` can tell a collision from a hit. (vLLM keeps these in
`vllm/v1/core/kv_cache_utils.py`, beside the start-up sizing that is `kv_cache_sizing.py` here.)"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

if TYPE_CHECKING:
    from folovllm.core.request import Request


# --8<-- [start:block_hash]
class BlockHash(NamedTuple):
    """The identity of one *full* block: its hash, and what was hashed.

    `hash_value` alone is the key of the prefix cache's map. The inputs are kept beside it so a
    hit can be checked against them (`BlockPool.get_cached_block`): two blocks whose hashes are
    equal but whose tokens or parents differ are a collision, and a collision must be a miss,
    never somebody else's KV.
    """

    hash_value: bytes
    parent_hash_value: bytes
    token_ids: tuple[int, ...]
    extra_keys: Optional[tuple[Any, ...]] = None


# The "parent" of a sequence's first block. Fixed, so hashes are the same in every process and
# every run (vLLM seeds it at random unless PYTHONHASHSEED is set, so that one tenant cannot
# predict another's hashes).
NONE_HASH = bytes(32)


def sha256_hash(data: bytes) -> bytes:
    """The default block hash (vLLM's default too): 32 bytes, no known collisions."""
    return hashlib.sha256(data).digest()


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
    token_ids = tuple(token_ids)
    data = (struct.pack("<II", len(parent_hash_value), len(token_ids)) + parent_hash_value
            + struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_keys is not None:
        data += repr(extra_keys).encode()
    return BlockHash(hash_fn(data), parent_hash_value, token_ids, extra_keys)
# --8<-- [end:block_hash]


# --8<-- [start:extra_keys]
def generate_block_hash_extra_keys(request: "Request", start: int, end: int) -> Optional[tuple[Any, ...]]:
    """What besides the token ids decides the K/V of tokens `start:end` of `request` (vLLM's
    `generate_block_hash_extra_keys`): the LoRA adapter it runs under (stage 11), since an
    adapter on k_proj/v_proj changes every K/V, so equal tokens under two adapters (or one and
    the base) never share blocks. It is in every block's hash, and hashes chain, so the first
    block already differs. None for the base model: its hashes are the ones before stage 11.
    An image's hash or a tenant's cache salt would go here too."""
    lora = request.lora_request
    return None if lora is None else ("lora", lora.lora_int_id)
# --8<-- [end:extra_keys]
