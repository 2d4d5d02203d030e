"""The one way the pytest-benchmark suites (`test_bench_0N.py`) time a system on a workload.

The rules of `benchmarks.harness`, with pytest-benchmark's clock and rounds: an untimed warm-up
(`harness.run_system` on the first prompts); each round builds the system's per-run state
untimed (a fresh folovllm engine, a fresh HF manager), then times the generation of the whole
workload with `benchmark.pedantic`. Every system produces exactly each request's `max_tokens`
(greedy, ignore_eos), which is asserted, so time ratios are throughput ratios. Returns the stats
of the last round.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import run_system, warmup_workload
from benchmarks.systems import BenchConfig, make_system
from benchmarks.workloads import Workload


def time_system(benchmark: Any, cfg: BenchConfig, workload: Workload, system_name: str,
                group: str, rounds: int = 3) -> dict[str, Any]:
    system = make_system(system_name, cfg)
    system.check()
    system.load()
    run_system(system, warmup_workload(workload, cfg.max_num_seqs))  # untimed warm-up
    benchmark.group = group
    benchmark.name = system_name
    prepared: list[Any] = []

    def setup() -> tuple[tuple[Any], dict]:
        prepared.append(system.prepare(workload))
        return (prepared[-1],), {}

    try:
        outputs = benchmark.pedantic(system.execute, setup=setup, rounds=rounds, iterations=1)
        assert [len(o) for o in outputs] == [r.max_tokens for r in workload.requests]
        stats = system.stats(prepared[-1])
        benchmark.extra_info.update(
            output_tokens=workload.num_output_tokens,
            prompt_tokens=workload.num_prompt_tokens,
            stats=stats,
        )
        return stats
    finally:
        for p in prepared:
            system.release(p)
        system.close()
