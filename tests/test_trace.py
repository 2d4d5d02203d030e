"""The step trace (folovllm/trace/): it must say exactly what the scheduler decided, step by step,
be nothing but a subscriber of the engine's per-step record, and export a Trace Event file
Perfetto can open."""

from __future__ import annotations

import json

import pytest

from folovllm import LLM, LLMEngine, SamplingParams
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.trace.recorder import StepTracer, request_lanes
from folovllm.trace.workloads import WORKLOADS, engine_config, replay


def traced(path, stage: int, workload: str, **overrides) -> tuple[StepTracer, dict, list[SchedulerOutput], list]:
    """Replay a named workload on a traced engine, spying on the scheduler's decisions too:
    returns the tracer, the output tokens, every SchedulerOutput and every preemption."""
    engine = LLMEngine(str(path), engine_config(str(path), stage, WORKLOADS[workload], dtype="float32", **overrides))
    tracer = StepTracer.attach(engine)
    decisions: list[SchedulerOutput] = []
    preemptions: list[tuple[int, str]] = []  # (step, request id), as the scheduler preempts
    schedule = engine.scheduler.schedule

    def spy() -> SchedulerOutput:
        out = schedule()
        if out.num_rows:
            decisions.append(out)
        return out

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    preempt = engine.scheduler.preempt

    def preempt_spy(request) -> None:
        preemptions.append((len(decisions) + 1, request.request_id))  # during this step's schedule()
        preempt(request)

    engine.scheduler.preempt = preempt_spy  # type: ignore[method-assign]
    return tracer, replay(engine, WORKLOADS[workload]), decisions, preemptions


def rows(step) -> list[tuple[str, str, int]]:
    return [(r.request_id, r.kind, r.num_new_tokens) for r in step.rows]


def assert_trace_is_the_schedule(steps, decisions: list[SchedulerOutput]) -> None:
    assert len(steps) == len(decisions)
    for step, out in zip(steps, decisions):
        assert [(r.request_id, r.num_computed_tokens, r.num_new_tokens, r.num_blocks) for r in step.rows] == [
            (q.request_id, c, n, len(t))
            for q, c, n, t in zip(out.requests, out.num_computed_tokens, out.num_new_tokens, out.block_tables)
        ]
        assert step.num_scheduled_tokens == out.total_num_scheduled_tokens


def test_stage02_docs_example_step_by_step(tiny_qwen3):
    """2/10/3 output tokens, two seats: C's prompt runs on step 3, right after A finishes."""
    tracer, _, decisions, _ = traced(tiny_qwen3, 2, "docs")
    steps = list(tracer.steps)
    assert_trace_is_the_schedule(steps, decisions)
    assert rows(steps[0]) == [("A", "prefill", 4), ("B", "prefill", 4)] and steps[0].waiting == ["C"]
    assert rows(steps[1]) == [("A", "decode", 1), ("B", "decode", 1)] and steps[1].finished == {"A": "length"}
    assert rows(steps[2]) == [("C", "prefill", 4)] and steps[2].stalled == ["B"]  # never mixed
    assert rows(steps[3]) == [("B", "decode", 1), ("C", "decode", 1)]
    assert len(steps) == 11 and steps[-1].finished == {"B": "length"}
    assert [s.kv_blocks_used for s in steps[:3]] == [2, 1, 2]  # stage 02: a block is a slot
    lanes = request_lanes(steps)
    assert lanes["C"].states == {1: "waiting", 2: "waiting", 3: "prefill", 4: "decode", 5: "decode"}
    assert lanes["B"].states[3] == "stalled"
    assert (lanes["A"].finished_at, lanes["C"].finished_at, lanes["B"].finished_at) == (2, 5, 11)


def test_stage05_prompt_in_chunks_while_others_decode(tiny_qwen3):
    tracer, _, decisions, _ = traced(tiny_qwen3, 5, "long-prompt")
    steps = list(tracer.steps)
    assert_trace_is_the_schedule(steps, decisions)
    d_steps = [s for s in steps if any(r.request_id == "D" and r.kind in ("chunk", "prefill") for r in s.rows)]
    kinds = [next(r.kind for r in s.rows if r.request_id == "D") for s in d_steps]
    assert len(d_steps) >= 3 and kinds == ["chunk"] * (len(kinds) - 1) + ["prefill"]
    assert sum(next(r.num_new_tokens for r in s.rows if r.request_id == "D") for s in d_steps) == 112
    for s in d_steps:  # every step of D's prompt also decodes A, B and C: nobody stalls
        assert {r.request_id for r in s.rows if r.kind == "decode"} == {"A", "B", "C"}
        assert s.stalled == [] and s.num_scheduled_tokens <= tracer.config["max_num_batched_tokens"] == 32


def test_stage03_preemption_and_resume(tiny_qwen3):
    tracer, tokens, decisions, preemptions = traced(tiny_qwen3, 3, "tight-kv")
    steps = list(tracer.steps)
    assert_trace_is_the_schedule(steps, decisions)
    preempted = [(s.step, rid) for s in steps for rid in s.preempted]
    assert preempted and preempted == preemptions
    lanes = request_lanes(steps)
    for step, rid in preempted:
        lane = lanes[rid]
        resumed = min(n for n, state in lane.states.items() if n > step and state != "preempted")
        assert all(lane.states[n] == "preempted" for n in range(step, resumed))
        first_row = next(r for s in steps if s.step == resumed for r in s.rows if r.request_id == rid)
        assert first_row.kind in ("prefill", "chunk") and first_row.num_computed_tokens == 0  # recomputed
    assert len(tokens) == len(WORKLOADS["tight-kv"].requests)  # every request finished
    assert all(s.kv_blocks_used <= tracer.config["num_blocks"] == 16 for s in steps)


def test_stage06_prefix_hits(tiny_qwen3):
    """Six prompts sharing 64 tokens (4 full blocks): every one after the first finds them cached."""
    tracer, _, decisions, _ = traced(tiny_qwen3, 6, "shared-prefix")
    steps = list(tracer.steps)
    assert_trace_is_the_schedule(steps, decisions)
    assert [request_lanes(steps)[r].cached_tokens for r in "ABCDEF"] == [0] + [64] * 5
    first_rows = {}
    for r in (r for s in steps for r in s.rows):
        first_rows.setdefault(r.request_id, r)
    assert [first_rows[r].num_computed_tokens for r in "ABCDEF"] == [0] + [64] * 5
    assert all(r.kind == "prefill" for r in first_rows.values())
    prompt_lens = sum(r.prompt_len for r in WORKLOADS["shared-prefix"].requests)
    assert sum(s.num_prefill_tokens for s in steps) == prompt_lens - 5 * 64


def test_tokens_identical_with_tracing_on_and_off(tiny_qwen3):
    """`LLM(trace=True)` subscribes one tracer to the engine's record; off, nothing subscribes."""
    prompts = [[3, 4, 5, 6, 7], list(range(10, 40)), [8, 9]]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 7, 20)]
    outs = {}
    for trace in (False, True):
        llm = LLM(str(tiny_qwen3), stage=5, dtype="float32", max_num_batched_tokens=16, trace=trace)
        outs[trace] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if trace:
            assert llm.llm_engine.stat_loggers == [llm.tracer.record]
            assert [s.step for s in llm.tracer.steps] == list(range(1, llm.stats.num_forward_passes + 1))
        else:
            assert llm.tracer is None and llm.llm_engine.stat_loggers == []
    assert outs[True] == outs[False]


def test_perfetto_file_follows_the_trace_event_format(tiny_qwen3, tmp_path):
    tracer, _, _, preemptions = traced(tiny_qwen3, 3, "tight-kv")
    data = json.loads(tracer.save_perfetto(tmp_path / "t.json").read_text())
    events = data["traceEvents"]
    for e in events:  # the format's required fields, and what each phase needs
        assert {"ph", "ts", "pid", "tid"} <= e.keys(), e
        assert e["ph"] in {"X", "i", "C", "M"} and isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["name"]
        if e["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in e["args"].values())
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"engine steps", "request A", "request F"} <= names
    slices = {e["name"] for e in events if e["ph"] == "X" and e.get("cat") == "request"}
    assert {"prefill", "decode", "preempted"} <= slices
    assert sum(e["name"] == "preempted" for e in events if e["ph"] == "i") == len(preemptions) > 0
    assert {"KV blocks in use", "tokens per step"} <= {e["name"] for e in events if e["ph"] == "C"}
    plain = json.loads(tracer.save_json(tmp_path / "t_plain.json").read_text())
    assert plain["config"]["stage"] == 3 and len(plain["steps"]) == len(tracer.steps)
    assert plain["steps"][0]["rows"][0].keys() >= {"request_id", "kind", "num_new_tokens"}


def test_cli_draws_the_pictures_and_saves_the_traces(tiny_qwen3, tmp_path):
    pytest.importorskip("matplotlib")
    from folovllm.entrypoints.cli import main

    out = tmp_path / "docs.png"
    assert main(["trace", "--model", str(tiny_qwen3), "--stages", "1", "2", "--workload", "docs",
                 "--out", str(out), "--save-traces", str(tmp_path)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stage2 = json.loads((tmp_path / "trace_docs_stage02.json").read_text())
    assert [r["request_id"] for r in stage2["steps"][2]["rows"]] == ["C"]
    assert (tmp_path / "trace_docs_stage01.perfetto.json").is_file()


def test_replay_adds_each_request_at_its_step_with_the_shared_prefix(tiny_qwen3):
    engine = LLMEngine(str(tiny_qwen3), engine_config(str(tiny_qwen3), 5, WORKLOADS["shared-prefix"], dtype="float32"))
    added = []  # (steps taken before it was added, prompt)
    add_request = engine.add_request

    def spy(rid, prompt, params):
        added.append((engine.stats.num_forward_passes, prompt))
        add_request(rid, prompt, params)

    engine.add_request = spy  # type: ignore[method-assign]
    replay(engine, WORKLOADS["shared-prefix"])
    workload = WORKLOADS["shared-prefix"].requests
    assert [n for n, _ in added] == [r.arrival_step - 1 for r in workload]
    assert [len(p) for _, p in added] == [r.prompt_len for r in workload]
    assert len({tuple(p[:64]) for _, p in added}) == 1 and len({tuple(p[64:]) for _, p in added}) == 6


def test_speculative_rows_carry_their_drafts_into_the_trace(tiny_qwen3):
    """Stage 09: each row's drafts verified and accepted (its `RowStats`) reach every view of the
    trace: the lanes, the pictures (an "accepted/verified" label in the cell), the Perfetto file
    (the step's rows, a counter, the request's slices) and the live page's snapshot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from folovllm.trace.page import LiveView
    from folovllm.trace.plot import _lanes
    from folovllm.trace.recorder import engine_summary

    llm = LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=256,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    tracer = StepTracer.attach(llm.llm_engine)
    view = LiveView(StepTracer(engine_summary(llm.llm_engine)))
    llm.llm_engine.stat_loggers.append(view.record)
    prompts = [[5, 6, 7, 8, 9, 10, 11] * 6, [20, 30, 40] * 10]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    expected = {(s.step, r.request_id): (r.num_draft_tokens, r.num_accepted_tokens)
                for s in tracer.steps for r in s.rows if r.num_draft_tokens}
    stats = llm.stats.spec_decoding
    assert sum(a for _, a in expected.values()) == stats.num_accepted_tokens > 0
    assert sum(d for d, _ in expected.values()) == stats.num_draft_tokens > stats.num_accepted_tokens

    lanes = request_lanes(tracer.steps)
    assert {(n, rid): c for rid, ln in lanes.items() for n, c in ln.drafts.items()} == expected

    fig, ax = plt.subplots()
    _lanes(ax, list(tracer.steps), tracer.config)
    labels = sorted(t.get_text() for t in ax.texts)
    plt.close(fig)
    assert labels == sorted(f"{a}/{d}" for d, a in expected.values())

    events = tracer.perfetto_events()
    rows = [row for e in events if e.get("cat") == "step" for row in e["args"]["rows"]]
    assert sorted(r for r in rows if ", drafts " in r) == sorted(
        f"{rid}: decode {1 + d}, drafts {a}/{d}" for (_, rid), (d, a) in expected.items())
    counters = [e["args"] for e in events if e["ph"] == "C" and e["name"] == "speculative drafts"]
    assert sum(c["verified"] for c in counters) == stats.num_draft_tokens
    assert sum(c["accepted"] for c in counters) == stats.num_accepted_tokens
    slices = [d for e in events if e.get("cat") == "request" for d in e["args"].get("drafts accepted/verified", [])]
    assert len(slices) == len(expected)

    snapshot = json.loads(view.snapshot)["timeline"]
    drawn = {(n, lane["id"]): tuple(c) for lane in snapshot["lanes"]
             for n, c in zip(snapshot["steps"], lane["drafts"]) if c}
    assert drawn == expected
