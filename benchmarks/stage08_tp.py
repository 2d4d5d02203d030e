"""Stage 08 on CPU: tensor_parallel_size 1 against 2, one thread per rank, side by side.

    python -m benchmarks.stage08_tp             # full run (~5 minutes on a busy 2-core box)
    python -m benchmarks.stage08_tp --quick     # smoke run (4 requests, printed, not written)

On the bench model (`benchmarks.bench_model`: Qwen3 architecture, 8 layers, hidden 512, 8 query /
4 KV heads of 64, random weights), float32, stages 03-05 on: the registry entries
`folovllm-stage5[tensor_parallel_size=1|2]` (tensor parallelism is an axis on top of a stage,
`folovllm.config.AXES`), with the same `kv_cache_memory` per rank:

    memory     per-rank weight bytes (each rank's parameters, counted) and KV bytes per token
    capacity   tokens the KV cache holds with the same `kv_cache_memory` per rank
    throughput `get_workload("mixed", quick=True)`: 16 requests, greedy, ignore_eos, output tok/s,
               interleaved repeats after a warm-up (wall time: TP=2's work is in its worker
               processes, so the driver's CPU time says nothing)
    all-reduce bytes per rank, per step: computed as (2 * layers + 1) * T * hidden * 4 bytes for a
               step of T tokens (o_proj and down_proj in each layer, plus the embedding),
               summed over the workload's steps, against what `parallel_state` counted at the
               call sites; and the LM head's gather

This is a CPU with 2 cores shared with other work: it shows what tensor parallelism divides
(memory, per-rank compute) and what it adds (collectives, a process boundary), not the speed-up
a GPU node with NVLink gives. Writes `benchmarks/results/stage08_tp_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls, timed
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.systems import BenchConfig, make_system
from benchmarks.workloads import get_workload

SIZES = (1, 2)
KV_BUDGET_PER_RANK = 64 * 2**20  # bytes of KV cache per rank, the same for both


def build(model: str, tp: int) -> Any:
    cfg = BenchConfig(model=model, engine_args=dict(max_model_len=2048, kv_cache_memory=KV_BUDGET_PER_RANK))
    return make_system(f"folovllm-stage5[tensor_parallel_size={tp}]", cfg).build()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from folovllm import SamplingParams

    model = str(bench_model_path())
    info = bench_model_info(Path(model))
    L, H = info["num_hidden_layers"], info["hidden_size"]
    llms = {tp: build(model, tp) for tp in SIZES}
    try:
        memory = {}
        for tp, llm in llms.items():
            engine = llm.llm_engine
            executor = engine.model_executor
            spec = executor.kv_cache_spec()
            memory[tp] = dict(
                weight_bytes_per_rank=executor.collective_rpc("weight_bytes"),
                kv_bytes_per_token_per_rank=spec.bytes_per_token,
                kv_heads_per_rank=spec.num_kv_heads,
                kv_cache_memory_per_rank=KV_BUDGET_PER_RANK,
                kv_capacity_tokens=engine.kv_cache_capacity_tokens,
            )
            print(f"TP={tp}", memory[tp], flush=True)

        workload = get_workload("mixed", vocab_size=info["vocab_size"], seed=0, quick=True)
        if args.quick:
            workload = workload.head(4)
        prompts = [list(r.prompt_token_ids) for r in workload.requests]
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
                  for r in workload.requests]

        def generate(llm: Any) -> list[list[int]]:
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

        runs = time_calls({tp: (lambda llm=llm: generate(llm)) for tp, llm in llms.items()}, args.repeats)
        same = all(t.value == runs[1][0].value for ts in runs.values() for t in ts)
        throughput = {}
        for tp, ts in runs.items():
            s = summarize(ts)
            s["output_tok_s"] = workload.num_output_tokens / s["median_seconds"]
            throughput[tp] = s
            print(f"TP={tp}: {s['output_tok_s']:.1f} output tok/s", flush=True)

        # One more pass of the workload on TP=2 with the collectives counted (and timed: the
        # wall time a rank spends inside them, waiting for its peer included).
        engine = llms[2].llm_engine
        step_tokens: list[int] = []
        engine.stat_loggers.append(lambda st: step_tokens.append(st.num_scheduled_tokens))
        engine.model_executor.collective_rpc("comm_stats", True)
        pass_timing = timed(lambda: generate(llms[2]))
        counted = engine.model_executor.collective_rpc("comm_stats", True)
        engine.stat_loggers.pop()
        computed = [(2 * L + 1) * t * H * 4 for t in step_tokens]
        decode_16 = (2 * L + 1) * 16 * H * 4
        comm = dict(
            num_steps=len(step_tokens),
            all_reduce_calls_per_step_computed=2 * L + 1,
            all_reduce_calls_counted=[c.all_reduce_calls for c in counted],
            all_reduce_bytes_computed=sum(computed),
            all_reduce_bytes_counted=[c.all_reduce_bytes for c in counted],
            all_reduce_bytes_per_step_mean=sum(computed) / len(computed),
            all_reduce_bytes_decode_step_batch16=decode_16,
            gather_calls_counted=[c.gather_calls for c in counted],
            gather_bytes_counted=[c.gather_bytes for c in counted],
            collective_seconds=[round(c.all_reduce_seconds + c.gather_seconds, 3) for c in counted],
            pass_seconds=round(pass_timing.seconds, 3),
        )
        print(comm, flush=True)
        loads = [t.loadavg for ts in runs.values() for t in ts]
        return dict(model=info, memory=memory, workload=workload.summary(), throughput=throughput,
                    same_tokens=same, comm=comm, peak_loadavg_1m=peak_loadavg(loads))
    finally:
        for llm in llms.values():
            llm.llm_engine.shutdown()


def render_markdown(result: dict[str, Any]) -> str:
    m, t, c, w = result["memory"], result["throughput"], result["comm"], result["workload"]
    m = {int(k): v for k, v in m.items()}
    t = {int(k): v for k, v in t.items()}
    caption = (
        f"Tensor parallel 1 vs 2 ranks, one thread per rank, bench model (Qwen3, 8 layers, "
        f"hidden 512, 8/4 heads of 64, random weights), float32, stages 03-05 on, "
        f"{KV_BUDGET_PER_RANK // 2**20} MiB of KV cache per rank; throughput: median of "
        f"{result['repeats']} interleaved runs after a warm-up: `{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}."
    )
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [caption + shared_machine_note(result, cpu_ratios=False), "",
             "| | TP=1 | TP=2 | TP=2 / TP=1 |", "|:--|--:|--:|--:|"]

    def row(label: str, a: float, b: float, fmt: Any = str) -> None:
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {b / a:.2f} |")

    row("weights per rank", m[1]["weight_bytes_per_rank"][0], max(m[2]["weight_bytes_per_rank"]), mib)
    row("KV heads per rank", m[1]["kv_heads_per_rank"], m[2]["kv_heads_per_rank"])
    row("KV bytes per token per rank", m[1]["kv_bytes_per_token_per_rank"], m[2]["kv_bytes_per_token_per_rank"])
    row("tokens held at the same KV memory per rank", m[1]["kv_capacity_tokens"], m[2]["kv_capacity_tokens"])
    row(f"output tok/s, mixed: {w['num_requests']} requests, prompt {w['prompt_len_min']}.."
        f"{w['prompt_len_max']}, output {w['output_len_min']}..{w['output_len_max']}",
        t[1]["output_tok_s"], t[2]["output_tok_s"], lambda x: f"{x:.1f}")
    lines += [
        "",
        f"Same greedy tokens at TP=1 and TP=2: {'yes' if result['same_tokens'] else 'NO'}.",
        "",
        f"All-reduce traffic of TP=2 over the same workload ({c['num_steps']} steps), per rank: "
        f"{c['all_reduce_calls_per_step_computed']} all-reduces a step (2 per layer + the "
        f"embedding); computed {c['all_reduce_bytes_computed']:,} bytes "
        f"(mean {c['all_reduce_bytes_per_step_mean']:,.0f} a step; a decode step of 16 rows: "
        f"{c['all_reduce_bytes_decode_step_batch16']:,}), counted at the call sites "
        f"{', '.join(f'{b:,}' for b in c['all_reduce_bytes_counted'])} (rank 0, rank 1); LM head "
        f"gathers: {c['gather_calls_counted'][0]} calls, {c['gather_bytes_counted'][0]:,} bytes "
        f"sent per rank. Time inside the collectives (waiting for the other rank included): "
        f"{', '.join(f'{s:.2f} s' for s in c['collective_seconds'])} of a {c['pass_seconds']:.2f} s pass.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """--threads: this process (TP=1's rank); each TP=2 worker takes one thread whatever it is."""
    bench_main("benchmarks.stage08_tp", __doc__, argv, run, render_markdown, name="stage08_tp_cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
