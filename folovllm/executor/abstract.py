"""`Executor`: what the engine asks of the workers, however many there are and wherever they run.

    kv_cache_spec()                 one token's K/V on one rank (rank 0 speaks for all: they
                                    hold the same number of heads)
    determine_available_memory()    the KV budget per rank: the smallest any rank can give
    initialize_kv_cache()           every rank allocates the same block count, its own heads
    execute_model(batch)            run one step: rank 0's logits of the rows that sample (the
                                    engine samples them)
    collective_rpc(method, *args)   call `Worker.method(*args)` on every rank; one result each
    shutdown()

The block manager stays single, in the engine: a block id means the same slots on every rank,
each rank's slots holding its own heads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch

from folovllm.config import EngineConfig
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec
from folovllm.worker.persistent_batch import StepBatch


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker died, failed or hung: the engine cannot run another step (the
    ranks' collectives are out of step), so this is never one request's fault."""


class Executor(ABC):
    def __init__(self, config: EngineConfig, model_path: Path, hf_config: Any) -> None:
        self.config = config
        self.model_path = model_path
        self.hf_config = hf_config
        self._expert_load: Optional[torch.Tensor] = None  # [L, E] since the last take (MoE)

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """`Worker.method(*args)` on every rank, results in rank order."""

    # --8<-- [start:executor_execute_model]
    def execute_model(self, batch: StepBatch) -> Optional[torch.Tensor]:
        """Run one step on every rank -> float32 logits [S, vocab] of the S rows that sample
        (`batch.sampling_rows`), on the engine's device; None when no row samples. Only rank 0
        has them: the LM head gathers the vocabulary there. A MoE model's routing counts come
        back with them and wait for `take_expert_load`."""
        return self._step_result(self.collective_rpc("execute_model", batch)[0])  # rank 0's
    # --8<-- [end:executor_execute_model]

    def _step_result(self, result: tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
                     ) -> Optional[torch.Tensor]:
        """Rank 0's `Worker.execute_model` answer (logits, MoE routing counts) -> the logits on
        the engine's device; the counts are kept for `take_expert_load`."""
        logits, expert_load = result
        if expert_load is not None:
            self._expert_load = expert_load if self._expert_load is None else self._expert_load + expert_load
        return None if logits is None else logits.to(self.config.device)

    def take_expert_load(self) -> Optional[torch.Tensor]:
        """MoE: tokens routed to each expert of each MoE layer ([L, E] int64) by the calls
        since the last take (a step, or a failed step's rows run again one at a time); None
        for a dense model."""
        expert_load, self._expert_load = self._expert_load, None
        return expert_load

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.collective_rpc("kv_cache_spec")[0]

    def determine_available_memory(self, spec: KVCacheSpec) -> int:
        return min(self.collective_rpc("determine_available_memory", spec))

    def initialize_kv_cache(self, spec: KVCacheSpec, kv_cache_config: KVCacheConfig) -> None:
        self.collective_rpc("initialize_kv_cache", spec, kv_cache_config)

    def shutdown(self) -> None:
        """Stop the workers (nothing to do in-process)."""


def get_executor_cls(config: EngineConfig) -> type[Executor]:
    """Stage 08's switch: an in-process worker, one spawned process per tensor-parallel rank, or
    the ranks torchrun started (`distributed_executor_backend="external_launcher"`)."""
    if config.distributed_executor_backend == "external_launcher":
        from folovllm.executor.external_launcher import ExecutorWithExternalLauncher

        return ExecutorWithExternalLauncher
    if config.tensor_parallel_size == 1 and config.distributed_executor_backend != "mp":
        from folovllm.executor.uniproc_executor import UniProcExecutor

        return UniProcExecutor
    from folovllm.executor.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor
