"""Serving benchmark, in the spirit of vLLM's `benchmark_serving`: Poisson arrivals against a real
`folovllm serve` process, measured by the client.

    python -m benchmarks.serving --stages 2 3 4 --rates 1 2 4 --num-requests 32
    python -m benchmarks.serving --quick      # smoke run: stage 02, 2 requests at once, printed

For each stage: start `folovllm serve` on the bench model (float32, one torch thread, a free
port), warm it up with two requests, then for each rate replay the same seeded workload
(`benchmarks.workloads`, `mixed` in its quick shape: prompts 16..128 tokens, outputs 8..32)
with arrival times from `poisson_arrivals(n, rate, seed)`. Each request is sent at its arrival
time by the official `openai` async client: token ids as the prompt, greedy, ignore_eos,
streamed with usage. Per request, on the client: TTFT (sent -> first chunk with text),
inter-token latencies (gaps between chunks; a chunk is one step's new text, so usually one
token), end-to-end latency. Throughput: output tokens (from `usage`) over the time from the
first send to the last answer. Then the server gets SIGTERM and must exit with status 0.

The client runs on the same machine as the server and shares its cores; on a 2-core machine
its share is visible in the figures, equally for every stage. The vLLM peer (`vllm serve` from
its own venv) is not run: the CPU build is not installed on this machine.

Writes `<out>/serving_cpu.json` (every request's timings) and `<out>/serving_cpu.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Optional, Sequence

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg
from benchmarks.latency import percentile
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.workloads import Workload, get_workload, poisson_arrivals

MODEL_NAME = "bench"
REPO_ROOT = Path(__file__).resolve().parent.parent


def start_server(model: Path, stage: int, max_num_seqs: int, log: IO[str],
                 extra_args: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 cwd: Path = REPO_ROOT) -> tuple[subprocess.Popen, str]:
    """`folovllm serve` on a free port, float32, one thread; its output goes to `log`, a file:
    a pipe nobody reads would fill with the server's INFO lines and stall it. `cwd` (with
    PYTHONPATH in `env`) serves another checkout's code: a `git worktree` of an older commit."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "folovllm.entrypoints.cli", "serve", str(model), "--stage", str(stage),
           "--dtype", "float32", "--threads", "1", "--max-num-seqs", str(max_num_seqs),
           "--port", str(port), "--served-model-name", MODEL_NAME, *extra_args]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=None if env is None else {**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (log: {log.name})")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not answer /health within 300 s")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def one_request(client: Any, prompt: list[int], max_tokens: int, delay: float,
                      t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    chunk_times: list[float] = []
    num_tokens = 0
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunk_times.append(time.perf_counter())
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    return {"sent": sent - t0, "ttft": chunk_times[0] - sent if chunk_times else None,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])], "e2e": done - sent,
            "finished": done - t0, "output_tokens": num_tokens}


async def replay(base: str, workload: Workload, arrivals: list[float]) -> list[dict[str, Any]]:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                  timeout=600) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(
            one_request(client, r.prompt_token_ids, r.max_tokens, arrivals[i], t0)
            for i, r in enumerate(workload.requests)))


def summarize(records: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    itl = [x for r in records for x in r["itl"]]
    e2e = [r["e2e"] for r in records]
    span = max(r["finished"] for r in records) - min(r["sent"] for r in records)
    out_tokens = sum(r["output_tokens"] for r in records)
    return {
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99),
        "output_tok_s": out_tokens / span, "requests_s": len(records) / span,
        "output_tokens": out_tokens,
    }


def render(result: dict[str, Any]) -> str:
    w = result["workload"]
    lines = [
        f"Serving benchmark: `{result['command']}` on {machine_short(result['machine'])}, "
        f"{result['date'][:10]}, commit {result['git_commit'] or '?'}; "
        f"workload `{w['name']}` ({w['num_requests']} requests, {w['description']}, greedy, "
        f"ignore_eos), Poisson arrivals (seed {result['seed']}), model {result['model']['name']}, "
        f"float32, one torch thread, max_num_seqs {result['max_num_seqs']}; the `openai` client streams every "
        f"request on the same machine. Latencies in seconds; load average before each run in "
        f"the last column.{shared_machine_note(result, cpu_ratios=False)}",
        "",
        "| stage | rate (req/s) | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 "
        "| output tok/s | requests/s | load |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def f(x: Optional[float], digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for run in result["runs"]:
        s = run["summary"]
        rate = "inf" if math.isinf(run["rate"]) else f"{run['rate']:g}"
        lines.append(
            f"| {run['stage']:02d} | {rate} | {f(s['ttft_p50'])} | {f(s['ttft_p99'])} | "
            f"{f(s['itl_p50'])} | {f(s['itl_p99'])} | {f(s['e2e_p50'], 2)} | {f(s['e2e_p99'], 2)} | "
            f"{f(s['output_tok_s'], 1)} | {f(s['requests_s'], 2)} | {f(run['loadavg'], 1)} |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="requests per second (inf = all at once)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.stages, args.rates, args.num_requests = [2], [math.inf], 2
    model = bench_model_path()
    info = bench_model_info(model)
    workload = get_workload("mixed", info["vocab_size"], seed=args.seed, quick=True,
                            num_requests=args.num_requests)
    warmup = workload.requests[:2]
    runs = []
    for stage in args.stages:
        log = tempfile.NamedTemporaryFile("w+", prefix="serving_", suffix=".log")
        proc, base = start_server(model, stage, args.max_num_seqs, log,
                                  ["--max-model-len", str(args.max_model_len)])
        try:
            asyncio.run(replay(base, Workload("warmup", "", warmup, args.seed), [0.0] * len(warmup)))
            for rate in args.rates:
                load = loadavg()
                arrivals = poisson_arrivals(len(workload), rate, seed=args.seed)
                records = asyncio.run(replay(base, workload, arrivals))
                summary = summarize(records)
                print(f"stage {stage} rate {rate:g}: {summary}", file=sys.stderr)
                runs.append({"stage": stage, "rate": rate, "loadavg": load, "summary": summary,
                             "requests": records})
        finally:
            rc = stop_server(proc)
            log.close()
        if rc != 0:
            raise RuntimeError(f"stage {stage}: the server exited with {rc} after SIGTERM")
    return dict(model=info, seed=args.seed, max_num_seqs=args.max_num_seqs,
                workload={"name": workload.name, "description": workload.description,
                          "num_requests": len(workload)},
                peak_loadavg_1m=peak_loadavg(run["loadavg"] for run in runs), runs=runs)


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.serving", __doc__, argv, run, render, name="serving_cpu", repeats=1,
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
