"""Test utilities for attention backends, shared by `stages/04` tests, `stages/04/triton_cases.py`
and `benchmarks/attention_cpu.py`.

`random_paged_batch` builds inputs the way the engine does: each sequence's blocks scattered over
the pool in random order, the slots nobody owns filled with 100.0 (a backend that reads a key it
must not see gets a visibly wrong answer), and a packed varlen batch. `run_backend` runs one
layer of one step through a backend (its `build_metadata`, then its `forward`).

`record_allocations` / `largest_allocation` are the deterministic memory proxy: a
`TorchDispatchMode` that sees every aten op a backend runs and notes each tensor it creates
(views of existing storage do not count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from folovllm.model_executor.layers.attention import AttentionBackend, AttentionMetadata, store_kv_cache

UNOWNED = 100.0  # what the cache holds in slots that no sequence owns


@dataclass(frozen=True)
class Batch:
    """Sequence b has seq_lens[b] tokens in its context, the last query_lens[b] of them new."""

    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16


def random_paged_batch(
    batch: Batch, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
    contiguous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """q [T, Hq, D], key/value caches holding every sequence's K/V, and the step's metadata.

    Paged: blocks of `block_size` handed out in random order. `contiguous=True`: the cache of
    stages 01-02, one block per sequence that is as long as the longest sequence.
    """
    g = torch.Generator().manual_seed(seed)
    bs = max(batch.seq_lens) if contiguous else batch.block_size
    hkv, d = batch.kv_heads, batch.head_dim
    blocks_per_seq = [math.ceil(n / bs) for n in batch.seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # two blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in blocks_per_seq]
    key_cache = torch.full((num_blocks, bs, hkv, d), UNOWNED, dtype=dtype)
    value_cache = torch.full_like(key_cache, UNOWNED)
    for n, table in zip(batch.seq_lens, tables):
        slots = torch.tensor([table[j // bs] * bs + j % bs for j in range(n)])
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        store_kv_cache(k, v, key_cache, value_cache, slots)
    q = torch.randn(sum(batch.query_lens), batch.heads, d, generator=g).to(dtype)
    positions = torch.cat([torch.arange(n - m, n) for n, m in zip(batch.seq_lens, batch.query_lens)])
    md = AttentionMetadata.from_lists(
        list(batch.query_lens), list(batch.seq_lens), tables, positions.to(device), bs)
    return q.to(device), key_cache.to(device), value_cache.to(device), md


def run_backend(
    backend: AttentionBackend, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    md: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """One layer of one step, as the engine runs it: the backend's metadata from the common one
    (the model runner's job), then its forward."""
    return backend.forward(q, key_cache, value_cache, backend.build_metadata(md, key_cache), scale)


# ---------------------------------------------------------------------------------------------
# The memory proxy: every tensor a function allocates
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _AllocationRecorder(TorchDispatchMode):
    """Notes the outputs of every aten op that do not share storage with one of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[Allocation] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype))
        return out


def record_allocations(fn: Callable[[], Any]) -> tuple[Any, list[Allocation]]:
    """Run fn(); return its result and every tensor its aten ops created, in order.

    Tensors created inside one fused kernel (its own tiles) are not visible: only what the
    kernel returns is.
    """
    recorder = _AllocationRecorder()
    with recorder:
        result = fn()
    return result, recorder.allocations


def largest_allocation(fn: Callable[[], Any]) -> Allocation:
    """The largest tensor (in elements) that fn() creates."""
    _, allocations = record_allocations(fn)
    return max(allocations, key=lambda a: a.numel)
