"""CPU cost of one decode step against the number of rows it decodes (stage 02 and stage 03).

    python -m benchmarks.step_cost                       # rows 1 2 4 8 16, context 256
    python -m benchmarks.step_cost --rows 4 12 --context 384 --no-write
    python -m benchmarks.step_cost --quick               # smoke run: rows 1 2, 2 steps, printed

Why: running more requests at once (continuous batching, paged KV) pays off when one step's cost
barely grows with its rows, i.e. when a step is bound by reading the weights (a GPU, or a CPU
with many threads). On one CPU thread the matmuls are compute-bound already at a few rows, so a
step of 12 rows costs about 3x a step of 4 rows and admitting more requests buys little
throughput. This measures it: for each row count B, a fresh engine prefills B prompts of
`--context` tokens (untimed), then runs `--steps` decode steps, each timed (`harness.timed`, medians by `harness.summarize`) in CPU time of the
process (`time.process_time`, not stretched by waiting for a core on a shared machine) and in
wall time. Reported: median CPU ms per step and per row (= per generated token).
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any, Optional

from benchmarks.bench_model import bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, summarize, timed
from benchmarks.results import machine_short
from benchmarks.systems import BenchConfig, make_system


def measure(model: str, stage: int, rows: int, context: int, steps: int, engine_args: dict[str, Any]) -> dict[str, Any]:
    from folovllm import SamplingParams

    cfg = BenchConfig(model=model, max_num_seqs=max(rows, 1), engine_args=engine_args)
    engine = make_system(f"folovllm-stage{stage}", cfg).build().llm_engine
    rng = random.Random(rows)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(rows):
        engine.add_request(str(i), [rng.randrange(3, 512) for _ in range(context)], params)
    while engine.stats.num_decode_row_steps == 0:  # prefill(s), then one decode step untimed
        engine.step()
    s = summarize([timed(engine.step) for _ in range(steps)])
    assert engine.stats.max_num_running == rows
    med = s["median_cpu_seconds"]
    return dict(stage=stage, rows=rows, context=context, steps=steps,
                cpu_ms_per_step=round(med * 1e3, 3), cpu_ms_per_row=round(med * 1e3 / rows, 3),
                wall_ms_per_step=round(s["median_seconds"] * 1e3, 3),
                cpu_ms=[round(x * 1e3, 3) for x in s["cpu_seconds"]], loadavg=loadavg())


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--context", type=int, default=256, help="prompt tokens of every row")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per row count")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.rows, args.context, args.steps = [1, 2], 32, 2
    model = str(bench_model_path())
    measure(model, args.stages[0], 2, 32, 2, {})  # warm-up
    results = []
    for rows in args.rows:  # stages interleaved per row count
        for stage in args.stages:
            r = measure(model, stage, rows, args.context, args.steps, {"max_model_len": 1024})
            results.append(r)
            print(f"stage {stage} rows {rows:2d}: {r['cpu_ms_per_step']:.1f} CPU ms/step, "
                  f"{r['cpu_ms_per_row']:.1f} CPU ms/row (wall {r['wall_ms_per_step']:.1f} ms, load {r['loadavg']})")
    config = {k: v for k, v in vars(args).items() if k not in ("render", "repeats")}
    return dict(config=config, results=results)


def render_markdown(result: dict[str, Any]) -> str:
    c, results, machine = result["config"], result["results"], result["machine"]
    rows = min(c["rows"])
    base = {r["stage"]: r for r in results if r["rows"] == rows}
    lines = ["| stage | rows | CPU ms / step (median) | CPU ms / row | step cost × " + f"{rows} row"
             + ("s" if rows != 1 else "") + " | wall ms / step |", "|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        lines.append(f"| {r['stage']:02d} | {r['rows']} | {r['cpu_ms_per_step']:.1f} | {r['cpu_ms_per_row']:.1f} | "
                     f"{r['cpu_ms_per_step'] / base[r['stage']]['cpu_ms_per_step']:.2f} | {r['wall_ms_per_step']:.1f} |")
    loads = [r["loadavg"] for r in results if r["loadavg"] is not None]
    caption = (f"CPU time of one decode step against the rows it decodes, every row with a context of "
               f"{c['context']} tokens, median of {c['steps']} steps, bench model, float32, max_model_len 1024 "
               f"(stage 02: contiguous slots, stage 03: paged, block size 16): `{result['command']}` on "
               f"{machine_short(machine)}, {result['date'][:10]}; 1-minute load average up to "
               f"{max(loads) if loads else '?'} on {machine['cpu_cores']} cores (CPU time is not "
               "stretched by waiting for a core).")
    return caption + "\n\n" + "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.step_cost", __doc__, argv, run, render_markdown,
               name="stage03_step_cost_cpu", options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
