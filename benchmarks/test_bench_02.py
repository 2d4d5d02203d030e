"""pytest-benchmark: stage 02 (continuous batching) vs stage 01 and the HF peers, side by side.

    pytest benchmarks/test_bench_02.py --benchmark-only                  # time them
    pytest benchmarks/test_bench_02.py --benchmark-disable               # smoke: run each once

Not part of the normal test run (pyproject's `testpaths` are `tests` and `stages`). Two quick
workloads, one group each: `mixed` (16 requests, outputs 8..32) and `long_tail` (10 requests, 90%
short outputs, 10% long). Systems: `folovllm-stage2`, `folovllm-stage1`, HF `generate` (static
batches) and HF's own continuous batching (`hf-generate-batch`, the manager behind
`generate_batch`, with a per-request max_new_tokens), from `benchmarks.systems.STAGE_PEERS[2]`.
`python -m benchmarks.run --stages 2 --workload mixed` is the full-size, reported benchmark.

Each round builds the system's per-run state untimed (a fresh folovllm engine, a fresh HF
manager), then times the generation of the whole workload. Every system produces exactly the
same tokens count (greedy, ignore_eos), so time ratios are throughput ratios.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import bench_model_path
from benchmarks.pytest_support import time_system
from benchmarks.systems import BenchConfig, systems_for_stages
from benchmarks.workloads import get_workload

STAGE = 2
ROUNDS = 3
MAX_NUM_SEQS = 16


@pytest.fixture(scope="module")
def cfg():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable CPU numbers (DESIGN.md, Measuring)
    yield BenchConfig(model=str(bench_model_path()), device="cpu", dtype="float32", max_num_seqs=MAX_NUM_SEQS)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("workload_name", ["mixed", "long_tail"])
@pytest.mark.parametrize("system_name", systems_for_stages([STAGE]))
def test_stage02_vs_peers(benchmark, cfg, workload_name, system_name):
    workload = get_workload(workload_name, vocab_size=512, quick=True)
    time_system(benchmark, cfg, workload, system_name, rounds=ROUNDS,
                group=f"stage{STAGE:02d} vs peers: {workload_name} (quick, {len(workload)} requests)")
