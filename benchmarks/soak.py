"""The soak of issue 28: does the server keep serving everyone else while one client sends the
worst it can? RSS, the latency of a small request and of `/health`, over a fixed time.

    python -m benchmarks.soak                                  # this checkout, 60 s
    python -m benchmarks.soak --system before=/tmp/base --system after=.   # side by side

Each `--system NAME=FOLDER` is a checkout whose `folovllm serve` is run (FOLDER on PYTHONPATH,
so a `git worktree` of an older commit measures that commit; give `before` its own options with
`--options NAME="..."`). The systems run one after the other, each on the same tiny Qwen3
(benchmarks/memory_rss.py's), stage 06, float32, one torch thread, for `--seconds`. Three
things run against the server at once:

    prober    (a thread) every 0.25 s a small greedy completion ("the engine", 4 tokens) and a
              GET /health, each timed; a 503 answer is counted as refused, not timed
    RSS       (the same thread) the server's VmRSS every 0.25 s
    attacker  (asyncio) round after round of issue 28's worst inputs, one kind after another:
                template   a chat with a nested-loop template (range(6000) x range(6000))
                prompt10m  a 10 MB text prompt
                stop50k    a completion with 50,000 stop strings
                queue500   500 small completions sent at once
              and, from the start, `--slow-bodies` connections that send their headers, then
              one byte of body every 2 s: how many the server has closed by the end

Latencies in ms, p50 / p99 / max over the run; RSS in MiB at start, peak and end. The client
runs on the server's machine and shares its cores (the prober in its own thread, so the
attacker's 500 requests do not delay its timing in the client's event loop; the GIL still
does, a little).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from benchmarks import serving
from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg
from benchmarks.latency import percentile
from benchmarks.memory_rss import model_path, rss_mib
from benchmarks.results import machine_short

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_INTERVAL_S = 0.25
NESTED_TEMPLATE = "{% for i in range(6000) %}{% for j in range(6000) %}{% endfor %}{% endfor %}x"
# The options the "after" system is given by default: the new limits on (the rest: defaults).
AFTER_OPTIONS = "--max-waiting-requests 64 --request-body-timeout 5"


# -- the attacks ------------------------------------------------------------------------------


def attack_bodies(model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """kind -> (path, body): the worst single requests of issue 28."""
    return {
        "template": ("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template_kwargs": {"chat_template": NESTED_TEMPLATE}}),
        "prompt10m": ("/v1/completions", {"model": model, "prompt": "word " * (2 * 10**6), "max_tokens": 2}),
        "stop50k": ("/v1/completions", {"model": model, "prompt": "the engine", "max_tokens": 32,
                                         "stop": [f"@@{i}@@" for i in range(50_000)],
                                         "ignore_eos": True}),
    }


async def attacker(base: str, model: str, stop: threading.Event, log: list[dict[str, Any]],
                   queue_size: int) -> None:
    import httpx

    bodies = attack_bodies(model)
    small = {"model": model, "prompt": "the engine", "max_tokens": 8, "ignore_eos": True}
    limits = httpx.Limits(max_connections=queue_size + 8, max_keepalive_connections=queue_size + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def send(path: str, body: dict[str, Any]) -> int:
            try:
                return (await client.post(path, json=body)).status_code
            except httpx.HTTPError as e:
                return -1 if not isinstance(e, httpx.TimeoutException) else -2

        while not stop.is_set():
            for kind in ("template", "prompt10m", "stop50k", "queue500"):
                if stop.is_set():
                    break
                start = time.perf_counter()
                if kind == "queue500":
                    codes = await asyncio.gather(*(send("/v1/completions", small) for _ in range(queue_size)))
                else:
                    codes = [await send(*bodies[kind])]
                log.append({"kind": kind, "t": start, "s": time.perf_counter() - start,
                            "codes": dict(Counter(map(str, codes)))})


async def slow_body(host: str, port: int, closed: list[float], stop: threading.Event) -> None:
    """Headers, then one byte of a 1,000-byte body every 2 s, until the server closes."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    try:
        while not stop.is_set():
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(65536), 2.0)
                if data == b"" or reader.at_eof():
                    closed.append(time.perf_counter() - start)
                    return
            except asyncio.TimeoutError:
                writer.write(b" ")
    except (ConnectionError, OSError):
        closed.append(time.perf_counter() - start)
    finally:
        writer.close()


# -- the prober -------------------------------------------------------------------------------


def prober(base: str, model: str, pid: int, stop: threading.Event, out: dict[str, list]) -> None:
    import httpx

    body = {"model": model, "prompt": "the engine", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=base, timeout=600) as client:
        while not stop.is_set():
            tick = time.perf_counter()
            try:
                t = time.perf_counter()
                client.get("/health")
                out["health"].append(time.perf_counter() - t)
                t = time.perf_counter()
                r = client.post("/v1/completions", json=body)
                if r.status_code == 200:
                    out["small"].append(time.perf_counter() - t)
                else:
                    out["small_codes"].append(r.status_code)
            except httpx.HTTPError:
                out["small_codes"].append(-1)
            out["rss"].append((time.perf_counter(), rss_mib(pid)))
            stop.wait(max(0.0, PROBE_INTERVAL_S - (time.perf_counter() - tick)))


# -- one system -------------------------------------------------------------------------------


def soak(name: str, folder: Path, options: list[str], args: argparse.Namespace) -> dict[str, Any]:
    model = model_path("tiny")
    log = tempfile.NamedTemporaryFile("w+", prefix=f"soak_{name}_", suffix=".log")
    env = {"PYTHONPATH": str(folder), "FOLOVLLM_CONFIGURE_LOGGING": "0"}
    proc, base = serving.start_server(model, 6, 16, log, ["--max-model-len", "1024", *options], env=env,
                                      cwd=folder)
    host, port = base.removeprefix("http://").split(":")
    load = loadavg()
    out: dict[str, list] = {"health": [], "small": [], "small_codes": [], "rss": []}
    attacks: list[dict[str, Any]] = []
    closed: list[float] = []
    stop = threading.Event()
    probe = threading.Thread(target=prober, args=(base, serving.MODEL_NAME, proc.pid, stop, out), daemon=True)
    try:
        rss_start = rss_mib(proc.pid)
        probe.start()

        async def main() -> None:
            slow = [asyncio.ensure_future(slow_body(host, int(port), closed, stop)) for _ in range(args.slow_bodies)]
            attack = asyncio.ensure_future(attacker(base, serving.MODEL_NAME, stop, attacks, args.queue))
            await asyncio.sleep(args.seconds)
            stop.set()
            await asyncio.wait([attack, *slow], timeout=120)

        asyncio.run(main())
        probe.join(timeout=120)
        rss = [m for _, m in out["rss"]]
    finally:
        stop.set()
        rc = serving.stop_server(proc)
        log.close()

    def ms(xs: list[float]) -> dict[str, Optional[float]]:
        return {"n": len(xs), "p50": _ms(percentile(xs, 50)), "p99": _ms(percentile(xs, 99)),
                "max": _ms(max(xs) if xs else None)}

    kinds: dict[str, dict[str, Any]] = {}
    for a in attacks:
        k = kinds.setdefault(a["kind"], {"rounds": 0, "seconds": [], "codes": Counter()})
        k["rounds"] += 1
        k["seconds"].append(round(a["s"], 3))
        k["codes"].update(a["codes"])
    result = {
        "system": name, "folder": str(folder), "options": options, "loadavg": load, "exit_code": rc,
        "health_ms": ms(out["health"]), "small_ms": ms(out["small"]),
        "small_refused": dict(Counter(map(str, out["small_codes"]))),
        "rss_mib": {"start": round(rss_start, 1), "peak": round(max(rss, default=rss_start), 1),
                    "end": round(rss[-1] if rss else rss_start, 1)},
        "rss_trace": [[round(t - out["rss"][0][0], 2), round(m, 1)] for t, m in out["rss"]] if out["rss"] else [],
        "attacks": {k: {**v, "codes": dict(v["codes"])} for k, v in kinds.items()},
        "slow_bodies": {"opened": args.slow_bodies, "closed_by_server": len(closed),
                        "closed_after_s_p50": percentile(closed, 50) if closed else None},
    }
    print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'rss_trace'})}", file=sys.stderr)
    return result


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x * 1e3, 1)


# -- the record -------------------------------------------------------------------------------


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", action="append", default=None, metavar="NAME=FOLDER",
                   help="a checkout to serve from (repeatable; default: after=this checkout)")
    p.add_argument("--options", action="append", default=[], metavar='NAME="ARGS"',
                   help=f"serve options of one system (default for 'after': {AFTER_OPTIONS!r})")
    p.add_argument("--seconds", type=float, default=60.0, help="how long each system is soaked")
    p.add_argument("--queue", type=int, default=500, help="requests of the queue500 burst")
    p.add_argument("--slow-bodies", type=int, default=20, help="connections that trickle their body")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.seconds, args.queue, args.slow_bodies = 10.0, 50, 2
    systems = [s.split("=", 1) for s in (args.system or [f"after={REPO_ROOT}"])]
    options = {"after": AFTER_OPTIONS}
    options.update(o.split("=", 1) for o in args.options)
    runs = [soak(name, Path(folder).resolve(), options.get(name, "").split(), args) for name, folder in systems]
    commits = {r["system"]: _commit(Path(r["folder"])) for r in runs}
    return dict(seconds=args.seconds, queue=args.queue, slow_bodies_opened=args.slow_bodies,
                commits=commits, peak_loadavg_1m=peak_loadavg(r["loadavg"] for r in runs), runs=runs)


def _commit(folder: Path) -> Optional[str]:
    import subprocess

    out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def render(result: dict[str, Any]) -> str:
    def f(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:g}"

    systems = ", ".join(f"{r['system']} = {result['commits'].get(r['system']) or '?'}"
                        + (f" with `{' '.join(r['options'])}`" if r["options"] else "") for r in result["runs"])
    lines = [
        f"Soak: `{result['command']}` on {machine_short(result['machine'])}, {result['date'][:10]}; "
        f"{systems}. Each system served the tiny Qwen3 (stage 06, float32, one torch thread) for "
        f"{result['seconds']:g} s while one client sent issue 28's worst inputs round after round "
        f"(a nested-loop chat template, a 10 MB prompt, 50,000 stop strings, {result['queue']} requests "
        f"at once) and {result['slow_bodies_opened']} connections trickled their bodies; a prober "
        "timed a small completion and /health every 0.25 s. Latencies in ms (p50 / p99 / max). "
        "The machine (2 cores) is shared by several helpers and the lead: other work competed for "
        f"its cores throughout (1-minute load average up to {f(result['peak_loadavg_1m'])}, last "
        "column: before each system), so read the comparison, not the absolute numbers.",
        "",
        "| system | /health p50 / p99 / max | small request p50 / p99 / max | small refused | "
        "RSS MiB start / peak / end | slow bodies closed | load |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["runs"]:
        h, s, m = r["health_ms"], r["small_ms"], r["rss_mib"]
        refused = ", ".join(f"{n}x {c}" for c, n in sorted(r["small_refused"].items())) or "0"
        lines.append(
            f"| {r['system']} | {f(h['p50'])} / {f(h['p99'])} / {f(h['max'])} | "
            f"{f(s['p50'])} / {f(s['p99'])} / {f(s['max'])} ({s['n']} served) | {refused} | "
            f"{f(m['start'])} / {f(m['peak'])} / {f(m['end'])} | "
            f"{r['slow_bodies']['closed_by_server']} of {r['slow_bodies']['opened']} | {f(r['loadavg'])} |")
    lines += ["", "What each attack got (rounds; HTTP status: count; seconds per round, median):", "",
              "| system | attack | rounds | answers | s per round |", "|:--|:--|--:|:--|--:|"]
    for r in result["runs"]:
        for kind, a in r["attacks"].items():
            codes = ", ".join(f"{c}: {n}" for c, n in sorted(a["codes"].items()))
            lines.append(f"| {r['system']} | {kind} | {a['rounds']} | {codes} | "
                         f"{f(round(percentile(a['seconds'], 50), 2))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.soak", __doc__, argv, run, render, name="soak_cpu", repeats=1, options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
