"""Does memory stay flat under a steady, varied load? RSS after each round of new requests, for
the offline engine and for `folovllm serve`.

    python -m benchmarks.memory_rss                       # both, tiny model, 10 rounds of 64
    python -m benchmarks.memory_rss --env FOLOVLLM_ONEDNN_CACHE_CAPACITY=1024 --name x

Each round sends `--requests` new requests (seeded by round: new token ids, new lengths; prompt
and output lengths uniform in `--prompt-len` and `--output-len`), so the engine's steps see many
different token counts: what made RSS grow with every new batch shape (issue 28, item 3: oneDNN
keeps one JIT-compiled matmul per [T, in] x [in, out] it has seen). After each round the RSS of
the process that runs the model is read from /proc/<pid>/status (VmRSS), with its CPU time for
the round (a shared machine stretches wall time, not CPU time).

    offline  a child process (the variables of `--env` must be set before torch starts) runs
             `LLM.generate` on each round's requests
    server   `folovllm serve` started by this script; each round's requests are sent at once by
             the `openai` client (token ids as prompts, greedy, ignore_eos); SIGTERM at the end

Flat means RSS after the last round within 10% of RSS after round 2 (round 1 pays the start:
kernels, the first shapes, allocator pools). Writes `<out>/<name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from benchmarks import serving
from benchmarks.harness import loadavg, peak_loadavg
from benchmarks.results import RESULTS_DIR, machine_short, result_record, shared_machine_note, write_results

REPO_ROOT = Path(__file__).resolve().parent.parent
FLAT = 0.10  # RSS after the last round may exceed RSS after round 2 by at most this fraction


# -- what each round sends ------------------------------------------------------------------------


def round_requests(args: argparse.Namespace, vocab_size: int, rnd: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) of round `rnd`: new ids and new lengths every round."""
    rng = random.Random(args.seed * 1000 + rnd)
    return [([rng.randrange(3, vocab_size) for _ in range(rng.randint(*args.prompt_len))],
             rng.randint(*args.output_len)) for _ in range(args.requests)]


def model_path(size: str) -> Path:
    from folovllm.testing.tiny_model import build_tiny_checkpoint, default_cache_dir

    return build_tiny_checkpoint(default_cache_dir() / f"{size}-qwen3", arch="qwen3", size=size)


def vocab_size(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


# -- reading a process ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB: the resident pages, what the OS must find room for."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """`env` on top of os.environ for the processes started inside the block."""
    before = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


# -- offline: a child process ---------------------------------------------------------------------


def offline_child(args: argparse.Namespace) -> None:
    """Run in the child: one JSON line per round on stdout."""
    import torch

    torch.set_num_threads(1)
    from folovllm import LLM, SamplingParams

    path = model_path(args.size)
    llm = LLM(str(path), stage=args.stage, max_num_seqs=args.max_num_seqs, dtype="float32")
    vocab = vocab_size(path)
    print(json.dumps({"round": 0, "rss_mib": rss_mib(os.getpid()), "cpu_s": 0.0}), flush=True)
    for rnd in range(1, args.rounds + 1):
        reqs = round_requests(args, vocab, rnd)
        start = time.process_time()
        llm.generate([{"prompt_token_ids": p} for p, _ in reqs],
                     [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs],
                     use_tqdm=False)
        print(json.dumps({"round": rnd, "rss_mib": rss_mib(os.getpid()),
                          "cpu_s": time.process_time() - start}), flush=True)


def run_offline(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "benchmarks.memory_rss", "--child-offline", *argv]
    with environ(args.env):
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"offline child exited with {out.returncode}: {out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


# -- server ---------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, path: Path, log: Any) -> tuple[subprocess.Popen, str]:
    """`folovllm serve` (benchmarks/serving.py's), with this run's `--env` settings."""
    return serving.start_server(path, args.stage, args.max_num_seqs, log, env=dict(args.env))


async def send_round(base: str, reqs: list[tuple[list[int], int]]) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                  timeout=600) as client:
        outs = await asyncio.gather(*(
            client.completions.create(model=serving.MODEL_NAME, prompt=p, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True}) for p, n in reqs))
    got = [o.usage.completion_tokens for o in outs]
    if got != [n for _, n in reqs]:
        raise RuntimeError(f"the server answered {got}, not the requested max_tokens")


def run_server(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = model_path(args.size)
    vocab = vocab_size(path)
    with tempfile.NamedTemporaryFile("w+", prefix="memory_rss_serve_", suffix=".log") as log:
        proc, base = start_server(args, path, log)
        try:
            rows = [{"round": 0, "rss_mib": rss_mib(proc.pid), "cpu_s": 0.0}]
            for rnd in range(1, args.rounds + 1):
                start = cpu_seconds(proc.pid)
                asyncio.run(send_round(base, round_requests(args, vocab, rnd)))
                rows.append({"round": rnd, "rss_mib": rss_mib(proc.pid),
                             "cpu_s": cpu_seconds(proc.pid) - start})
                print(f"server round {rnd}: {rows[-1]}", file=sys.stderr)
        finally:
            rc = serving.stop_server(proc)
        if rc != 0:
            raise RuntimeError(f"the server exited with {rc} after SIGTERM")
    return rows


# -- the report -----------------------------------------------------------------------------------


def growth(rows: list[dict[str, Any]]) -> Optional[float]:
    """RSS after the last round over RSS after round 2, minus 1."""
    by_round = {r["round"]: r["rss_mib"] for r in rows}
    last = max(by_round)
    return by_round[last] / by_round[2] - 1 if 2 in by_round and last > 2 else None


def render(result: dict[str, Any]) -> str:
    env = " ".join(f"`{k}={v}`" for k, v in result["env"].items()) or "the defaults"
    lines = [
        f"RSS of the process that runs the model after each round of {result['requests']} new "
        f"requests (prompt {result['prompt_len'][0]}..{result['prompt_len'][1]} tokens, output "
        f"{result['output_len'][0]}..{result['output_len'][1]}, greedy, ignore_eos): "
        f"`{result['command']}` on {machine_short(result['machine'])}, {result['date'][:10]}, "
        f"commit {result['git_commit'] or '?'}; model {result['size']} (Qwen3, random weights, "
        f"float32), stage {result['stage']}, max_num_seqs {result['max_num_seqs']}, one torch "
        f"thread, {env}. MiB; CPU seconds of the round in brackets. Round 0: after start-up."
        f"{shared_machine_note(result, cpu_ratios=False)}",
        "",
    ]
    modes = [m for m in ("offline", "server") if m in result["runs"]]
    lines.append("| round | " + " | ".join(modes) + " |")
    lines.append("|--:|" + "--:|" * len(modes))
    for i in range(result["rounds"] + 1):
        cells = []
        for m in modes:
            row = result["runs"][m]["rounds"][i]
            cells.append(f"{row['rss_mib']:.0f}" + (f" ({row['cpu_s']:.2f} s)" if i else ""))
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    cells = []
    for m in modes:
        g = result["runs"][m]["growth_after_round_2"]
        cells.append("-" if g is None else f"{g:+.1%} ({'flat' if g <= FLAT else 'grows'})")
    lines.append(f"| last / round 2 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env takes KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=["offline", "server"], default=["offline", "server"])
    p.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    p.add_argument("--stage", type=int, default=6)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=64, help="new requests per round")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[1, 300])
    p.add_argument("--output-len", type=int, nargs=2, default=[1, 32])
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment of the engine's process (offline child and server)")
    p.add_argument("--name", default="memory_rss_cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child-offline", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    args.env = parse_env(args.env)
    if args.child_offline:
        offline_child(args)
        return 0

    import torch

    torch.set_num_threads(1)
    model_path(args.size)  # build it once, before the timed processes start
    runs: dict[str, Any] = {}
    loads = []
    for mode in args.modes:
        rows = run_offline(args, raw) if mode == "offline" else run_server(args)
        loads.append(loadavg())
        runs[mode] = {"rounds": rows, "growth_after_round_2": growth(rows)}
        print(f"{mode}: {[round(r['rss_mib']) for r in rows]}", file=sys.stderr)
    result = result_record(
        "benchmarks.memory_rss", argv, size=args.size, stage=args.stage, rounds=args.rounds,
        requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len,
        max_num_seqs=args.max_num_seqs, seed=args.seed, env=args.env, flat_within=FLAT,
        peak_loadavg_1m=peak_loadavg(loads), runs=runs,
    )
    markdown = render(result)
    print(markdown)
    if not args.no_write:
        write_results(args.out, args.name, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
