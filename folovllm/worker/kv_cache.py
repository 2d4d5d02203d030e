"""KV cache storage and the managers that decide which request's tokens live where.

Storage is always `[num_blocks, block_size, num_kv_heads, head_dim]` per layer for keys and for
values (see `layers/attention.py`). What changes from stage to stage is how blocks are handed out:

    stage 01  StaticKVCacheManager  one tensor per static batch, one row ("block") per request,
                                    sized for the longest request of that batch
    stage 02  SlotKVCacheManager    `max_num_seqs` rows of `max_model_len` tokens allocated once;
                                    a finished request's row is reused at once
    stage 03  KVCacheManager        small blocks handed out as tokens arrive (kv_cache_manager.py)

Stages 01 and 02 reserve room for a request's *longest possible* length when it starts, whatever
it ends up using; stage 03 reserves at most one partly filled block per request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from folovllm.config import EngineConfig
from folovllm.core.request import Request

CPU_DEFAULT_KV_CACHE_MEMORY = 4 * 2**30  # like vLLM's CPU default KV space


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one token's K/V across the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str

    @property
    def bytes_per_token(self) -> int:
        """K and V, every layer: 2 * layers * kv_heads * head_dim * bytes per element."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


def check_fits_in_memory(num_bytes: int, device: str) -> None:
    """Refuse, with the numbers, a cache larger than the device's memory (instead of an OOM
    kill half-way through allocating it)."""
    if torch.device(device).type == "cuda":
        available = torch.cuda.mem_get_info(torch.device(device))[0]
        where = "free GPU memory"
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "physical RAM"
    if num_bytes > available:
        raise ValueError(
            f"the KV cache needs {num_bytes / 2**30:.2f} GiB but the {where} is "
            f"{available / 2**30:.2f} GiB; lower max_model_len or max_num_seqs"
        )


# --8<-- [start:kv_cache_budget]
def kv_cache_budget(config: EngineConfig, spec: KVCacheSpec, model_runner: "Any") -> int:
    """Bytes of KV cache for stages 02 and 03 (both cut their slots or blocks from it).

    `kv_cache_memory` if given. On CUDA: `gpu_memory_utilization` of the GPU minus the peak
    memory of one full-size forward pass (weights + activations), measured. On CPU: room for
    `max_num_seqs` sequences of `max_model_len` tokens, at most 4 GiB.
    """
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if torch.device(config.device).type == "cuda":
        peak = model_runner.profile_peak_memory(config.max_num_batched_tokens, spec)
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        budget = int(total * config.gpu_memory_utilization) - peak
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache: the model's peak is {peak / 2**30:.2f} GiB "
                f"of {total * config.gpu_memory_utilization / 2**30:.2f} GiB allowed by "
                f"gpu_memory_utilization={config.gpu_memory_utilization}"
            )
        return budget
    full = config.max_num_seqs * config.max_model_len * spec.bytes_per_token
    return min(full, CPU_DEFAULT_KV_CACHE_MEMORY)
# --8<-- [end:kv_cache_budget]


class KVCache:
    """Per-layer key and value tensors of shape [num_blocks, block_size, Hkv, D]."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        check_fits_in_memory(num_blocks * block_size * spec.bytes_per_token, spec.device)
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.key_caches = [
            torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)
        ]
        self.value_caches = [
            torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)
        ]

    @property
    def num_reserved_tokens(self) -> int:
        return self.num_blocks * self.block_size


class StaticKVCacheManager:
    """Stage 01: a fresh contiguous cache for every static batch.

    ::

        batch of 3 requests, capacity = longest prompt + longest max_tokens in the batch

        row 0  [p p p p o o o . . . . . . .]   short request: most of its row never used
        row 1  [p p p p p p p p o o o o o o]   longest request decides the capacity
        row 2  [p p o . . . . . . . . . . .]
    """

    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        self.kv_cache: KVCache | None = None
        self._rows: dict[str, int] = {}

    def allocate_batch(self, requests: list[Request], capacity: int) -> None:
        assert self.kv_cache is None, "free the previous batch first"
        self.kv_cache = KVCache(self.spec, num_blocks=len(requests), block_size=capacity)
        self._rows = {r.request_id: i for i, r in enumerate(requests)}

    def free_batch(self) -> None:
        self.kv_cache = None
        self._rows = {}

    def get_block_table(self, request: Request) -> list[int]:
        return [self._rows[request.request_id]]

    @property
    def num_reserved_tokens(self) -> int:
        return 0 if self.kv_cache is None else self.kv_cache.num_reserved_tokens


# --8<-- [start:slot_kv_cache_manager]
class SlotKVCacheManager:
    """Stage 02: `max_num_seqs` fixed slots, each a contiguous row of `max_model_len` tokens.

    The cache is allocated once; a request takes a free slot when it is admitted and gives it
    back when it finishes or is aborted, and the next request reuses it at once::

        slot 0  [A A A A A A . . . . . . . . . .]   every slot reserves max_model_len tokens,
        slot 1  [B B B B B B B B B B B . . . . .]   however short its request turns out to be:
        slot 2  [C C . . . . . . . . . . . . . .]   the waste stage 03 (paged KV) removes
        slot 3  [free                           ]
    """

    def __init__(self, spec: KVCacheSpec, num_slots: int, slot_size: int) -> None:
        self.spec = spec
        self.kv_cache = KVCache(spec, num_blocks=num_slots, block_size=slot_size)
        # A stack: the most recently freed slot is reused first (its memory is warm).
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.slot_of: dict[str, int] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """A request holds a whole slot from admission on, so only admission can fail."""
        if request.request_id in self.slot_of:
            return True
        if not self.free_slots:
            return False
        self.slot_of[request.request_id] = self.free_slots.pop()
        return True

    def free(self, request: Request) -> None:
        self.free_slots.append(self.slot_of.pop(request.request_id))

    def get_block_table(self, request: Request) -> list[int]:
        return [self.slot_of[request.request_id]]

    @property
    def num_reserved_tokens(self) -> int:
        """Slots in use times their size (a free slot is allocated but reserved for no one)."""
        return len(self.slot_of) * self.kv_cache.block_size
# --8<-- [end:slot_kv_cache_manager]
