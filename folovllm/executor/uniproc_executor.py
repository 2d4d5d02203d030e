"""`UniProcExecutor`: the model in the engine's own process (tensor_parallel_size = 1).

It does nothing special: one `Worker`, called directly; its logits stay on the device for the
engine's sampler. This is the path every stage before 08 runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from folovllm.config import EngineConfig
from folovllm.executor.abstract import Executor
from folovllm.worker.model_runner import ModelRunner
from folovllm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, model_path: Path, hf_config: Any) -> None:
        super().__init__(config, model_path, hf_config)
        self.worker = Worker(config, model_path)

    @property
    def model_runner(self) -> ModelRunner:
        return self.worker.model_runner

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]
