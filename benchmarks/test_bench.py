"""pytest-benchmark: every built stage (01-06) against its peers (`STAGE_PEERS`), side by side.

    pytest benchmarks/test_bench.py --benchmark-only                    # time them all
    pytest benchmarks/test_bench.py -k stage03 --benchmark-only         # one stage's groups
    pytest benchmarks --benchmark-disable                               # smoke: each runs once, untimed

Not part of the normal test run (pyproject's `testpaths` are `tests` and `stages`); `python -m
benchmarks.run --stages N` is the full-size, reported benchmark, on the same systems, workloads
and model. One group per stage and quick workload (`WORKLOADS`): `folovllm-stageN` and
`systems_for_stages([N])`. Stage 03 runs at one KV budget, 4 full-length sequences (`KV_16MIB`:
stage 02 cuts it into 4 slots, stage 03 into blocks, so it runs more requests at once), plus a
group of its block sizes 8..64. Each round builds the system's per-run state untimed (a fresh
folovllm engine, a fresh HF manager), then times the generation of the whole workload
(`pytest_support.time_system`). Every system produces exactly each request's `max_tokens`
(greedy, ignore_eos), so time ratios are throughput ratios; `extra_info` carries the
deterministic engine stats.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import bench_model_path
from benchmarks.pytest_support import time_system
from benchmarks.systems import STAGE_PEERS, BenchConfig, systems_for_stages
from benchmarks.workloads import get_workload

ROUNDS = 3
MAX_MODEL_LEN = 256
KV_BYTES_PER_TOKEN = 16 * 1024  # bench model, float32: 2 x 8 layers x 4 kv heads x 64 x 4 bytes
KV_16MIB = dict(max_model_len=MAX_MODEL_LEN, kv_cache_memory=4 * MAX_MODEL_LEN * KV_BYTES_PER_TOKEN)
# stage -> the quick workloads that show its gain, and the engine arguments of all its systems
WORKLOADS = {1: ["mixed"], 2: ["mixed", "long_tail"], 3: ["mixed"], 4: ["mixed"], 5: ["long_prompts"],
             6: ["shared_prefix"]}
ENGINE_ARGS = {3: KV_16MIB}
CASES = [(stage, w, name) for stage in sorted(STAGE_PEERS) for w in WORKLOADS[stage]
         for name in systems_for_stages([stage])]
CASES += [(3, "mixed", f"folovllm-stage3[block_size={b}]") for b in (8, 32, 64)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable CPU numbers (DESIGN.md, Measuring)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stage,workload_name,system_name", CASES,
                         ids=[f"stage{s:02d}-{w}-{n}" for s, w, n in CASES])
def test_stage_vs_peers(benchmark, stage, workload_name, system_name):
    cfg = BenchConfig(model=str(bench_model_path()), engine_args=ENGINE_ARGS.get(stage, {}))
    workload = get_workload(workload_name, vocab_size=512, quick=True)
    kv = f", KV {cfg.engine_args['kv_cache_memory'] // 2**20} MiB" if "kv_cache_memory" in cfg.engine_args else ""
    stats = time_system(benchmark, cfg, workload, system_name, rounds=ROUNDS,
                        group=f"stage{stage:02d} vs peers: {workload_name} (quick, {len(workload)} requests){kv}")
    if stage == 3:
        benchmark.extra_info.update(kv_waste=round(1 - stats["kv_utilization"], 4))
        if system_name == "folovllm-stage2":
            assert stats["max_num_running"] <= 4  # 4 slots of max_model_len
