"""Data-parallel routing: a multi-turn chat workload against `folovllm serve --data-parallel-size 2`
with each routing policy in turn (and one engine, DP=1, for reference), measured by the client.

    python -m benchmarks.dp_routing                  # DP=1, then DP=2 x round_robin, least_loaded, prefix_aware
    python -m benchmarks.dp_routing --quick          # smoke run: 2 conversations, printed

The workload: `--conversations` chats of `--turns` turns each, started by Poisson arrivals
(`--rate` per second, seeded); a chat sends its next turn when the previous answer is complete.
Each chat has its own system prompt (`--system-tokens` random token ids), so its turns share a
prefix that no other chat has; turn k's prompt is the system prompt, then for each earlier turn
the user's message (`--user-tokens`) and a reply (`--max-tokens`, random ids standing for the
assistant's text), then the new message. The answer: `--max-tokens` tokens, greedy, ignore_eos,
streamed by the official `openai` client.

Per policy: TTFT p50/p99 (sent -> first text), throughput (output tokens over the run's span),
the replicas' prefix-cache hit rate (`folovllm:prefix_cache_hits_total` over
`..._queries_total`, summed over replicas, the run's own difference), the requests each
replica got, the CPU seconds of the front and the replicas (from /proc), and whether every
answer's text equals the first configuration's (greedy: routing must not change a token).

Each replica has one torch thread (`--threads 1`); on this 2-core machine two replicas use
both cores and the client and the front compete with them, so DP=2 is not 2x DP=1 here.
Writes `<out>/dp_routing_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg
from benchmarks.latency import percentile
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.serving import MODEL_NAME, start_server, stop_server
from benchmarks.workloads import poisson_arrivals

CONFIGS = [(1, "round_robin"), (2, "round_robin"), (2, "least_loaded"), (2, "prefix_aware")]


def conversations(vocab_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each chat's system prompt, user messages and the replies that stand for the answers."""
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]  # 0..2 are special

    return [{"system": ids(args.system_tokens), "users": [ids(args.user_tokens) for _ in range(args.turns)],
             "replies": [ids(args.max_tokens) for _ in range(args.turns)]} for _ in range(args.conversations)]


def turn_prompt(chat: dict[str, Any], turn: int) -> list[int]:
    prompt = list(chat["system"])
    for k in range(turn):
        prompt += chat["users"][k] + chat["replies"][k]
    return prompt + chat["users"][turn]


async def run_chats(base: str, chats: list[dict[str, Any]], max_tokens: int, arrivals: list[float],
                    think_time: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()

        async def chat(i: int) -> list[dict[str, Any]]:
            await asyncio.sleep(arrivals[i])
            records = []
            rng = random.Random(seed * 1000 + i)  # the same pauses for every configuration
            for turn in range(len(chats[i]["users"])):
                if turn and think_time:  # the user reads, then types: other chats move meanwhile
                    await asyncio.sleep(rng.expovariate(1 / think_time))
                sent = time.perf_counter()
                first: Optional[float] = None
                text, num_tokens = "", 0
                stream = await client.completions.create(
                    model=MODEL_NAME, prompt=turn_prompt(chats[i], turn), max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter()
                        text += chunk.choices[0].text
                    if chunk.usage is not None:
                        num_tokens = chunk.usage.completion_tokens
                done = time.perf_counter()
                records.append({"chat": i, "turn": turn, "sent": sent - t0, "finished": done - t0,
                                "ttft": None if first is None else first - sent, "output_tokens": num_tokens,
                                "text": text})
            return records

        per_chat = await asyncio.gather(*(chat(i) for i in range(len(chats))))
    return [r for records in per_chat for r in records]


def scrape(base: str) -> dict[str, Any]:
    """Prefix-cache counters (summed over replicas), requests per replica, and the pids."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"folovllm:{name}{{"))

    health = httpx.get(f"{base}/health", timeout=10)
    replicas = health.json()["replicas"] if health.headers.get("content-type") == "application/json" else []
    return {"queries": total("prefix_cache_queries_total"), "hits": total("prefix_cache_hits_total"),
            "routed": [r["num_routed"] for r in replicas], "pids": [r["pid"] for r in replicas]}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (Linux)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(records: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    later = [r["ttft"] for r in records if r["ttft"] is not None and r["turn"] > 0]
    span = max(r["finished"] for r in records) - min(r["sent"] for r in records)
    queries = after["queries"] - before["queries"]
    return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "ttft_later_turns_p50": percentile(later, 50),
            "output_tok_s": sum(r["output_tokens"] for r in records) / span, "span_s": span,
            "prefix_hit_rate": (after["hits"] - before["hits"]) / queries if queries else 0.0,
            "routed": [a - b for a, b in zip(after["routed"], before["routed"])] or [len(records)]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.conversations, args.turns, args.configs = 2, 2, ["2:round_robin", "2:prefix_aware"]
    configs = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.configs]
    model = bench_model_path()
    info = bench_model_info(model)
    chats = conversations(info["vocab_size"], args)
    arrivals = poisson_arrivals(len(chats), args.rate, seed=args.seed)
    warmup = conversations(info["vocab_size"], argparse.Namespace(**{**vars(args), "seed": args.seed + 1000,
                                                                     "conversations": 2, "turns": 1}))
    runs = []
    for dp_size, routing in configs:
        log = tempfile.NamedTemporaryFile("w+", prefix="dp_routing_", suffix=".log")
        extra = ["--max-model-len", str(args.max_model_len)]
        if dp_size > 1:
            extra += ["--data-parallel-size", str(dp_size), "--data-parallel-routing", routing]
        proc, base = start_server(model, 6, args.max_num_seqs, log, extra)
        try:
            asyncio.run(run_chats(base, warmup, args.max_tokens, [0.0, 0.0]))
            before = scrape(base)
            pids = [proc.pid, *before["pids"]]
            cpu_before = [cpu_seconds(p) for p in pids]
            load = loadavg()
            records = asyncio.run(run_chats(base, chats, args.max_tokens, arrivals, args.think_time, args.seed))
            after = scrape(base)
            cpu = sum(cpu_seconds(p) for p in pids) - sum(cpu_before)
            summary = summarize(records, before, after)
            summary["server_cpu_s"] = cpu
            print(f"DP={dp_size} {routing}: { {k: v for k, v in summary.items()} }", file=sys.stderr)
            runs.append({"data_parallel_size": dp_size, "routing": routing, "loadavg": load,
                         "summary": summary, "requests": records})
        finally:
            rc = stop_server(proc)
            log.close()
        if rc != 0:
            raise RuntimeError(f"DP={dp_size} {routing}: the server exited with {rc} after SIGTERM")
    texts = [[r["text"] for r in run["requests"]] for run in runs]
    for run in runs:
        run["same_text_as_first"] = [r["text"] for r in run["requests"]] == texts[0]
    return dict(model=info, seed=args.seed, max_num_seqs=args.max_num_seqs, rate=args.rate,
                think_time=args.think_time,
                workload={"conversations": args.conversations, "turns": args.turns,
                          "system_tokens": args.system_tokens, "user_tokens": args.user_tokens,
                          "max_tokens": args.max_tokens},
                peak_loadavg_1m=peak_loadavg(run["loadavg"] for run in runs), runs=runs)


def render(result: dict[str, Any]) -> str:
    w = result["workload"]
    lines = [
        f"Data-parallel routing: `{result['command']}` on {machine_short(result['machine'])}, "
        f"{result['date'][:10]}, commit {result['git_commit'] or '?'}; {w['conversations']} chats x "
        f"{w['turns']} turns (system prompt {w['system_tokens']} tokens, own per chat; user "
        f"{w['user_tokens']}, answer {w['max_tokens']} tokens, greedy, ignore_eos), chats started "
        f"by Poisson arrivals at {result['rate']:g}/s (seed {result['seed']}), "
        + (f"a pause of {result['think_time']:g} s on average (exponential) before each next turn, "
           if result.get("think_time") else "each next turn sent when the answer is complete, ")
        + f"model "
        f"{result['model']['name']}, stage 06 (prefix caching), float32, one torch thread per "
        f"replica, max_num_seqs {result['max_num_seqs']}; the `openai` client streams on the same "
        f"machine. TTFT in seconds; hit rate = prompt tokens found in the replicas' prefix caches "
        f"/ looked up; server CPU = front + replicas. Load average before each run in the last "
        f"column.{shared_machine_note(result, cpu_ratios=False)}",
        "",
        "| DP | routing | prefix hit rate | TTFT p50 | TTFT p99 | TTFT p50, turns 2+ | output tok/s "
        "| requests per replica | server CPU s | same text | load |",
        "|--:|:--|--:|--:|--:|--:|--:|:--|--:|:--|--:|",
    ]

    def f(x: Optional[float], digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for run in result["runs"]:
        s = run["summary"]
        lines.append(
            f"| {run['data_parallel_size']} | {run['routing'] if run['data_parallel_size'] > 1 else '-'} | "
            f"{s['prefix_hit_rate']:.1%} | {f(s['ttft_p50'])} | {f(s['ttft_p99'])} | "
            f"{f(s['ttft_later_turns_p50'])} | {f(s['output_tok_s'], 1)} | "
            f"{' / '.join(map(str, s['routed']))} | {f(s['server_cpu_s'], 1)} | "
            f"{'yes' if run['same_text_as_first'] else 'NO'} | {f(run['loadavg'], 1)} |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=[f"{n}:{r}" for n, r in CONFIGS],
                   help="DP:routing pairs, run in this order (default: %(default)s)")
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=320)
    p.add_argument("--user-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=2.0, help="chats started per second (Poisson)")
    p.add_argument("--think-time", type=float, default=0.0,
                   help="mean seconds (exponential) between an answer and the chat's next turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.dp_routing", __doc__, argv, run, render, name="dp_routing_cpu", repeats=1,
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
