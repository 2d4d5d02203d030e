"""What a verify step costs (stage 09): a decode step of B rows of one token against a step of
B rows of 1 + k tokens (the last committed token and k drafts), by phase, on the bench model.

    python -m benchmarks.stage09_verify_cost                  # batch 1 and 8, k = 4
    python -m benchmarks.stage09_verify_cost --rows 1 --k 2 4 --steps 10

A verify row has more than one query, so the CPU attention backend computes it as it computes a
prompt chunk (the prefill kernel over the cached context) instead of the decode kernel. This
measures how much of the step that is: the CPU time (`time.process_time`, so other jobs on a
shared machine do not stretch it) inside the forwards of the attention layers, the linears and
the LM head, through forward hooks; `rest` is everything else (norms, rotary embedding,
residuals, the engine's Python, the sampler and the rejection sampler).

How: one engine per (rows, k), stage 06, greedy, `ignore_eos`; B requests of `--context` prompt
tokens are computed untimed; then `--steps` steps are timed. k = 0 is plain decoding. For k > 0 a proposer drafts k copies of the last token for
every request each step, so every step verifies exactly k drafts per row whatever the model
accepts (the drafts are almost always rejected: the cost of a step, not its gain).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from typing import Any, Iterator, Optional

from benchmarks.cli import bench_main
from benchmarks.harness import summarize, timed
from benchmarks.profile_step import model_path
from benchmarks.results import machine_short, shared_machine_note


class RepeatLastProposer:
    """Drafts `max_drafts` copies of each request's last token: a fixed number of drafts."""

    def propose(self, requests: Any, max_drafts: Any) -> list[list[int]]:
        return [[r.all_token_ids[-1]] * m for r, m in zip(requests, max_drafts)]

    def free(self, request_id: str) -> None:
        pass


@contextlib.contextmanager
def cpu_time_by_layer(model: Any) -> Iterator[dict[str, float]]:
    """CPU seconds (`time.process_time`: this process only, so other jobs on a shared machine do
    not stretch it) spent in the forwards of `model`'s attention layers, linears and LM head,
    summed while the context is open, through forward pre- and post-hooks removed on exit."""
    from folovllm.model_executor.layers.attention import Attention
    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    kinds = (("lm_head", ParallelLMHead), ("linear", LinearBase), ("attention", Attention))
    totals = {name: 0.0 for name, _ in kinds}
    starts: list[float] = []
    handles = []

    def leave(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            totals[name] += time.process_time() - starts.pop()
        return hook

    for module in model.modules():
        name = next((n for n, cls in kinds if isinstance(module, cls)), None)
        if name is not None:
            handles += [module.register_forward_pre_hook(lambda m, a: starts.append(time.process_time())),
                        module.register_forward_hook(leave(name))]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()


def measure(model: str, rows: int, k: int, context: int, steps: int) -> dict[str, Any]:
    from folovllm import LLM, SamplingParams

    spec = {"method": "ngram", "num_speculative_tokens": k} if k else None
    llm = LLM(model, stage=6, dtype="float32", max_num_seqs=max(rows, 1),
              max_model_len=-(-(context + (k + 1) * 2 * steps + 32) // 64) * 64, speculative_config=spec)
    engine = llm.llm_engine
    if k:
        engine.drafter.proposer = RepeatLastProposer()
    rng = random.Random(rows)
    params = SamplingParams(temperature=0.0, max_tokens=(k + 1) * 2 * steps + 16, ignore_eos=True)
    for i in range(rows):
        engine.add_request(str(i), [rng.randrange(3, 512) for _ in range(context)], params)
    while engine.stats.num_prompt_tokens_computed < rows * context:
        engine.step()
    engine.step()
    drafted = engine.stats.spec_decoding.num_draft_tokens if k else 0
    with cpu_time_by_layer(engine.model_runner.model) as layers:
        timing = summarize([timed(engine.step) for _ in range(steps)])
    drafted = (engine.stats.spec_decoding.num_draft_tokens if k else 0) - drafted
    step_ms = sum(timing["cpu_seconds"]) * 1e3 / steps
    phases = {name: round(seconds * 1e3 / steps, 3) for name, seconds in layers.items()}
    phases["rest"] = round(step_ms - sum(phases.values()), 3)  # norms, residuals, engine, sampler
    return dict(rows=rows, k=k, context=context, steps=steps, cpu_ms_per_step=round(step_ms, 3),
                median_cpu_ms_per_step=round(timing["median_cpu_seconds"] * 1e3, 3),
                loadavg_1m=timing["loadavg_1m"], phases_ms_per_step=phases,
                drafts_per_step=round(drafted / steps, 2))


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--k", type=int, nargs="+", default=[4], help="drafts per row (0, plain, is always run)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.rows, args.k, args.context, args.steps = [1], [2], 32, 2
    model = model_path("bench")
    results, loads = [], []
    for rows in args.rows:
        for k in [0, *[k for k in args.k if k]]:
            r = measure(model, rows, k, args.context, args.steps)
            results.append(r)
            loads += r.pop("loadavg_1m")
            print(f"rows {rows} k {k}: {r['cpu_ms_per_step']} ms CPU/step {r['phases_ms_per_step']}", flush=True)
    from benchmarks.harness import peak_loadavg

    return dict(results=results, peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    rs = result["results"]
    label = lambda r: f"{r['rows']} x {1 + r['k']}"  # noqa: E731
    lines = [f"A verify step against a decode step, bench model, float32, stage 06, context "
             f"{rs[0]['context']}: CPU ms per step by layer kind (mean of {rs[0]['steps']} steps); "
             f"columns are rows x tokens per row (x 1: plain decoding). {machine_short(result['machine'])}."
             + shared_machine_note(result, cpu_ratios=False)
             + " CPU time is this process's only, so other jobs do not stretch it.", "",
             "| CPU ms per step | " + " | ".join(label(r) for r in rs) + " |", "|:--|" + "--:|" * len(rs)]
    for phase in ("linear", "attention", "lm_head", "rest"):
        lines.append(f"| {phase} | " + " | ".join(f"{r['phases_ms_per_step'][phase]:.2f}" for r in rs) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['cpu_ms_per_step']:.2f}**" for r in rs) + " |")
    lines.append("| attention share of the step | " + " | ".join(
        f"{100 * r['phases_ms_per_step']['attention'] / r['cpu_ms_per_step']:.0f} %" for r in rs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage09_verify_cost", __doc__, argv, run, render_markdown, repeats=1,
               name="stage09_verify_cost_cpu", options=add_options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
