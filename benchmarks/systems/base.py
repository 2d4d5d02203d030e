"""`System`: one thing the benchmarks time on a workload, and `BenchConfig`, what every system is
built with. The timing loop that drives them is `benchmarks.harness`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from benchmarks.workloads import Workload


@dataclass
class BenchConfig:
    """What every system is built with."""

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    max_num_seqs: int = 16
    seed: int = 0
    # Extra `EngineConfig` fields for every folovllm system (e.g. kv_cache_memory, block_size,
    # max_model_len); a system named `folovllm-stageN[key=value,...]` adds its own on top.
    engine_args: dict[str, Any] = field(default_factory=dict)


class System:
    """One thing to time. The harness calls `check()` and `load()` once, then per repeat
    `prepare(workload)` (untimed), `execute(prepared)` (timed), `stats(prepared)` and
    `trace(prepared)` (untimed), `release(prepared)` (untimed), and `close()` at the end.

    `execute` returns each request's output token ids, in workload order. A peer that lives in
    another process (real vLLM, in a venv of its own) does the same through that process: the
    harness only sees these methods.
    """

    name: str = "?"
    description: str = ""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg

    def check(self) -> None:
        """Raise ValueError if this system cannot run with `cfg`, before anything is loaded."""

    def load(self) -> None:
        """Untimed, once: load weights."""

    def prepare(self, workload: Workload) -> Any:
        raise NotImplementedError

    def execute(self, prepared: Any) -> list[list[int]]:
        raise NotImplementedError

    def stats(self, prepared: Any) -> dict[str, Any]:
        """Deterministic counters of the run that just finished (same on every repeat)."""
        return {}

    def trace(self, prepared: Any) -> Optional[dict[str, Any]]:
        """Per-step record of the run that just finished (for plots), if the system keeps one."""
        return None

    def release(self, prepared: Any) -> None:
        """Untimed clean-up after a run (e.g. stop a background thread)."""

    def close(self) -> None:
        pass
