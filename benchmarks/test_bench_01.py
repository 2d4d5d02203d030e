"""pytest-benchmark: stage 01 (static batching) vs HF transformers `generate`, side by side.

    pytest benchmarks/test_bench_01.py --benchmark-only                  # time them
    pytest benchmarks/test_bench_01.py --benchmark-disable               # smoke: run each once

Not part of the normal test run: pyproject's `testpaths` are `tests` and `stages`. Uses the
`--quick` size of the `mixed` workload (16 requests, one static batch) so a round takes about a
second; `python -m benchmarks.run` is the full-size, reported benchmark. Both use the same
systems (`benchmarks.systems.SYSTEMS`), workload and model.

Each round builds the system's per-run state untimed (`pedantic`'s setup: a fresh folovllm
engine), then times `execute`: the generation of the whole workload. Both systems produce exactly
the same number of tokens (greedy, ignore_eos), so the ratio of their times is the ratio of their
throughputs. `extra_info` carries the output tokens and the deterministic engine stats.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import bench_model_path
from benchmarks.pytest_support import time_system
from benchmarks.systems import BenchConfig, systems_for_stages
from benchmarks.workloads import get_workload

STAGE = 1
WORKLOAD = "mixed"
ROUNDS = 3
MAX_NUM_SEQS = 16


@pytest.fixture(scope="module")
def setting():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable CPU numbers (DESIGN.md, Measuring)
    model = str(bench_model_path())
    cfg = BenchConfig(model=model, device="cpu", dtype="float32", max_num_seqs=MAX_NUM_SEQS)
    workload = get_workload(WORKLOAD, vocab_size=512, quick=True)
    yield cfg, workload
    torch.set_num_threads(threads)


@pytest.mark.parametrize("system_name", systems_for_stages([STAGE]))
def test_stage01_vs_peers(benchmark, setting, system_name):
    cfg, workload = setting
    time_system(benchmark, cfg, workload, system_name, rounds=ROUNDS,
                group=f"stage{STAGE:02d} vs peers: {WORKLOAD} (quick, {len(workload)} requests)")
