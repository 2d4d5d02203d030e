"""pytest-benchmark: stage 03 (paged KV) vs stage 02 at one KV memory budget; stage 03's block size.

    pytest benchmarks/test_bench_03.py --benchmark-only                  # time them
    pytest benchmarks/test_bench_03.py --benchmark-disable               # smoke: run each once

Not part of the normal test run (pyproject's `testpaths` are `tests` and `stages`). Quick `mixed`
workload (16 requests, prompt 16..128, output 8..32), `max_model_len` 256 and a KV cache of
`KV_CACHE_MEMORY` = 4 full-length sequences (4 x 256 tokens x 16 KiB = 16 MiB) for both stages:
stage 02 cuts it into 4 slots of 256 tokens, stage 03 into blocks, so it runs more requests at
once. Group 1: stage 03 vs stage 02. Group 2: stage 03 with block sizes 8, 16, 32, 64.
`python -m benchmarks.run --stages 3 ...` is the full-size, reported benchmark (see README).

`extra_info` carries the deterministic counters: peak running requests, preemptions, KV
utilization (100% minus the KV waste).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import bench_model_path
from benchmarks.pytest_support import time_system
from benchmarks.systems import BenchConfig, systems_for_stages
from benchmarks.workloads import get_workload

STAGE = 3
ROUNDS = 3
MAX_NUM_SEQS = 16
MAX_MODEL_LEN = 256
KV_BYTES_PER_TOKEN = 16 * 1024  # bench model, float32: 2 x 8 layers x 4 kv heads x 64 x 4 bytes
KV_CACHE_MEMORY = 4 * MAX_MODEL_LEN * KV_BYTES_PER_TOKEN  # 16 MiB: 4 full-length sequences


@pytest.fixture(scope="module")
def setting():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable CPU numbers (DESIGN.md, Measuring)
    cfg = BenchConfig(model=str(bench_model_path()), device="cpu", dtype="float32", max_num_seqs=MAX_NUM_SEQS,
                      engine_args=dict(max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_CACHE_MEMORY))
    yield cfg, get_workload("mixed", vocab_size=512, quick=True)
    torch.set_num_threads(threads)


def run_benchmark(benchmark, cfg, workload, system_name, group):
    """`time_system` plus the paged-KV figures of this stage in the benchmark's extra info."""
    stats = time_system(benchmark, cfg, workload, system_name, group=group, rounds=ROUNDS)
    benchmark.extra_info.update(
        kv_cache_memory=KV_CACHE_MEMORY,
        max_num_running=stats["max_num_running"],
        num_preemptions=stats["num_preemptions"],
        kv_waste=round(1 - stats["kv_utilization"], 4),
    )
    return stats


@pytest.mark.parametrize("system_name", systems_for_stages([STAGE]))
def test_stage03_vs_stage02(benchmark, setting, system_name):
    cfg, workload = setting
    stats = run_benchmark(benchmark, cfg, workload, system_name,
                          f"stage03 vs stage02: mixed (quick, {len(workload)} requests), "
                          f"KV {KV_CACHE_MEMORY // 2**20} MiB")
    if system_name == "folovllm-stage2":
        assert stats["max_num_running"] <= 4  # 4 slots of max_model_len


@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
def test_stage03_block_size(benchmark, setting, block_size):
    cfg, workload = setting
    run_benchmark(benchmark, cfg, workload, f"folovllm-stage3[block_size={block_size}]",
                  f"stage03 block size: mixed (quick, {len(workload)} requests), KV {KV_CACHE_MEMORY // 2**20} MiB")
