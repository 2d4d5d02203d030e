"""Stage 04 end to end on CPU: the whole engine with `sdpa` attention (stage 04's CPU default)
against stage 03 (`naive` attention), side by side in one process, on one thread.

    python -m benchmarks.stage04_e2e                   # full run, ~10 minutes on a busy 2-core box
    python -m benchmarks.stage04_e2e --quick           # smoke run (short prompts, not written)

Two measurements, on the bench model (`benchmarks.bench_model`: Qwen3 architecture, 8 layers,
8 query / 4 KV heads of 64, random weights), float32:

    prefill N     one request of N random prompt tokens, `max_tokens=1` (so the time is one
                  prefill step plus sampling one token), N = 512, 1024, 2048
    mixed         `benchmarks.workloads.get_workload("mixed", ...)`, greedy, ignore_eos,
                  max_num_seqs 16, output tok/s: `quick=True` (16 requests, prompt 16..128,
                  output 8..32) and the full-size lengths cut to 16 requests (prompt 16..512,
                  output 8..256), where decodes attend over longer contexts

Each system is a registry entry (`folovllm-stage3`, `folovllm-stage4`: `LLM(model, stage=3 or 4,
dtype="float32", max_model_len=2048)`, `benchmarks.systems`), built once and reused: neither stage keeps state between requests (no prefix cache before stage 06), and
every KV block is back in the pool after each `generate`. One untimed warm-up per system and
measurement, then `--repeats` runs with the systems interleaved (3, 4, 3, 4, ...); medians of the
wall time and of the process CPU time (steadier when the machine is shared). The two systems must
produce the same tokens (greedy), which the script checks and records.

Writes `benchmarks/results/stage04_e2e_cpu.json` (machine, every repeat) and `.md` (a one-line
caption and the table).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.systems import BenchConfig, make_system
from benchmarks.workloads import FIRST_ORDINARY_TOKEN_ID, get_workload

SYSTEMS = ("folovllm-stage3", "folovllm-stage4")  # naive attention, sdpa
BASELINE = "folovllm-stage3"


def bench(calls: dict[str, Callable[[], list[list[int]]]], repeats: int, loads: list) -> dict[str, Any]:
    """`harness.time_calls`, and whether every repeat of every system gave the same tokens."""
    runs = time_calls(calls, repeats)
    for name, ts in runs.items():
        assert all(t.value == ts[0].value for t in ts), f"{name}: greedy tokens changed between repeats"
    loads += [t.loadavg for ts in runs.values() for t in ts]
    first = [ts[0].value for ts in runs.values()]
    return dict(systems={name: summarize(ts) for name, ts in runs.items()},
                same_tokens=all(v == first[0] for v in first))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from folovllm import SamplingParams

    model = str(bench_model_path())
    info = bench_model_info(Path(model))
    cfg = BenchConfig(model=model, engine_args=dict(max_model_len=2048))
    llms = {name: make_system(name, cfg).build() for name in SYSTEMS}
    backends = {name: llm.llm_engine.config.attention_backend for name, llm in llms.items()}
    loads: list = []

    def generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> list[list[int]]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    prefill: dict[str, Any] = {}
    rng = random.Random(0)
    for n in ((128, 256) if args.quick else (512, 1024, 2048)):
        prompt = [rng.randrange(FIRST_ORDINARY_TOKEN_ID, info["vocab_size"]) for _ in range(n)]
        params = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
        calls = {name: (lambda llm=llm, prompt=prompt, params=params:
                        generate(llm, [prompt], params))
                 for name, llm in llms.items()}
        prefill[f"prefill {n}"] = bench(calls, args.repeats, loads)
        print(f"prefill {n}", {k: f"{v['median_seconds'] * 1e3:.0f} ms"
                               for k, v in prefill[f"prefill {n}"]["systems"].items()}, flush=True)

    mixed: dict[str, Any] = {}
    sizes = [("mixed (quick)", True, None)] if args.quick else [
        ("mixed (quick)", True, None), ("mixed (16 requests)", False, 16)]
    for label, quick, num_requests in sizes:
        workload = get_workload("mixed", vocab_size=info["vocab_size"], seed=0, quick=quick,
                                num_requests=num_requests)
        if args.quick:
            workload = workload.head(4)
        prompts = [list(r.prompt_token_ids) for r in workload.requests]
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
                  for r in workload.requests]
        calls = {name: (lambda llm=llm, prompts=prompts, params=params:
                        generate(llm, prompts, params))
                 for name, llm in llms.items()}
        m = bench(calls, args.repeats, loads)
        for row in m["systems"].values():
            row["output_tok_s"] = workload.num_output_tokens / row["median_seconds"]
            row["output_tok_s_cpu"] = workload.num_output_tokens / row["median_cpu_seconds"]
        mixed[label] = dict(workload=workload.summary(), **m)
        print(label, {k: f"{v['output_tok_s']:.1f} tok/s" for k, v in m["systems"].items()},
              flush=True)

    return dict(model=info, attention_backends=backends, prefill=prefill, mixed=mixed,
                peak_loadavg_1m=peak_loadavg(loads))


def _ms(r: dict[str, Any]) -> str:
    return (f"{r['median_seconds'] * 1e3:.0f} ({min(r['seconds']) * 1e3:.0f}–"
            f"{max(r['seconds']) * 1e3:.0f})")


def render_markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    caption = (
        f"Stage 04 (`sdpa` attention) against stage 03 (`naive` attention), whole engine, bench "
        f"model (Qwen3, 8 layers, 8/4 heads of 64, random weights), float32; median of "
        f"{result['repeats']} interleaved runs after a warm-up: `{result['command']}` on "
        f"{machine_short(machine)}, {result['date'][:10]}."
    )
    lines = [caption + shared_machine_note(result), "",
             "| measurement | system | median (min–max) | CPU | × stage 03 | same tokens |",
             "|:--|:--|--:|--:|--:|:-:|"]

    def ratio(rows: dict[str, Any], name: str, key: str, inverse: bool) -> float:
        a, b = rows[BASELINE][key], rows[name][key]
        return b / a if inverse else a / b

    for label, m in result["prefill"].items():
        rows = m["systems"]
        for name, r in rows.items():
            lines.append(
                f"| {label} (one request, `max_tokens=1`) | {name} | {_ms(r)} ms "
                f"| {r['median_cpu_seconds'] * 1e3:.0f} ms "
                f"| {ratio(rows, name, 'median_seconds', False):.2f} "
                f"(CPU {ratio(rows, name, 'median_cpu_seconds', False):.2f}) "
                f"| {'yes' if m['same_tokens'] else 'NO'} |")
    for key, m in result["mixed"].items():
        w, rows = m["workload"], m["systems"]
        label = (f"{key}: {w['num_requests']} requests, prompt {w['prompt_len_min']}.."
                 f"{w['prompt_len_max']}, output {w['output_len_min']}..{w['output_len_max']} "
                 f"({w['num_output_tokens']} tokens), batch 16")
        for name, r in rows.items():
            lines.append(
                f"| {label} | {name} | {r['output_tok_s']:.1f} output tok/s "
                f"({r['median_seconds']:.2f} s) | {r['output_tok_s_cpu']:.1f} tok/s "
                f"| {ratio(rows, name, 'median_seconds', False):.2f} "
                f"(CPU {ratio(rows, name, 'median_cpu_seconds', False):.2f}) "
                f"| {'yes' if m['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage04_e2e", __doc__, argv, run, render_markdown, name="stage04_e2e_cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
