"""`StepTracer`: what the scheduler decided in every engine step, kept so it can be drawn.

The engine calls its tracer twice per step, around the step's work::

    tracer.begin_step(scheduler)         # who waits, who runs (to see preemptions), start time
    schedule() -> execute_model() -> update -> outputs -> free finished -> stats
    tracer.end_step(engine, output)      # one `StepRecord`: rows, waiting, preempted, finished,
                                         # KV blocks in use, tokens against the budget, step time

With tracing off (`EngineConfig.trace=False`, the default) the engine holds a `NullTracer`, whose
two methods do nothing: no snapshot, no record, no `if trace:` in the step.

A step's record, for the stage 02 docs example (2/10/3 output tokens, two seats)::

    step  rows (request: kind new_tokens)     waiting  finished
    1     A: prefill 4   B: prefill 4         C
    2     A: decode 1    B: decode 1          C        A (length)
    3     C: prefill 4                                           <- C takes A's seat at once,
    4     B: decode 1    C: decode 1                                B is stalled for a step

A running request that gets no row in a step is "stalled" (stages 02-04 never mix prompts and
decodes, so decodes wait while a prompt runs). Row kinds: "prefill" computes the rest of a prompt (or a preempted request's recompute) and
samples; "chunk" computes part of a prompt and does not sample yet (stage 05); "decode" computes
one token past the prompt; "idle" is a finished member of a stage-01 static batch, computed for
nothing. `num_cached_tokens` is what a newly admitted request found in the cache (stage 06's
prefix hit; 0 before it).

Exports: `as_dict()` / `save_json()` (this record, plain JSON) and `perfetto_events()` /
`save_perfetto()` (the Chrome Trace Event format that https://ui.perfetto.dev opens: one track
per request with waiting / prefill / decode / preempted slices, counters for KV blocks and
tokens per step). `request_lanes()` turns the steps into each request's state per step, for the
pictures (`plot.py`) and the live page (`page.py`).

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
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:
    from folovllm.core.request import Request
    from folovllm.core.scheduler import SchedulerBase
    from folovllm.core.scheduler_output import SchedulerOutput
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


@dataclass
class TraceRow:
    """One row of one step: which request computed what."""

    request_id: str
    kind: str  # "prefill" | "chunk" | "decode" | "idle"
    num_computed_tokens: int  # cached before the step (position of the row's first token)
    num_new_tokens: int
    num_blocks: int  # blocks (stage 01/02: slots) the request holds during the step
    num_cached_tokens: int = 0  # admitted this step with this many tokens already cached
    recompute: bool = False  # prompt work of a request that was preempted before


@dataclass
class StepRecord:
    """One engine step. Times are seconds since the tracer was made."""

    step: int
    start_s: float
    duration_s: float
    rows: list[TraceRow]
    waiting: list[str]  # still waiting after the step
    stalled: list[str]  # running (holding KV) but given no row this step
    preempted: list[str]  # preempted during this step's scheduling
    finished: dict[str, str]  # request id -> finish reason
    num_scheduled_tokens: int  # padding included (stage 01)
    token_budget: int  # max_num_batched_tokens
    kv_blocks_used: int
    kv_num_blocks: int
    kv_block_size: int
    kv_tokens_reserved: int
    kv_tokens_used: int

    @property
    def num_prefill_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.rows if r.kind in ("prefill", "chunk"))

    @property
    def num_decode_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.rows if r.kind == "decode")


# --8<-- [start:null_tracer]
class NullTracer:
    """Tracing off: the same interface, nothing done, nothing kept."""

    __slots__ = ()
    steps: tuple[StepRecord, ...] = ()

    def begin_step(self, scheduler: "SchedulerBase") -> None:
        pass

    def end_step(self, engine: "LLMEngine", output: "SchedulerOutput") -> None:
        pass

    def as_dict(self, *args: Any) -> Any:
        raise ValueError("tracing is off: build the engine with trace=True (LLM(..., trace=True))")

    save_json = save_perfetto = perfetto_events = as_dict
# --8<-- [end:null_tracer]


class StepTracer:
    """Tracing on: one `StepRecord` per engine step.

    Args:
        max_steps: keep only the last `max_steps` records (a long-running server); None = all.
    """

    def __init__(self, max_steps: Optional[int] = None) -> None:
        self.steps: deque[StepRecord] = deque(maxlen=max_steps)
        # Called with each new record, on the engine's thread (the live page's snapshot).
        self.listeners: list[Callable[[StepRecord], None]] = []
        self.config: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._num_steps = 0
        self._start = self._t0
        self._waiting_before: set[str] = set()
        self._running_before: list[tuple["Request", int]] = []
        self._ever_preempted: set[str] = set()

    def begin_step(self, scheduler: "SchedulerBase") -> None:
        """Before `schedule()`: who is waiting (to spot admissions) and how often each running
        request was preempted so far (to spot preemptions without touching the scheduler)."""
        self._start = time.perf_counter()
        self._waiting_before = {r.request_id for r in scheduler.waiting}
        self._running_before = [(r, r.num_preemptions) for r in scheduler.running]

    def end_step(self, engine: "LLMEngine", output: "SchedulerOutput") -> None:
        """After the step's stats are recorded: turn the step into a `StepRecord`."""
        end = time.perf_counter()
        self._num_steps += 1
        if not self.config:
            self.config = _engine_config(engine)
        preempted = [r.request_id for r, n in self._running_before if r.num_preemptions > n]
        self._ever_preempted.update(preempted)
        rows, finished = [], {}
        scheduled = {r.request_id for r in output.requests}
        for i, request in enumerate(output.requests):
            rows.append(self._row(output, i, request))
            if output.num_new_tokens[i] > 0 and request.is_finished:
                finished[request.request_id] = request.status.finish_reason or "finished"
        self._ever_preempted -= finished.keys()  # a server's set stays small
        kv = engine.kv_cache_manager.kv_cache_config
        stats = engine.last_scheduler_stats
        self.steps.append(StepRecord(
            step=self._num_steps,
            start_s=self._start - self._t0,
            duration_s=end - self._start,
            rows=rows,
            waiting=[r.request_id for r in engine.scheduler.waiting],
            stalled=[r.request_id for r in engine.scheduler.running
                     if not r.is_finished and r.request_id not in scheduled],
            preempted=preempted,
            finished=finished,
            num_scheduled_tokens=output.total_num_scheduled_tokens,
            token_budget=engine.config.max_num_batched_tokens,
            kv_blocks_used=len({b for r in engine.scheduler.running  # a shared block once
                                for b in engine.kv_cache_manager.get_block_table(r)}),
            kv_num_blocks=kv.num_blocks,
            kv_block_size=kv.block_size,
            kv_tokens_reserved=stats.kv_tokens_reserved,
            kv_tokens_used=stats.kv_tokens_used,
        ))
        for listener in self.listeners:
            listener(self.steps[-1])

    def _row(self, output: "SchedulerOutput", i: int, request: "Request") -> TraceRow:
        new, computed = output.num_new_tokens[i], output.num_computed_tokens[i]
        # Read after the step: a row that caught up has sampled, so its request is one token
        # longer than what the row computed (`output.catches_up` was true before the update).
        sampled = request.num_tokens == computed + new + 1
        if new == 0:
            kind = "idle"
        elif output.is_decode(i):
            kind = "decode"
        else:
            kind = "prefill" if sampled else "chunk"
        admitted = request.request_id in self._waiting_before
        return TraceRow(
            request_id=request.request_id,
            kind=kind,
            num_computed_tokens=computed,
            num_new_tokens=new,
            num_blocks=len(output.block_tables[i]),
            num_cached_tokens=computed if admitted else 0,
            recompute=kind in ("prefill", "chunk") and request.request_id in self._ever_preempted,
        )

    # -- exports ------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {"format": "folovllm-step-trace", "version": 1, "config": self.config,
                "steps": [asdict(s) for s in self.steps]}

    def save_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=1))
        return path

    def perfetto_events(self) -> list[dict[str, Any]]:
        return perfetto_events(list(self.steps))

    def save_perfetto(self, path: Union[str, Path]) -> Path:
        """A Trace Event file: open it at https://ui.perfetto.dev (or chrome://tracing)."""
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": self.perfetto_events(), "displayTimeUnit": "ms"}))
        return path


def _engine_config(engine: "LLMEngine") -> dict[str, Any]:
    c = engine.config
    return {"stage": c.stage, "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens, "max_model_len": c.max_model_len,
            "block_size": engine.kv_cache_manager.kv_cache_config.block_size,
            "num_blocks": engine.kv_cache_manager.kv_cache_config.num_blocks}


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


def request_lanes(steps: list[StepRecord]) -> dict[str, Lane]:
    """Each request's state per step, in order of first appearance::

        step    1        2       3        4        5
        A       prefill  decode  (finished at 2)
        C       waiting  waiting prefill  decode   decode

    A request waiting after a preemption is "preempted" until it runs again.
    """
    lanes: dict[str, Lane] = {}
    preempted: set[str] = set()

    def lane(rid: str) -> Lane:
        return lanes.setdefault(rid, Lane(rid))

    for s in steps:
        for rid in s.preempted:
            preempted.add(rid)
            lane(rid).preempted_at.append(s.step)
        for row in s.rows:
            ln = lane(row.request_id)
            ln.states[s.step] = row.kind
            preempted.discard(row.request_id)
            if row.num_cached_tokens:
                ln.cached_tokens = row.num_cached_tokens
        for rid in s.waiting:
            lane(rid).states[s.step] = "preempted" if rid in preempted else "waiting"
        for rid in s.stalled:
            lane(rid).states[s.step] = "stalled"
        for rid, reason in s.finished.items():
            lane(rid).finished_at, lane(rid).finish_reason = s.step, reason
    return lanes


# -- Perfetto / Chrome Trace Event format -----------------------------------------------------

_PID = 1


def perfetto_events(steps: list[StepRecord]) -> list[dict[str, Any]]:
    """The steps as Trace Events (JSON object format, times in microseconds)::

        tid 0        "engine steps": one complete event ("X") per step, args = its rows
        tid 1..N     one track per request: "X" slices waiting / prefill / chunk / decode /
                     preempted (consecutive steps in one state merged), instant events ("i")
                     for "preempted" and "finished"
        counters     ("C") KV blocks in use, tokens per step (prefill / decode) and the budget,
                     requests running / waiting
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
        events.append({
            "ph": "X", "name": f"step {s.step}", "cat": "step", "pid": _PID, "tid": 0,
            "ts": us(s.start_s), "dur": us(s.duration_s),
            "args": {"rows": [f"{r.request_id}: {r.kind} {r.num_new_tokens}" for r in s.rows],
                     "waiting": s.waiting, "tokens": s.num_scheduled_tokens},
        })
        ts = us(s.start_s)
        for name, args in (
            ("KV blocks in use", {"used": s.kv_blocks_used, "free": s.kv_num_blocks - s.kv_blocks_used}),
            ("tokens per step", {"prefill": s.num_prefill_tokens, "decode": s.num_decode_tokens}),
            ("token budget", {"budget": s.token_budget}),
            ("requests", {"running": len(s.rows), "waiting": len(s.waiting)}),
        ):
            events.append({"ph": "C", "name": name, "pid": _PID, "tid": 0, "ts": ts, "args": args})
    for tid, ln in enumerate(request_lanes(steps).values(), start=1):
        events += [meta("thread_name", tid, {"name": f"request {ln.request_id}"}),
                   meta("thread_sort_index", tid, {"sort_index": tid})]
        for state, first, last in _runs(ln.states):
            start, end = by_step[first].start_s, by_step[last].start_s + by_step[last].duration_s
            events.append({"ph": "X", "name": state, "cat": "request", "pid": _PID, "tid": tid,
                           "ts": us(start), "dur": us(end - start),
                           "args": {"steps": f"{first}..{last}"}})
        marks = [(n, "preempted") for n in ln.preempted_at]
        if ln.finished_at is not None:
            marks.append((ln.finished_at, f"finished ({ln.finish_reason})"))
        for n, name in marks:
            s = by_step[n]
            events.append({"ph": "i", "s": "t", "name": name, "pid": _PID, "tid": tid,
                           "ts": us(s.start_s + s.duration_s)})
    return events


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
