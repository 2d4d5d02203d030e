"""Plots for the docs, drawn from the results JSON files (matplotlib, PNG under docs/assets/).

    python -m benchmarks.plots latency benchmarks/results/stage02_latency_cpu.json
    python -m benchmarks.plots kv benchmarks/results/stage03_mixed_cpu.json
    python -m benchmarks.plots running benchmarks/results/stage02_mixed_cpu.json

`latency`: TTFT distribution (CDF) of each stage on the same arrival trace, and requests running
after every engine step over the run. `kv`: KV cache tokens reserved (solid) and holding live
tokens (dashed) after every step, for each folovllm system of a `benchmarks.run` result, against
the cache's capacity; below it, requests running. `running`: requests running per step (offline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

ASSETS_DIR = Path(__file__).resolve().parent.parent / "docs" / "assets"
COLORS = {"folovllm-stage1": "tab:gray", "folovllm-stage2": "tab:blue", "folovllm-stage3": "tab:orange",
          "folovllm-stage4": "tab:green"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i}")


def _label(name: str) -> str:
    return name.replace("folovllm-stage", "stage ")


def plot_latency(result: dict[str, Any], out: Path) -> Path:
    """Left: CDF of TTFT per stage (all repeats pooled). Right: requests running per step over
    the first repeat (and waiting, thin)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(result["systems"].items()):
        ttft = sorted(q["ttft"] for run in r["runs"] for q in run["requests"])
        ys = [(k + 1) / len(ttft) for k in range(len(ttft))]
        med = r["median"]
        ax1.step(ttft, ys, where="post", color=_color(name, i),
                 label=f"{_label(name)} (p50 {med['ttft_p50']:.1f} s, p99 {med['ttft_p99']:.1f} s)")
        tr = r["runs"][0]["trace"]
        ax2.plot(tr["t"], tr["running"], color=_color(name, i), lw=1.2, drawstyle="steps-post",
                 label=f"{_label(name)} running")
        ax2.plot(tr["t"], tr["waiting"], color=_color(name, i), lw=0.8, ls=":", drawstyle="steps-post",
                 label=f"{_label(name)} waiting")
    ax1.set_xscale("log")
    ax1.set_xlabel("time to first token (s, log scale)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT, same Poisson arrival trace")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set_xlabel("seconds since the first arrival")
    ax2.set_ylabel("requests")
    ax2.set_title(f"requests running / waiting after each step (max_num_seqs {result['config']['max_num_seqs']})")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8)
    c = result["config"]
    fig.suptitle(f"{result['workload']['name']} workload, {result['workload']['num_requests']} requests "
                 f"at {c['rate']:.3f} req/s; bench model, 1 CPU thread", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_itl_ttft_tradeoff(result: dict[str, Any], out: Path) -> Path:
    """One point per system: p99 inter-token latency of running requests against median time to
    first token. A chunked-prefill budget sweep draws the trade-off: small budgets keep decodes
    smooth, large ones get prompts out sooner."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cpu = all(r["median"].get("itl_cpu_p99") is not None for r in result["systems"].values())
    key = "itl_cpu_p99" if cpu else "itl_p99"  # CPU time when recorded: immune to a shared machine
    for i, (name, r) in enumerate(result["systems"].items()):
        med = r["median"]
        ax.scatter(med[key] * 1e3, med["ttft_p50"], color=_color(name, i), s=40, zorder=3)
        ax.annotate(_label(name).replace("max_num_batched_tokens=", "budget "), (med[key] * 1e3, med["ttft_p50"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("inter-token latency p99 (ms" + (" of process CPU time)" if cpu else ")"))
    ax.set_ylabel("time to first token p50 (s)")
    ax.set_title(f"{result['workload']['name']} workload: decode smoothness vs prompt latency", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_kv_usage(result: dict[str, Any], out: Path) -> Path:
    """KV tokens reserved / used per step (top) and requests running (bottom), per folovllm system."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[2, 1])
    capacity = None
    systems = {n: r for n, r in result["systems"].items() if "[" not in n}  # no sweep variants
    for i, (name, r) in enumerate(systems.items()):
        tr = r.get("trace")
        if not tr:
            continue
        col = _color(name, i)
        capacity = tr.get("kv_capacity_tokens") or capacity
        st = r["stats"]
        steps = range(1, len(tr["kv_reserved"]) + 1)
        ax1.plot(steps, tr["kv_reserved"], color=col, lw=1.3, drawstyle="steps-post",
                 label=f"{_label(name)} reserved (KV waste {1 - st['kv_utilization']:.0%}; "
                       f"{len(steps):,} steps, median {r['median_seconds']:.0f} s)")
        ax1.plot(steps, tr["kv_used"], color=col, lw=1.0, ls="--", drawstyle="steps-post",
                 label=f"{_label(name)} holding live tokens")
        ax2.plot(steps, tr["running"], color=col, lw=1.2, drawstyle="steps-post",
                 label=f"{_label(name)} (peak {st['max_num_running']}, {st['num_preemptions']} preemptions)")
    if capacity:
        ax1.axhline(capacity, color="black", lw=0.8, ls=":", label=f"capacity {capacity:,} tokens")
    ax1.set_ylabel("KV cache tokens")
    ax1.set_title("KV cache in use after each engine step (the same on every repeat)")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="center right", fontsize=8)
    ax2.set_ylabel("requests running")
    ax2.set_xlabel("engine step (deterministic; wall time on a shared machine is not)")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8)
    args = result["config"].get("engine_args") or {}
    mem = args.get("kv_cache_memory")
    w = result["workload"]
    fig.suptitle(f"{w['name']} workload, {w['num_requests']} requests; one KV budget for both"
                 + (f": {mem:,} bytes ({mem / 2**20:g} MiB)" if mem else "")
                 + (f", max_model_len {args['max_model_len']}" if "max_model_len" in args else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_running(result: dict[str, Any], out: Path) -> Path:
    """Requests running after each step, per folovllm system of an offline `benchmarks.run`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for i, (name, r) in enumerate(result["systems"].items()):
        tr = r.get("trace")
        if tr:
            steps = range(1, len(tr["running"]) + 1)
            ax.plot(steps, tr["running"], color=_color(name, i), lw=1.2, drawstyle="steps-post",
                    label=f"{_label(name)} ({len(steps):,} steps, median {r['median_seconds']:.0f} s)")
    ax.set_xlabel("engine step")
    ax.set_ylabel("requests running")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    w = result["workload"]
    ax.set_title(f"{w['name']} workload, {w['num_requests']} requests at once: live requests per step", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: Any, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["latency", "kv", "running"])
    p.add_argument("result", help="results JSON")
    p.add_argument("--out", default=None, help="PNG (default docs/assets/<result name minus _cpu>[_kv_usage].png)")
    args = p.parse_args(argv)
    src = Path(args.result)
    result = json.loads(src.read_text())
    stem = src.stem.removesuffix("_cpu")
    if args.kind == "latency":
        out = plot_latency(result, Path(args.out or ASSETS_DIR / f"{stem}.png"))
    elif args.kind == "kv":
        out = plot_kv_usage(result, Path(args.out or ASSETS_DIR / f"{stem.split('_')[0]}_kv_usage.png"))
    else:
        out = plot_running(result, Path(args.out or ASSETS_DIR / f"{stem}_running.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
