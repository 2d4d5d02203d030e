"""Executors: how the engine reaches the model (vLLM's `v1/executor/`).

    UniProcExecutor    tensor_parallel_size = 1: one `Worker` in the engine's own process
    MultiprocExecutor  tensor_parallel_size > 1: one worker process per rank (stage 08)
    ExecutorWithExternalLauncher  the ranks torchrun started, on one node or several; rank 0
                       runs the engine, the others `run_worker` (executor/external_launcher.py)

The engine only calls the `Executor` interface, so its step reads the same either way.
"""

from folovllm.executor.abstract import Executor, WorkerDiedError, get_executor_cls

__all__ = ["Executor", "WorkerDiedError", "get_executor_cls"]
