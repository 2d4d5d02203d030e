"""Who am I among the tensor-parallel ranks, and the two collectives the model needs (stage 08).

vLLM keeps its process groups in `vllm/distributed/parallel_state.py`; this is the same idea cut
to tensor parallelism only::

    init_distributed_environment(world_size, rank, init_method, backend)   once per process
    get_tensor_model_parallel_world_size() / _rank()     1 / 0 when never initialized, so every
                                                         layer runs unchanged on one process
    tensor_model_parallel_all_reduce(x)   sum over ranks: after each row-parallel layer
                                          (o_proj, down_proj) and the vocab-parallel embedding
    tensor_model_parallel_gather(x, dim)  concatenation on rank 0: the LM head's logits
    expert_parallel(enabled)              while a MoE model is built: its experts are split
                                          whole across the ranks (vLLM's enable_expert_parallel)
    get_expert_parallel_world_size() / _rank()   the EP group: the TP ranks when it is on, else 1 / 0

One process is one rank: the tensor-parallel group is the whole world (no pipeline or data
parallel groups to carve out of it, see docs/stages/08-tensor-parallel.md "What is left out").

Every collective goes through this file, so it counts them (`comm_stats`): the stage 08 tests
assert the count per step, and the benchmark reports the bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Collectives this process has called since the last reset (payload bytes of this rank's
    tensor: what one rank hands the collective, not what crosses the wire)."""

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_reduce_seconds: float = 0.0  # wall time inside the collective, waiting for peers included
    gather_calls: int = 0
    gather_bytes: int = 0
    gather_seconds: float = 0.0


_WORLD_SIZE = 1
_RANK = 0
_STATS = CommStats()
_EXPERT_PARALLEL = False  # set only while a model is built (`expert_parallel`)


def init_distributed_environment(
    world_size: int,
    rank: int,
    init_method: str = "env://",
    backend: Optional[str] = None,
    timeout_s: float = 120.0,
) -> None:
    """Join the process group as `rank` of `world_size`.

    `init_method="env://"` reads MASTER_ADDR, MASTER_PORT (and RANK, WORLD_SIZE if the
    arguments are left to them), which `torchrun` sets for every process on every node: that is
    the multi-node path. `MultiprocExecutor` passes `tcp://127.0.0.1:<free port>` instead.
    `backend`: "gloo" on CPU, "nccl" on CUDA. `timeout_s` bounds every collective, so a rank
    whose peer died raises instead of waiting forever.
    """
    global _WORLD_SIZE, _RANK
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo" and init_method.startswith("tcp://127.0.0.1"):
        # Single node: talk over the loopback whatever the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend, init_method=init_method, world_size=world_size, rank=rank,
        timeout=timedelta(seconds=timeout_s),
    )
    _WORLD_SIZE, _RANK = world_size, rank


def destroy_distributed_environment() -> None:
    global _WORLD_SIZE, _RANK
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD_SIZE, _RANK = 1, 0


def get_tensor_model_parallel_world_size() -> int:
    return _WORLD_SIZE


def get_tensor_model_parallel_rank() -> int:
    return _RANK


# --8<-- [start:expert_parallel]
@contextlib.contextmanager
def expert_parallel(enabled: bool) -> Iterator[None]:
    """While a model is built: give each rank whole experts (`FusedMoE` reads it once, in its
    constructor), as `cpu_gemm.weight_packing` does for the linear layers' layout. vLLM's EP
    group spans data x tensor parallel ranks; with no data parallelism here it is the TP group,
    so the experts' all-reduce is the one tensor parallelism already does."""
    global _EXPERT_PARALLEL
    previous, _EXPERT_PARALLEL = _EXPERT_PARALLEL, enabled
    try:
        yield
    finally:
        _EXPERT_PARALLEL = previous


def get_expert_parallel_world_size() -> int:
    """Ranks the experts are divided among: the TP ranks under `expert_parallel`, else 1."""
    return _WORLD_SIZE if _EXPERT_PARALLEL else 1


def get_expert_parallel_rank() -> int:
    return _RANK if _EXPERT_PARALLEL else 0
# --8<-- [end:expert_parallel]


def divide(numerator: int, denominator: int) -> int:
    """Exact division, for sizes that must split evenly across ranks."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


# --8<-- [start:collectives]
def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over all ranks (in place when there are several); every rank gets the sum."""
    if _WORLD_SIZE == 1:
        return x
    _STATS.all_reduce_calls += 1
    _STATS.all_reduce_bytes += x.numel() * x.element_size()
    start = time.perf_counter()
    dist.all_reduce(x)
    _STATS.all_reduce_seconds += time.perf_counter() - start
    return x


def tensor_model_parallel_gather(x: torch.Tensor, dim: int = -1) -> Optional[torch.Tensor]:
    """Concatenate every rank's `x` along `dim` on rank 0; other ranks get None (only rank 0's
    result is read: the driver samples from it)."""
    if _WORLD_SIZE == 1:
        return x
    _STATS.gather_calls += 1
    _STATS.gather_bytes += x.numel() * x.element_size()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_WORLD_SIZE)] if _RANK == 0 else None
    start = time.perf_counter()
    dist.gather(x, parts, dst=0)
    _STATS.gather_seconds += time.perf_counter() - start
    return torch.cat(parts, dim=dim) if parts is not None else None
# --8<-- [end:collectives]


def comm_stats(reset: bool = False) -> CommStats:
    """A copy of this process's collective counters; `reset=True` zeroes them after copying."""
    global _STATS
    stats = dataclasses.replace(_STATS)
    if reset:
        _STATS = CommStats()
    return stats
