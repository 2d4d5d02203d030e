"""One benchmark runner for every stage: folovllm stages and their peers, side by side, in ONE
process, on one seeded workload, several repeats, medians and ratios.

    python -m benchmarks.run --stages 1 --workload mixed            # stage 01 vs HF generate
    python -m benchmarks.run --stages 1 2 --workload long_tail      # later: 02 vs 01 vs peers
    python -m benchmarks.run --stages 1 --quick                     # ~1 minute smoke run

Writes `<out>/<name>.json` (machine, config, every repeat's time, medians, engine stats) and
`<out>/<name>.md` (a one-line caption and a markdown table; the docs include it by snippet).

The offline-throughput benchmark (vLLM's `benchmark_throughput.py`); `benchmarks.latency` is the
online one (arrivals over time, vLLM's `benchmark_serving.py`). This file is the command line
and the table; the systems are `benchmarks.systems` (`--stages N` runs `folovllm-stageN` plus
`STAGE_PEERS[N]`), the timing loop is `benchmarks.harness` (an untimed warm-up per system, the
repeats interleaved, only the generation timed, `torch.set_num_threads(--threads)`, 1 by
default), the writer is `benchmarks.results`.

Tokens counted: every request produces exactly its own `max_tokens` (greedy, ignore_eos), on every
system, so output tok/s = sum(max_tokens) / seconds. A static batch that computes more rows (HF
generate runs every row of a batch to the batch's longest max_tokens) does not get credit for them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import compare_systems
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.systems import SYSTEMS, BenchConfig, parse_folovllm_name, systems_for_stages
from benchmarks.workloads import WORKLOADS, get_workload


# -- report -------------------------------------------------------------------------------------


def _fmt_int(x: Any) -> str:
    return "—" if x is None else f"{int(x):,}"


def render_table(result: dict[str, Any]) -> str:
    baseline = result["baseline"]
    rows = result["systems"]
    show_prev = any(r.get("ratio_vs_previous_stage") is not None for r in rows.values())
    # Stage 02+ (continuous batching, paged KV): how many run at once, preemptions, KV waste.
    show_kv = any((parse_folovllm_name(n) or (0,))[0] >= 2 for n in rows)
    repeats = result["config"]["repeats"]
    show_cpu = all("median_cpu_seconds" in r for r in rows.values())
    head = ["system", f"output tok/s (median of {repeats})", "total tok/s", f"× {baseline}"]
    if show_prev:
        head.append("× previous stage")
    head += ["time s (min–max)"] + (["CPU s"] if show_cpu else []) + ["forward passes", "prompt tokens computed",
             "wasted row steps", "KV util"]
    if show_kv:
        head += ["KV waste", "peak running", "preemptions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(
        [":--"] + ["--:"] * (len(head) - 1)) + "|"]
    for name, r in rows.items():
        st = r["stats"]
        kv = st.get("kv_utilization")
        cells = [f"`{name}`", f"{r['output_tok_s']:,.1f}", f"{r['total_tok_s']:,.1f}",
                 f"{r['ratio_vs_baseline']:.2f}"]
        if show_cpu:  # the same ratio in CPU time (not stretched by waiting for a core)
            base_cpu = rows[baseline]["median_cpu_seconds"]
            cells[-1] += f" (CPU {base_cpu / r['median_cpu_seconds']:.2f})"
        if show_prev:
            prev, prev_cpu = r.get("ratio_vs_previous_stage"), r.get("ratio_vs_previous_stage_cpu")
            cells.append("—" if prev is None else f"{prev:.2f}" + (
                "" if prev_cpu is None else f" (CPU {prev_cpu:.2f})"))
        cells.append(f"{r['median_seconds']:.2f} ({min(r['seconds']):.2f}–{max(r['seconds']):.2f})")
        if show_cpu:
            cells.append(f"{r['median_cpu_seconds']:.2f}")
        cells += [_fmt_int(st.get("num_forward_passes")), _fmt_int(st.get("num_prompt_tokens_computed")),
                  _fmt_int(st.get("num_wasted_row_steps")), "—" if kv is None else f"{kv:.1%}"]
        if show_kv:
            cells += ["—" if kv is None else f"{1 - kv:.1%}", _fmt_int(st.get("max_num_running")),
                      _fmt_int(st.get("num_preemptions"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(result: dict[str, Any]) -> str:
    w = result["workload"]
    stages = ", ".join(f"{s:02d}" for s in result["config"]["stages"]) or "-"
    caption = (
        f"Stage {stages} vs peers, workload `{w['name']}` ({w['num_requests']} requests, prompt "
        f"{w['prompt_len_min']}..{w['prompt_len_max']}, output {w['output_len_min']}.."
        f"{w['output_len_max']} tokens, "
        f"{'greedy' if not w['temperature'] else 'temperature ' + str(w['temperature'])}, "
        f"ignore_eos), model {result['model']['name']}, {result['config']['dtype']}, "
        f"batch {result['config']['max_num_seqs']}{_engine_args_text(result['config'])}: "
        f"`{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}."
    )
    return caption + shared_machine_note(result) + "\n\n" + render_table(result) + "\n"


def _engine_args_text(config: dict[str, Any]) -> str:
    args = config.get("engine_args") or {}
    parts = []
    if "max_model_len" in args:
        parts.append(f"max_model_len {args['max_model_len']}")
    if "kv_cache_memory" in args:
        b = args["kv_cache_memory"]
        parts.append(f"KV cache {b:,} bytes ({b / 2**20:g} MiB)")
    if "block_size" in args:
        parts.append(f"block size {args['block_size']}")
    return "".join(", " + p for p in parts)



# -- main ---------------------------------------------------------------------------------------


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, nargs="+", default=[1],
                   help="folovllm stages to run, each with its peers (STAGE_PEERS)")
    p.add_argument("--systems", nargs="+", default=None,
                   help=f"run exactly these systems instead (known: {', '.join(SYSTEMS)}, "
                        "folovllm-stageN[key=value,...])")
    p.add_argument("--no-peers", action="store_true", help="only the folovllm stages")
    p.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS))
    p.add_argument("--num-requests", type=int, default=None, help="override the workload's size")
    p.add_argument("--baseline", default=None, help="ratios are vs this system (default hf-generate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="folovllm max_model_len (default: the model's 2048 positions)")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="folovllm KV cache bytes, stage 02 slots and stage 03 blocks alike "
                        "(default: max_num_seqs full-length sequences)")
    p.add_argument("--block-size", type=int, default=None, help="folovllm stage 03 block size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench model)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = args.model or str(bench_model_path())
    model_info = bench_model_info(Path(model))
    names = args.systems or systems_for_stages(args.stages, with_peers=not args.no_peers)
    stages = sorted({int(m.group(1)) for n in names if (m := re.fullmatch(r"folovllm-stage(\d+)", n))})
    workload = get_workload(args.workload, vocab_size=model_info["vocab_size"], seed=args.seed,
                            quick=args.quick, num_requests=args.num_requests)
    max_len = args.max_model_len or model_info["max_position_embeddings"]
    if workload.max_seq_len > max_len:  # a request cut short would make the work unequal
        raise SystemExit(f"error: workload needs {workload.max_seq_len} positions; the model (or "
                         f"--max-model-len) allows {max_len}")
    engine_args = {k: v for k, v in dict(max_model_len=args.max_model_len,
                                          kv_cache_memory=args.kv_cache_memory,
                                          block_size=args.block_size).items() if v is not None}
    cfg = BenchConfig(model=model, device=args.device, dtype=args.dtype,
                      max_num_seqs=args.max_num_seqs, seed=args.seed, engine_args=engine_args)
    print(f"workload: {workload.summary()}\nsystems: {names}")
    result = dict(model=model_info, workload=workload.summary(),
                  config=dict(stages=stages, systems=names, workload=args.workload, quick=args.quick,
                              repeats=args.repeats, threads=args.threads, device=args.device,
                              dtype=args.dtype, max_num_seqs=args.max_num_seqs, seed=args.seed,
                              engine_args=engine_args))
    try:
        result.update(compare_systems(names, workload, cfg, args.repeats, args.baseline))
    except ValueError as e:  # e.g. a stage that is not built, or an axis asked for as a stage
        raise SystemExit(f"error: {e}")
    return result


def default_name(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """stage<NN[-NN]>_<workload>_<cpu|gpu>, after the stages asked for (`--stages 2` runs stage
    01 too, as a peer) or, with --systems, the plain stages among them."""
    named = result["config"]["stages"] if args.systems else sorted(set(args.stages))
    stages = "stage" + "-".join(f"{s:02d}" for s in named) if named else "peers"
    return f"{stages}_{args.workload}_{'gpu' if args.device.startswith('cuda') else 'cpu'}"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.run", __doc__, argv, run, render_markdown, name=default_name,
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
