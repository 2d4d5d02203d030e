"""The host side of a decode step ("the Python floor"), split by phase: what the engine costs
besides the model's forward pass. Run through `profile_step`:

    python -m benchmarks.profile_step --host                     # tiny model, rows 1 8 16 64
    python -m benchmarks.profile_step --host --model bench       # forward heavier, excluded

How: a fresh engine per row count B gets B requests of `--context` prompt tokens; the prompts
and a few decode steps run untimed, then `--steps` decode steps are timed. Each phase is a
method of the engine's parts, wrapped for the timed steps only by an instance attribute
(removed afterwards; the classes are untouched) or, for the model, by forward hooks. A
phase's time is exclusive: CPU time (`time.process_time_ns`) inside it minus the phases it
calls::

    schedule        Scheduler.schedule
    input_batch     LLMEngine.make_input_batch            SchedulerOutput -> InputBatch (lists)
    prepare_inputs  InputBuffers.prepare_inputs           token ids, positions, logits indices,
                    (ModelRunner.prepare_inputs before)   the common attention metadata
    metadata        AttentionBackend.build_metadata       the backend's plan of the step
                    (ModelRunner.build_metadata before: the common metadata too)
    runner_other    the executor's and runner's glue      (execute_model minus the above)
    sample          LLMEngine._execute_and_sample         sampler, grammar, log-probs, LoRA slots
    update          Scheduler.update_from_output          tokens appended, stops checked
    output          OutputProcessor.process               detokenize, stop strings, outputs
    stats           LLMEngine._publish_stats              the step's record
    other           the step minus everything             free finished, drafts, glue
    forward         the model's forward and compute_logits  (not host: excluded from "host")

`host` is the step minus `forward`. The requests are greedy (`ignore_eos`) with the
`--output-kind` given (`delta`: a streaming server, every step detokenized; `final_only`: what
`LLM.generate` asks for, text decoded once at the end). Medians of the timed steps; the
1-minute load average is recorded beside them (the machine may be shared: CPU time is not
stretched by waiting for a core, but caches are).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

from benchmarks.harness import loadavg

HOST_PHASES = ("schedule", "input_batch", "prepare_inputs", "metadata", "runner_other", "sample",
               "update", "output", "stats", "other")


class PhaseClock:
    """Exclusive CPU time per phase: a span's time goes to its phase minus its child spans'."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [phase, start ns, ns spent in child spans]

    def enter(self, phase: str) -> None:
        self._stack.append([phase, time.process_time_ns(), 0])

    def leave(self) -> None:
        phase, start, children = self._stack.pop()
        total = time.process_time_ns() - start
        self.ns[phase] += total - children
        if self._stack:
            self._stack[-1][2] += total

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return timed

    def take(self) -> dict[str, int]:
        """The ns per phase since the last call, and reset."""
        ns, self.ns = dict(self.ns), defaultdict(int)
        return ns


@contextlib.contextmanager
def phase_spans(engine: Any, clock: PhaseClock) -> Iterator[None]:
    """Wrap the engine's phases (see the module docstring) for the duration of the block."""
    runner = engine.model_runner
    targets = [
        (engine.scheduler, "schedule", "schedule"),
        (engine, "make_input_batch", "input_batch"),
        (getattr(engine, "input_batch_sender", None), "make_message", "input_batch"),  # the diff
        (engine, "_execute_and_sample", "sample"),
        (engine.model_executor, "execute_model", "runner_other"),
        (runner, "prepare_inputs", "prepare_inputs"),  # the plain reference (before the buffers)
        (runner, "build_metadata", "metadata"),
        (getattr(runner, "input_buffers", None), "prepare_inputs", "prepare_inputs"),  # the bulk one
        (getattr(runner, "persistent_batch", None), "apply", "prepare_inputs"),  # the table's patch
        (getattr(runner, "input_buffers", None), "prepare_inputs_from_table", "prepare_inputs"),  # its gather
        (runner.attn_backend, "build_metadata", "metadata"),
        (runner.model, "compute_logits", "forward"),
        (engine.scheduler, "update_from_output", "update"),
        (engine.output_processor, "process", "output"),
        (engine, "_publish_stats", "stats"),
    ]
    wrapped = []
    for obj, attr, phase in targets:
        if obj is not None and hasattr(obj, attr):
            setattr(obj, attr, clock.wrap(getattr(obj, attr), phase))
            wrapped.append((obj, attr))
    hooks = [runner.model.register_forward_pre_hook(lambda module, args: clock.enter("forward")),
             runner.model.register_forward_hook(lambda module, args, output: clock.leave())]
    try:
        yield
    finally:
        for obj, attr in wrapped:
            delattr(obj, attr)  # the class's method shows through again
        for hook in hooks:
            hook.remove()


def measure_host(model: str, rows: int, context: int, steps: int, output_kind: str,
                 engine_args: dict[str, Any]) -> dict[str, Any]:
    """One engine, `rows` decoding requests: ms per decode step by phase (medians)."""
    from benchmarks.systems import BenchConfig
    from benchmarks.systems.folovllm import FolovllmSystem
    from folovllm import SamplingParams
    from folovllm.config import LATEST_STAGE
    from folovllm.sampling_params import RequestOutputKind

    warmup = 5
    # the first prompts decode while the last are computed (in chunks): room for those tokens
    prompt_steps = rows * context // 1024 + 8
    cfg = BenchConfig(model=model, dtype=engine_args.pop("dtype", "float32"), max_num_seqs=rows,
                      engine_args=dict(engine_args, max_model_len=-(-(context + 2 * steps + warmup + 16 + prompt_steps) // 64) * 64))
    engine = FolovllmSystem(cfg, LATEST_STAGE).build().llm_engine
    rng = random.Random(rows)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + warmup + 8 + prompt_steps, ignore_eos=True,
                            output_kind=RequestOutputKind[output_kind.upper()])
    for i in range(rows):
        engine.add_request(str(i), [rng.randrange(3, min(vocab, 512)) for _ in range(context)], params)
    while engine.stats.num_prompt_tokens_computed < rows * context:  # the prompts, untimed
        engine.step()
    for _ in range(warmup):
        engine.step()
    clock = PhaseClock()
    per_step: list[dict[str, int]] = []
    with phase_spans(engine, clock):
        for _ in range(steps):
            clock.enter("other")
            engine.step()
            clock.leave()
            per_step.append(clock.take())
    assert engine.last_scheduler_stats is not None and len(engine.last_scheduler_stats.rows) == rows
    untimed = []  # the same steps without the wrappers: what the clocks themselves cost
    for _ in range(steps):
        start = time.process_time_ns()
        engine.step()
        untimed.append(time.process_time_ns() - start)
    message_bytes = step_message_bytes(engine)
    engine.abort_requests([str(i) for i in range(rows)])

    def median_ms(values: list[int]) -> float:
        return round(statistics.median(values) / 1e6, 4)

    phases = {p: median_ms([s.get(p, 0) for s in per_step]) for p in (*HOST_PHASES, "forward")}
    host = [sum(v for k, v in s.items() if k != "forward") for s in per_step]
    return dict(kind="host", rows=rows, context=context, steps=steps, output_kind=output_kind,
                phases_ms_per_step=phases, host_ms_per_step=median_ms(host),
                step_ms_per_step=median_ms([sum(s.values()) for s in per_step]),
                untimed_step_ms=median_ms(untimed), loadavg=loadavg(), **message_bytes)


def step_message_bytes(engine: Any, steps: int = 3) -> dict[str, int]:
    """The bytes one decode step sends each tensor-parallel rank (`MultiprocExecutor` pickles
    `("execute_model", (message,))` once per rank), measured over a few more steps: what was
    sent (the whole `InputBatch`, or its diff with persistent_input_batch), and the whole batch
    for comparison. Deterministic: the same at any TP size and on any machine."""
    from folovllm.executor.multiproc_executor import dumps

    sender, sizes = engine.input_batch_sender, []

    def make_message(batch: Any, requests: Any) -> Any:
        message = type(sender).make_message(sender, batch, requests)
        sizes.append((len(dumps(("execute_model", (message,)))), len(dumps(("execute_model", (batch,))))))
        return message

    sender.make_message = make_message
    try:
        for _ in range(steps):
            engine.step()
    finally:
        del sender.make_message
    return dict(message_bytes_per_step=int(statistics.median(s for s, _ in sizes)),
                whole_batch_bytes_per_step=int(statistics.median(w for _, w in sizes)))


def render_host_markdown(result: dict[str, Any], caption: str) -> str:
    rs = result["results"]
    label = lambda r: f"{r['rows']} rows, {r['output_kind']}"  # noqa: E731
    lines = [caption, "", "| phase (ms per decode step) | " + " | ".join(label(r) for r in rs) + " |",
             "|:--|" + "--:|" * len(rs)]
    for phase in HOST_PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{r['phases_ms_per_step'][phase]:.3f}" for r in rs) + " |")
    lines.append("| **host (step minus forward)** | "
                 + " | ".join(f"**{r['host_ms_per_step']:.3f}**" for r in rs) + " |")
    lines.append("| forward (model + logits) | "
                 + " | ".join(f"{r['phases_ms_per_step']['forward']:.3f}" for r in rs) + " |")
    lines.append("| step, no phase clocks | " + " | ".join(f"{r['untimed_step_ms']:.3f}" for r in rs) + " |")
    lines.append("| 1-minute load | " + " | ".join(f"{r['loadavg']}" for r in rs) + " |")
    if all("message_bytes_per_step" in r for r in rs):
        lines.append("| bytes sent to each TP rank per step | "
                     + " | ".join(f"{r['message_bytes_per_step']:,}" for r in rs) + " |")
    return "\n".join(lines) + "\n"


def _command(result: dict[str, Any]) -> str:
    """The command without where it wrote its files."""
    import re

    return re.sub(r" --(out|name) \S+", "", result["command"])


def render_before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One table from two `profile_step --host` results files (the same command run at two
    commits, or at one commit with two engine settings): each phase before -> after, per case."""
    pairs = [(b, a) for b in before["results"] for a in after["results"]
             if (b["rows"], b["output_kind"]) == (a["rows"], a["output_kind"])]
    label = lambda r: f"{r['rows']} rows, {r['output_kind']}"  # noqa: E731
    loads = [r["loadavg"] for b, a in pairs for r in (b, a) if r["loadavg"] is not None]
    if before["git_commit"] == after["git_commit"]:  # one commit, two engine settings
        sides = (f"`{_command(before)}` -> `{_command(after)}` (commit {after['git_commit'][:7]}), "
                 f"model `{after['model']}`")
    else:
        sides = (f"before (commit {before['git_commit'][:7]}) -> after (commit {after['git_commit'][:7]}), "
                 f"model `{after['model']}`: `{_command(after)}` at each commit")
    lines = [f"The host side of one decode step by phase, {sides}, context "
             f"{after['results'][0]['context']}, median ms of process CPU time over "
             f"{after['results'][0]['steps']} steps; 1-minute "
             f"load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} on 2 cores.", "",
             "| ms per decode step | " + " | ".join(label(a) for _, a in pairs) + " |",
             "|:--|" + "--:|" * len(pairs)]

    def cell(b: float, a: float) -> str:
        return f"{b:.3f} → {a:.3f}"

    merged = lambda r: r["phases_ms_per_step"]["prepare_inputs"] + r["phases_ms_per_step"]["metadata"]  # noqa: E731
    for phase in HOST_PHASES:
        if phase == "metadata":
            continue
        name = "prepare_inputs + metadata" if phase == "prepare_inputs" else phase
        get = merged if phase == "prepare_inputs" else (lambda r, p=phase: r["phases_ms_per_step"][p])
        lines.append(f"| {name} | " + " | ".join(cell(get(b), get(a)) for b, a in pairs) + " |")
    lines.append("| **host (step minus forward)** | " + " | ".join(
        f"**{b['host_ms_per_step']:.3f} → {a['host_ms_per_step']:.3f}** "
        f"({b['host_ms_per_step'] / a['host_ms_per_step']:.2f}x)" for b, a in pairs) + " |")
    lines.append("| forward (model + logits) | " + " | ".join(
        cell(b["phases_ms_per_step"]["forward"], a["phases_ms_per_step"]["forward"]) for b, a in pairs) + " |")
    if all("message_bytes_per_step" in r for p in pairs for r in p):
        lines.append("| bytes sent to each TP rank per step | " + " | ".join(
            f"{b['message_bytes_per_step']:,} → {a['message_bytes_per_step']:,}" for b, a in pairs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """python -m benchmarks.host_phases BEFORE.json AFTER.json OUT.md"""
    import json
    import sys
    from pathlib import Path

    before, after, out = sys.argv[1:4]
    md = render_before_after(json.loads(Path(before).read_text()), json.loads(Path(after).read_text()))
    Path(out).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
