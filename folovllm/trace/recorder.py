"""`StepTracer`: the engine's per-step records, kept so that they can be drawn.

The tracer is one subscriber of the record the engine publishes after every step
(`SchedulerStats`, engine/stats.py: the step's rows, who waits, who stalled, who was preempted
or finished, KV blocks in use, step times), as the server's metrics and the benchmarks are::

    tracer = StepTracer.attach(engine)      # engine.stat_loggers.append(tracer.record)
    ... engine.step() ...                   # every step appends its record to tracer.steps

It keeps the records as they come (one append per step: a benchmark keeps it on while it
times), and reads everything else from them afterwards: each request's state per step
(`request_lanes`, for the pictures in plot.py and the live page in page.py), a JSON file
(`save_json`) and a Chrome Trace Event file that https://ui.perfetto.dev opens
(`save_perfetto`: one track per request with waiting / prefill / decode / preempted slices,
counters for KV blocks and tokens per step; a MoE model's step also says which experts its
tokens went to, `expert_load_label`, and draws the experts it touched).

A running request that gets no row in a step is "stalled" (stages 02-04 never mix prompts and
decodes, so decodes wait while a prompt runs). A request admitted with `num_computed_tokens`
already cached found them in the prefix cache (stage 06: "hit N" in the lanes).

Left out: aborts (they happen between steps, outside `step()`, and show only as a request that
stops appearing), and the time a step spends waiting for requests in a server (a trace holds
steps, not idle time).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from folovllm.engine.stats import ExpertLoadStats, SchedulerStats

if TYPE_CHECKING:
    from folovllm.engine.llm_engine import LLMEngine

# The states of a request lane, in drawing order, and their colours: the same in the pictures
# (plot.py) and on the live page (page.py).
LANE_COLORS = {
    "waiting": "#d9d9d9",
    "prefill": "#1f5fa8",
    "chunk": "#8fb8e0",
    "decode": "#3a9a3a",
    "stalled": "#f5b041",
    "idle": "#a0a0a0",
    "preempted": "#d62728",
}
LANE_STATES = tuple(LANE_COLORS)


# --8<-- [start:step_tracer]
class StepTracer:
    """Keeps every `SchedulerStats` the engine publishes, in `steps`.

    Args:
        config: what the engine is (stage, sizes, KV blocks); `engine_summary(engine)`.
        max_steps: keep only the last `max_steps` records (a long-running server); None = all.
    """

    def __init__(self, config: dict[str, Any], max_steps: Optional[int] = None) -> None:
        self.config = config
        self.steps: deque[SchedulerStats] = deque(maxlen=max_steps)
        self.t0 = time.perf_counter()  # time zero of the exports

    @classmethod
    def attach(cls, engine: "LLMEngine", max_steps: Optional[int] = None) -> "StepTracer":
        """A tracer subscribed to `engine`'s per-step record, from its next step on."""
        tracer = cls(engine_summary(engine), max_steps)
        engine.stat_loggers.append(tracer.record)
        return tracer

    def record(self, step: SchedulerStats) -> None:
        self.steps.append(step)
# --8<-- [end:step_tracer]

    def clear(self) -> None:
        """Forget the steps so far and restart the clock (a benchmark's timed run starts here)."""
        self.steps.clear()
        self.t0 = time.perf_counter()

    # -- exports ------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        steps = []
        for s in self.steps:
            d = asdict(s)
            start, end = d.pop("start_time"), d.pop("end_time")
            steps.append({"step": d.pop("step"), "start_s": round(start - self.t0, 6),
                          "duration_s": round(end - start, 6), **d})
        return {"format": "folovllm-step-trace", "version": 2, "config": self.config, "steps": steps}

    def save_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=1))
        return path

    def perfetto_events(self) -> list[dict[str, Any]]:
        return perfetto_events(list(self.steps), self.config, self.t0)

    def save_perfetto(self, path: Union[str, Path]) -> Path:
        """A Trace Event file: open it at https://ui.perfetto.dev (or chrome://tracing)."""
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": self.perfetto_events(), "displayTimeUnit": "ms"}))
        return path


def engine_summary(engine: "LLMEngine") -> dict[str, Any]:
    """The engine's flags and sizes that a trace is read against (read once, when attaching)."""
    c, kv = engine.config, engine.kv_cache_manager.kv_cache_config
    return {"stage": c.stage, "engine": engine.description["summary"], "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens, "max_model_len": c.max_model_len,
            "block_size": kv.block_size, "num_blocks": kv.num_blocks}


def step_tokens(step: SchedulerStats) -> tuple[int, int]:
    """(prompt, decode) tokens the step's rows computed, padding left out (stage 01 pads)."""
    prompt = sum(r.num_new_tokens for r in step.rows if r.kind in ("prefill", "chunk"))
    return prompt, sum(r.num_new_tokens for r in step.rows if r.kind == "decode")


# -- request lanes ----------------------------------------------------------------------------

@dataclass
class Lane:
    """One request over the steps: its state in each step it existed, and its events."""

    request_id: str
    states: dict[int, str] = field(default_factory=dict)  # step -> one of LANE_STATES
    preempted_at: list[int] = field(default_factory=list)
    finished_at: Optional[int] = None
    finish_reason: Optional[str] = None
    cached_tokens: int = 0  # prefix hit when it was (last) admitted
    # stage 09: step -> (drafts verified, accepted) for the steps whose row carried drafts
    drafts: dict[int, tuple[int, int]] = field(default_factory=dict)


def request_lanes(steps: Iterable[SchedulerStats]) -> dict[str, Lane]:
    """Each request's state per step, in order of first appearance::

        step    1        2       3        4        5
        A       prefill  decode  (finished at 2)
        C       waiting  waiting prefill  decode   decode
                                          2/3      0/3      drafts accepted / verified (stage 09)

    A request waiting after a preemption is "preempted" until it runs again. A row of a request
    that held no seat in the step before was admitted in this step: what it had computed already
    came from the prefix cache (unknown for the first of `steps` unless it is the engine's first).
    """
    lanes: dict[str, Lane] = {}
    preempted: set[str] = set()
    seated: Optional[set[str]] = None  # ids with a row or stalled in the step before

    def lane(rid: str) -> Lane:
        return lanes.setdefault(rid, Lane(rid))

    for s in steps:
        if s.step == 1:
            seated = set()
        for rid in s.preempted:
            preempted.add(rid)
            lane(rid).preempted_at.append(s.step)
        for row in s.rows:
            ln = lane(row.request_id)
            ln.states[s.step] = row.kind
            if row.num_draft_tokens:
                ln.drafts[s.step] = (row.num_draft_tokens, row.num_accepted_tokens)
            preempted.discard(row.request_id)
            if seated is not None and row.request_id not in seated and row.num_computed_tokens:
                ln.cached_tokens = row.num_computed_tokens
        for rid in s.waiting:
            lane(rid).states[s.step] = "preempted" if rid in preempted else "waiting"
        for rid in s.stalled:
            lane(rid).states[s.step] = "stalled"
        for rid, reason in s.finished.items():
            lane(rid).finished_at, lane(rid).finish_reason = s.step, reason
        seated = {r.request_id for r in s.rows}.union(s.stalled)
    return lanes


# -- Perfetto / Chrome Trace Event format -----------------------------------------------------

_PID = 1


def perfetto_events(steps: list[SchedulerStats], config: dict[str, Any], t0: float) -> list[dict[str, Any]]:
    """The steps as Trace Events (JSON object format, microseconds since `t0`)::

        tid 0        "engine steps": one complete event ("X") per step, args = its rows
        tid 1..N     one track per request: "X" slices waiting / prefill / chunk / decode /
                     preempted (consecutive steps in one state merged), instant events ("i")
                     for "preempted" and "finished"
        counters     ("C") KV blocks in use, tokens per step (prefill / decode) and the budget,
                     requests running / waiting; with speculation (stage 09) drafts verified /
                     accepted per step, and each row's "drafts accepted/verified" in its args
    """
    def us(seconds: float) -> float:
        return round(seconds * 1e6, 1)

    def meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
        return {"ph": "M", "name": name, "pid": _PID, "tid": tid, "ts": 0, "args": args}

    events = [meta("process_name", 0, {"name": "folovllm engine"}),
              meta("thread_name", 0, {"name": "engine steps"}),
              meta("thread_sort_index", 0, {"sort_index": 0})]
    by_step = {s.step: s for s in steps}
    for s in steps:
        ts = us(s.start_time - t0)
        events.append({
            "ph": "X", "name": f"step {s.step}", "cat": "step", "pid": _PID, "tid": 0,
            "ts": ts, "dur": us(s.end_time - s.start_time),
            "args": {"rows": [f"{r.request_id}: {r.kind} {r.num_new_tokens}" + _drafts_note(r) for r in s.rows],
                     "waiting": s.waiting, "tokens": s.num_scheduled_tokens,
                     **({"experts": expert_load_label(s.expert_load)} if s.expert_load else {})},
        })
        prompt, decode = step_tokens(s)
        counters = [
            ("KV blocks in use", {"used": s.kv_blocks_used, "free": config["num_blocks"] - s.kv_blocks_used}),
            ("tokens per step", {"prefill": prompt, "decode": decode}),
            ("token budget", {"budget": config["max_num_batched_tokens"]}),
            ("requests", {"running": len(s.rows), "waiting": len(s.waiting)}),
        ]
        if s.expert_load is not None:  # MoE: what the step's experts read
            counters.append(("experts touched", {"mean per MoE layer": round(s.expert_load.mean_experts_touched, 2)}))
        if s.spec_decoding_stats is not None:  # stage 09
            counters.append(("speculative drafts", {
                "verified": sum(r.num_draft_tokens for r in s.rows),
                "accepted": sum(r.num_accepted_tokens for r in s.rows)}))
        for name, args in counters:
            events.append({"ph": "C", "name": name, "pid": _PID, "tid": 0, "ts": ts, "args": args})
    for tid, ln in enumerate(request_lanes(steps).values(), start=1):
        events += [meta("thread_name", tid, {"name": f"request {ln.request_id}"}),
                   meta("thread_sort_index", tid, {"sort_index": tid})]
        for state, first, last in _runs(ln.states):
            start, end = by_step[first].start_time, by_step[last].end_time
            args: dict[str, Any] = {"steps": f"{first}..{last}"}
            drafts = [f"step {n}: {a}/{d}" for n, (d, a) in ln.drafts.items() if first <= n <= last]
            if drafts:  # stage 09: each step's drafts accepted/verified
                args["drafts accepted/verified"] = drafts
            events.append({"ph": "X", "name": state, "cat": "request", "pid": _PID, "tid": tid,
                           "ts": us(start - t0), "dur": us(end - start), "args": args})
        marks = [(n, "preempted") for n in ln.preempted_at]
        if ln.finished_at is not None:
            marks.append((ln.finished_at, f"finished ({ln.finish_reason})"))
        for n, name in marks:
            events.append({"ph": "i", "s": "t", "name": name, "pid": _PID, "tid": tid,
                           "ts": us(by_step[n].end_time - t0)})
    return events


# --8<-- [start:expert_load_label]
def expert_load_label(load: ExpertLoadStats) -> str:
    """A MoE step in one line: experts touched per layer (mean of E) and the busiest experts'
    share, e.g. "touched 5.5/8 per layer; top experts e3 12, e0 9, e6 7 (of 48 routed)"."""
    counts = load.num_tokens_per_expert
    top = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
    busiest = ", ".join(f"e{e} {counts[e]}" for e in top if counts[e])
    return (f"touched {load.mean_experts_touched:.1f}/{len(counts)} per layer; top experts {busiest} "
            f"(of {sum(counts)} routed)")
# --8<-- [end:expert_load_label]


def _drafts_note(row: Any) -> str:
    """ ", drafts 2/3" (accepted/verified) for a row that verified drafts (stage 09)."""
    return f", drafts {row.num_accepted_tokens}/{row.num_draft_tokens}" if row.num_draft_tokens else ""


def _runs(states: dict[int, str]) -> list[tuple[str, int, int]]:
    """Consecutive steps in one state: {1: w, 2: w, 3: p, 5: d} -> [(w,1,2), (p,3,3), (d,5,5)]."""
    runs: list[tuple[str, int, int]] = []
    for step in sorted(states):
        state = states[step]
        if runs and runs[-1][0] == state and runs[-1][2] == step - 1:
            runs[-1] = (state, runs[-1][1], step)
        else:
            runs.append((state, step, step))
    return runs
