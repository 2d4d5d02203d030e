"""One observer channel: after every step the engine publishes one record (`SchedulerStats`,
engine/stats.py) to the subscribers in `LLMEngine.stat_loggers`: the server's metrics, the step
trace and the benchmarks all read that record, and the engine imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import folovllm
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.engine.llm_engine import LLMEngine
from folovllm.engine.stats import SchedulerStats
from folovllm.trace.workloads import WORKLOADS, engine_config, replay


@pytest.mark.parametrize("stage, workload", [(1, "mixed"), (3, "tight-kv"), (5, "long-prompt")])
def test_every_subscriber_gets_one_record_per_step(tiny_qwen3, stage, workload):
    engine = LLMEngine(str(tiny_qwen3), engine_config(str(tiny_qwen3), stage, WORKLOADS[workload], dtype="float32"))
    decisions: list[SchedulerOutput] = []  # every step's work, as the scheduler decided it
    preempted: list[list[str]] = []  # per step, whom the scheduler preempted
    schedule, preempt = engine.scheduler.schedule, getattr(engine.scheduler, "preempt", None)  # stage 01: none

    def schedule_spy() -> SchedulerOutput:
        preempted.append([])
        out = schedule()
        if out.num_rows:
            decisions.append(out)
        else:
            preempted.pop()
        return out

    def preempt_spy(request) -> None:
        preempted[-1].append(request.request_id)
        preempt(request)

    engine.scheduler.schedule = schedule_spy  # type: ignore[method-assign]
    if preempt is not None:
        engine.scheduler.preempt = preempt_spy  # type: ignore[method-assign]

    class Subscriber:  # an object with one method, as PrometheusMetrics and StepTracer are
        def __init__(self) -> None:
            self.records: list[SchedulerStats] = []

        def record(self, stats: SchedulerStats) -> None:
            self.records.append(stats)

    plain: list[SchedulerStats] = []  # and a plain callable
    subscriber = Subscriber()
    engine.stat_loggers += [plain.append, subscriber.record]
    replay(engine, WORKLOADS[workload])

    records = subscriber.records
    assert len(records) == len(decisions) == engine.stats.num_forward_passes > 0
    assert all(a is b for a, b in zip(plain, records))  # one record, shared
    assert [r.step for r in records] == list(range(1, len(records) + 1))
    assert [r.preempted for r in records] == preempted
    assert (sum(map(len, preempted)) > 0) == (workload == "tight-kv")
    for rec, out in zip(records, decisions):
        assert [(r.request_id, r.num_computed_tokens, r.num_new_tokens, r.num_blocks) for r in rec.rows] == [
            (q.request_id, c, n, len(t))
            for q, c, n, t in zip(out.requests, out.num_computed_tokens, out.num_new_tokens, out.block_tables)]
        # the rows' new tokens add up to the step's tokens; only stage 01 pads on top (its
        # prompts to the longest of the batch, and an idle row recomputes one token)
        padding = [out.query_len(i) - out.num_new_tokens[i] for i in range(out.num_rows)]
        assert sum(r.num_new_tokens for r in rec.rows) + sum(padding) == rec.num_scheduled_tokens
        assert (sum(padding) > 0) <= (stage == 1)
        prompt = [r.num_new_tokens + p for r, p in zip(rec.rows, padding) if r.kind in ("prefill", "chunk")]
        assert sum(prompt) == rec.num_prefill_tokens
        assert sum(r.kind in ("decode", "idle") for r in rec.rows) == rec.num_decode_tokens
        assert rec.num_generated_tokens == sum(r.kind in ("prefill", "decode") for r in rec.rows)
        assert rec.start_time <= rec.end_time
    kinds = {r.kind for rec in records for r in rec.rows}
    assert {"prefill", "decode"} <= kinds and ("chunk" in kinds) == (stage == 5) and ("idle" in kinds) == (stage == 1)
    finished = {rid: reason for rec in records for rid, reason in rec.finished.items()}
    assert finished == {rid: "length" for rid in finished} and len(finished) == len(WORKLOADS[workload].requests)
    # the engine's own totals are the same records added up
    assert engine.stats.num_generated_tokens == sum(r.num_generated_tokens for r in records)
    assert engine.stats.num_prompt_tokens_computed == sum(r.num_prefill_tokens for r in records)


def test_kv_usage_in_the_record_is_what_the_requests_hold(tiny_qwen3):
    """`kv_blocks_used` (from the KV manager, free of charge) = the distinct blocks in the block
    tables of the running requests, at every stage's manager (a stage-01 batch, stage 02's
    slots, stage 03's blocks, stage 06's shared blocks)."""
    for stage, workload in ((1, "mixed"), (2, "tight-kv"), (3, "tight-kv"), (6, "shared-prefix")):
        engine = LLMEngine(str(tiny_qwen3), engine_config(str(tiny_qwen3), stage, WORKLOADS[workload], dtype="float32"))
        held = []

        def check(stats: SchedulerStats) -> None:
            tables = [engine.kv_cache_manager.get_block_table(r) for r in engine.scheduler.running]
            held.append((stats.kv_blocks_used, len({b for t in tables for b in t}), sum(map(len, tables))))

        engine.stat_loggers.append(check)
        replay(engine, WORKLOADS[workload])
        assert all(used == distinct for used, distinct, _ in held), stage
        assert max(used for used, _, _ in held) > 1 and held[-1][0] == 0
        if stage == 6:  # shared blocks are counted once
            assert any(distinct < total for _, distinct, total in held)


def test_the_engine_imports_no_observer():
    """The engine package names no trace module (nor the server's): they subscribe to it."""
    engine_dir = Path(folovllm.__file__).parent / "engine"
    imported = set()
    for path in engine_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {(path.name, a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {(path.name, f"{node.module}.{a.name}") for a in node.names}
    assert ("llm_engine.py", "folovllm.engine.stats.SchedulerStats") in imported  # the scan sees imports
    offenders = [(f, m) for f, m in imported if m.startswith(("folovllm.trace", "folovllm.entrypoints"))
                 or f == "llm_engine.py" and m.startswith("folovllm.engine.metrics")]
    assert offenders == []
