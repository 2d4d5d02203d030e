"""Stage 08 across "nodes": TP=2 launched by torchrun, one invocation (2 processes) against two
invocations (`--nnodes 2`, one process each), on the loopback; the all-reduce per step.

    python -m benchmarks.stage08_multinode           # both layouts (~2 minutes on a busy 2-core box)
    python -m benchmarks.stage08_multinode --quick   # fewer tokens, printed, not written

Each layout runs `--distributed-executor-backend external_launcher` on the bench model
(`benchmarks.bench_model`: Qwen3, 8 layers, hidden 512, random weights), float32, stage 5, one
thread per rank. Rank 0 drives the engine step by step and, after every step, reads each rank's
collective counters (`parallel_state.comm_stats`): all-reduce calls, payload bytes and seconds
spent inside them, for a prefill step (batch x 64 prompt tokens) and the decode steps that follow
(batch tokens), at batch 1 and 8. Greedy tokens are compared between the layouts.

What it shows: the bytes per step are the formula `(2 L + 1) x T x hidden x 4` whatever the
launch; the time differs only by what the transport does. On one machine both layouts use
gloo over the loopback TCP stack, so "two nodes" here measures the launcher's overhead, not a
network: the docs page turns the counted bytes into times for 25 and 100 Gb/s links.
Writes `benchmarks/results/stage08_multinode_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg
from benchmarks.results import machine_short, shared_machine_note

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"one torchrun, 2 processes": [["--nnodes", "1", "--nproc-per-node", "2"]],
           "two torchruns (--nnodes 2)": [["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i)]
                                          for i in (0, 1)]}
BATCHES = (1, 8)
PROMPT_LEN = 64


# -- inside torchrun: one rank ----------------------------------------------------------------


def rank_main(out: str, max_tokens: int) -> int:
    import torch

    from folovllm import SamplingParams
    from folovllm.config import EngineConfig
    from folovllm.engine.llm_engine import LLMEngine
    from folovllm.executor.external_launcher import TorchrunEnv, run_worker

    torch.set_num_threads(1)
    env = TorchrunEnv.from_environ()
    config = EngineConfig.for_stage(5, dtype="float32", tensor_parallel_size=env.world_size, max_model_len=1024,
                                    kv_cache_memory=64 * 2**20, distributed_executor_backend="external_launcher")
    if env.rank != 0:
        return run_worker(config, env)
    engine = LLMEngine(str(bench_model_path()), config)
    executor = engine.model_executor
    vocab = engine.vocab_size
    result: dict[str, Any] = {"batches": {}, "tokens": {}}
    try:
        for label, batch in (("warm-up", 1), *((str(b), b) for b in BATCHES)):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            for i in range(batch):
                engine.add_request(f"{label}-{i}", [3 + (7 * j + 13 * i) % (vocab - 3) for j in range(PROMPT_LEN)],
                                   params)
            executor.collective_rpc("comm_stats", True)
            steps, tokens = [], {}
            cpu0 = time.process_time()
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                outputs = engine.step()
                step_s = time.perf_counter() - start
                stats = executor.collective_rpc("comm_stats", True)  # every rank's, then reset
                steps.append(dict(step_s=step_s, calls=stats[0].all_reduce_calls, bytes=stats[0].all_reduce_bytes,
                                  all_reduce_s=[s.all_reduce_seconds for s in stats]))
                tokens.update({o.request_id: list(o.outputs[0].token_ids) for o in outputs if o.finished})
            if label != "warm-up":
                result["batches"][label] = dict(steps=steps, rank0_cpu_s=time.process_time() - cpu0)
                result["tokens"][label] = [tokens[k] for k in sorted(tokens)]
        result["ranks"] = [str(r) for r in executor.ranks]
    finally:
        engine.shutdown()
    Path(out).write_text(json.dumps(result))
    return 0


# -- the driver: launch each layout, side by side -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(layout: list[list[str]], max_tokens: int, timeout_s: float = 600) -> dict[str, Any]:
    """Run one layout's torchrun invocation(s) to the end; rank 0's record."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        start = time.perf_counter()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args, "--master-addr", "127.0.0.1",
             "--master-port", str(port), "-m", "benchmarks.stage08_multinode", "--rank-out", str(out),
             "--max-tokens", str(max_tokens)], env=env, cwd=ROOT, start_new_session=True)
            for args in layout]
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait(10)
        if any(codes):
            raise RuntimeError(f"torchrun exited with {codes}")
        record = json.loads(out.read_text())
        record["wall_s"] = time.perf_counter() - start
        return record


def summarize_steps(steps: list[dict[str, Any]], hidden: int) -> dict[str, Any]:
    """Medians over steps of one kind: tokens, all-reduce calls and bytes per rank, the step's
    time and the time inside the all-reduces (of the rank that waited least: closest to the
    transfer itself, without the wait for a slower peer)."""
    ar = [min(s["all_reduce_s"]) for s in steps]
    calls = steps[0]["calls"]
    return dict(num_steps=len(steps), tokens=steps[0]["bytes"] // calls // (hidden * 4), all_reduce_calls=calls,
                all_reduce_bytes=steps[0]["bytes"], step_ms=statistics.median(s["step_s"] for s in steps) * 1e3,
                all_reduce_ms=statistics.median(ar) * 1e3,
                all_reduce_us_per_call=statistics.median(ar) / calls * 1e6)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = bench_model_path()  # built here once, not by two ranks at the same time
    info = bench_model_info(model)
    max_tokens = 8 if args.quick else 48
    results: dict[str, Any] = {}
    loads = [loadavg()]
    for _ in range(args.repeats):  # the layouts alternate, repeat after repeat
        for name, layout in LAYOUTS.items():
            usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            record = launch(layout, max_tokens)
            usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            record["children_cpu_s"] = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
            results.setdefault(name, []).append(record)
            loads.append(loadavg())
            print(name, f"{record['wall_s']:.1f} s", flush=True)
    L, H = info["num_hidden_layers"], info["hidden_size"]
    table: dict[str, Any] = {}
    for name, records in results.items():
        per_batch = {}
        for batch in map(str, BATCHES):  # the first step is the prefill (64 x batch tokens), then decodes
            runs = [r["batches"][batch]["steps"] for r in records]
            per_batch[batch] = dict(prefill=summarize_steps([st[0] for st in runs], H),
                                    decode=summarize_steps([s for st in runs for s in st[1:]], H))
        table[name] = dict(per_batch=per_batch, ranks=records[0]["ranks"],
                           launch_wall_s=[round(r["wall_s"], 1) for r in records],
                           children_cpu_s=[round(r["children_cpu_s"], 1) for r in records])
    tokens = [r["tokens"] for rs in results.values() for r in rs]
    return dict(model=info, prompt_len=PROMPT_LEN, max_tokens=max_tokens, batches=list(BATCHES),
                layouts={k: v for k, v in LAYOUTS.items()}, table=table,
                same_tokens=all(t == tokens[0] for t in tokens),
                bytes_formula=f"(2 x {L} + 1) x T x {H} x 4", peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    caption = (f"TP=2 through torchrun (`--distributed-executor-backend external_launcher`), bench model "
               f"(Qwen3, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, random weights), float32, "
               f"stage 5, one thread per rank, gloo over the loopback; prompts of {result['prompt_len']} tokens, "
               f"{result['max_tokens']} output tokens; medians over {result['repeats']} launch(es) per layout, "
               f"alternating: `{result['command']}` on {machine_short(result['machine'])}, {result['date'][:10]}.")
    lines = [caption + shared_machine_note(result, cpu_ratios=False), "",
             "| layout | step | tokens | all-reduces | bytes per rank | step ms | in all-reduce ms | µs per all-reduce |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for name, row in result["table"].items():
        for batch in result["batches"]:
            for phase in ("prefill", "decode"):
                s = row["per_batch"][str(batch)][phase]
                lines.append(f"| {name} | {phase}, batch {batch} | {s['tokens']} | "
                             f"{s['all_reduce_calls']} | {s['all_reduce_bytes']:,} | {s['step_ms']:.1f} | "
                             f"{s['all_reduce_ms']:.2f} | {s['all_reduce_us_per_call']:.0f} |")
    launches = "; ".join(f"{name}: {', '.join(map(str, row['launch_wall_s']))} s wall, "
                         f"{', '.join(map(str, row['children_cpu_s']))} s CPU"
                         for name, row in result["table"].items())
    lines += ["", f"Bytes per step: `{result['bytes_formula']}` for a step of T tokens, counted at the call "
              "sites on every rank (payload handed to the all-reduce; a ring all-reduce at TP=2 sends as "
              "much per rank). \"in all-reduce\": the rank that waited least, so mostly the transfer. "
              f"Same greedy tokens in every launch: {'yes' if result['same_tokens'] else 'NO'}. "
              f"Launches (start-up included): {launches}."]
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)  # set on the ranks torchrun starts
    p.add_argument("--max-tokens", type=int, default=48, help=argparse.SUPPRESS)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    own, _ = parser.parse_known_args(argv)
    if own.rank_out:  # a rank under torchrun
        return rank_main(own.rank_out, own.max_tokens)
    bench_main("benchmarks.stage08_multinode", __doc__, argv, run, render_markdown,
               name="stage08_multinode_cpu", repeats=1, options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
