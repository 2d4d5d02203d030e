"""Sizing the KV cache at start-up (which manager a config gets, and `max_model_len` fitted to
the budget when the user left it unset), and the block hashes of stage 06's prefix cache
(`BlockHash`, `hash_block_tokens`: where vLLM keeps them)."""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

from folovllm.config import EngineConfig
from folovllm.core.kv_cache_interface import KVCacheManagerBase, KVCacheSpec

if TYPE_CHECKING:
    from folovllm.core.request import Request

logger = logging.getLogger("folovllm")


def get_kv_cache_manager_cls(config: EngineConfig) -> type[KVCacheManagerBase]:
    """Stage 01: slots taken per static batch; 02: slots per request; 03 on: paged blocks
    (stage 06: the same manager, given a prefix cache by `from_config`)."""
    # Imported here: the managers import the block hashes below.
    from folovllm.core.kv_cache_manager import KVCacheManager
    from folovllm.core.slot_kv_cache_manager import SlotKVCacheManager, StaticKVCacheManager

    if config.enable_paged_kv:
        return KVCacheManager
    return SlotKVCacheManager if config.enable_continuous_batching else StaticKVCacheManager


# --8<-- [start:fit_max_model_len]
def fit_max_model_len(config: EngineConfig, spec: KVCacheSpec, budget: int) -> EngineConfig:
    """When the user left `max_model_len` unset, shrink the model's (Qwen3-0.6B: 40,960 tokens)
    to what the KV budget holds: one sequence with paged KV, `max_num_seqs` slots without (or,
    when the budget holds fewer than `max_num_seqs` blocks, one slot per block it holds). Every
    stage refuses only a budget smaller than one block."""
    block_bytes = config.block_size * spec.bytes_per_token
    sequences = 1 if config.enable_paged_kv else max(1, min(config.max_num_seqs, budget // block_bytes))
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


# -- stage 06: block hashes ------------------------------------------------------------------------

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


def generate_block_hash_extra_keys(request: "Request", start: int, end: int) -> Optional[tuple[Any, ...]]:
    """What besides the token ids decides the K/V of tokens `start:end` of `request`. Nothing
    today: one model, text only. A LoRA adapter's name, an image's hash or a tenant's cache salt
    would go here (vLLM's `generate_block_hash_extra_keys`), so that equal tokens under a
    different adapter or image never share K/V."""
    return None
