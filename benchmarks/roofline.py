"""The limits of this machine, measured: read bandwidth and peak GEMM FLOP/s, and how close a
measurement comes to them (the roofline model).

    python -m benchmarks.roofline                      # ~1 minute; writes roofline_cpu.{json,md}
                                                       # and docs/assets/roofline_cpu.png
                                                       # (roofline_cpu_avx2.* on a CPU without AVX-512)
    python -m benchmarks.roofline --no-write --decode-tok-s 5.2 --bytes-per-step 101.7e6
                                                       # a decode measurement as a fraction
    python -m benchmarks.roofline --no-write --prefill-tok-s 900 --flops-per-token 51e6

- read bandwidth: the best of our C++ streaming read (`stream_read`, csrc/cpu/decode_gemm.cpp:
  a 1 GiB float32 buffer summed with vector adds, as 1, 2, 3 or 4 streams read side by side)
  at 1 and 2 threads: bytes / second. `x.sum()` over the same buffer is kept beside it: it is one
  stream (and on some machines slower than memory can deliver: the issue's first AVX2 machine
  measured 11.5 GB/s), while 2-4 streams side by side read ~30% more on the AVX2 Zen 3 (21 ->
  28 GB/s), so the sum understates the limit. A decode step reads every weight once, so its
  ceiling is bandwidth / (weight bytes per step) steps per second.
- peak GEMM bfloat16 only where oneDNN has bf16 kernels (elsewhere torch's fallback takes minutes).
- peak GEMM: `a @ b` of 2,048 x 2,048 float32 and bfloat16 matrices (oneDNN/MKL through torch),
  at 1 and 2 threads: flop / second. Prefill's ceiling (2 x parameters flop per token).

Medians of `--repeats` runs; the rates come from process CPU time per thread (a shared
machine's wait for a core does not count; wall-time rates are in the JSON), the load average after
each. The plot draws both ceilings against arithmetic intensity (flop per byte of weight)
and, when `benchmarks/results/decode_linear_cpu.json` exists, each measured linear at its row
count (a float32 linear at M rows does M/2 flop per weight byte).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, timed
from benchmarks.results import ASSETS_DIR, RESULTS_DIR, machine_short, shared_machine_note
from folovllm._custom_ops import load_ops, ops_available
from folovllm.platforms.cpu import cpu_flags, onednn_bf16_supported

GIB = 1 << 30
GEMM_N = 2048


def _median_rate(fn: Any, work: float, repeats: int, loads: list, threads: int) -> dict[str, float]:
    """The rate from CPU time per thread (on a shared machine the wall time includes the time
    spent waiting for a core; on a quiet one the two agree), and from wall time beside it."""
    fn()  # warm-up: page faults, oneDNN's primitive creation
    runs = [timed(fn) for _ in range(repeats)]
    loads += [t.loadavg for t in runs]
    wall, cpu = statistics.median(t.seconds for t in runs), statistics.median(t.cpu_seconds for t in runs)
    return dict(wall_seconds=wall, cpu_seconds=cpu, per_second=work / (cpu / threads),
                per_second_wall=work / wall)


# --8<-- [start:reads]
STREAMS = (1, 2, 3, 4)  # stream_read's side-by-side streams (one_row_f32 reads 3 panels at once on AVX2)


def reads(x: torch.Tensor) -> dict[str, Any]:
    """The ways of reading the buffer x that `measure` times: name -> a call. torch's `sum`, and
    our C++ read as 1-4 streams where the kernels build."""
    calls: dict[str, Any] = {"torch sum": lambda: x.sum()}
    if ops_available():
        ops = load_ops()
        calls.update({f"C++ {s} stream{'s' if s > 1 else ''}": (lambda s=s: ops.stream_read(x, s)) for s in STREAMS})
    return calls
# --8<-- [end:reads]


def measure(repeats: int, threads: tuple[int, ...] = (1, 2), gib: float = 1.0) -> dict[str, Any]:
    """{"bandwidth": {threads: bytes/s, the best read}, "reads": {threads: {read: bytes/s}},
    "gemm": {dtype: {threads: flop/s}}} plus the details."""
    before = torch.get_num_threads()
    loads: list = []
    out: dict[str, Any] = dict(bandwidth={}, reads={}, gemm={"float32": {}, "bfloat16": {}}, details={})
    x = torch.ones(int(gib * GIB) // 4)  # float32, every page touched
    # bfloat16 only where oneDNN has bf16 kernels: elsewhere (AVX2) torch's fallback takes minutes
    mats = {dt: (torch.randn(GEMM_N, GEMM_N).to(dt), torch.randn(GEMM_N, GEMM_N).to(dt))
            for dt in (torch.float32, torch.bfloat16) if dt == torch.float32 or onednn_bf16_supported()}
    try:
        with torch.inference_mode():
            for t in threads:
                torch.set_num_threads(t)
                rates = out["reads"][str(t)] = {}
                for name, fn in reads(x).items():
                    r = _median_rate(fn, x.numel() * 4, repeats, loads, t)
                    rates[name] = r["per_second"]
                    out["details"][f"{name} {gib:g} GiB, {t} threads"] = r
                out["bandwidth"][str(t)] = max(rates.values())
                for dt, (a, b) in mats.items():
                    name = str(dt).removeprefix("torch.")
                    r = _median_rate(lambda a=a, b=b: a @ b, 2 * GEMM_N**3, repeats, loads, t)
                    out["gemm"][name][str(t)] = r["per_second"]
                    out["details"][f"gemm {name} {GEMM_N}^3, {t} threads"] = r
    finally:
        torch.set_num_threads(before)
    out["peak_loadavg_1m"] = peak_loadavg(loads)
    return out


def results_name() -> str:
    """roofline_cpu (the developers' AVX-512 machine) or roofline_cpu_avx2 (a CPU without
    AVX-512, issue 36's): two machines' limits side by side, each read by the benchmarks run on it."""
    return "roofline_cpu" + ("" if "avx512f" in cpu_flags() else "_avx2")


def load_limits(path: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The last measured limits of this kind of machine (`results_name()`.json), or None."""
    p = RESULTS_DIR / f"{results_name()}.json" if path is None else path
    try:
        return json.loads(open(p).read())
    except OSError:
        return None


def decode_fraction(tok_s: float, bytes_per_step: float, bandwidth: float, rows: int = 1) -> float:
    """A decode measurement (tokens/s over `rows` sequences) as a fraction of the bandwidth
    ceiling: each step reads `bytes_per_step` (the weights) and yields `rows` tokens."""
    return (tok_s / rows) * bytes_per_step / bandwidth


def prefill_fraction(tok_s: float, flops_per_token: float, peak: float) -> float:
    return tok_s * flops_per_token / peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    res = measure(args.repeats, gib=0.25 if args.quick else 1.0)
    t = str(args.threads)
    bw = res["bandwidth"].get(t) or res["bandwidth"]["1"]
    if args.decode_tok_s and args.bytes_per_step:
        res["decode"] = dict(tok_s=args.decode_tok_s, bytes_per_step=args.bytes_per_step, rows=args.rows,
                             ceiling_tok_s=bw / args.bytes_per_step * args.rows,
                             fraction=decode_fraction(args.decode_tok_s, args.bytes_per_step, bw, args.rows))
    if args.prefill_tok_s and args.flops_per_token:
        peak = res["gemm"]["float32"].get(t) or res["gemm"]["float32"]["1"]
        res["prefill"] = dict(tok_s=args.prefill_tok_s, flops_per_token=args.flops_per_token,
                              fraction=prefill_fraction(args.prefill_tok_s, args.flops_per_token, peak))
    return res


def render_markdown(result: dict[str, Any]) -> str:
    caption = (f"This machine's limits: `{result['command']}` on {machine_short(result['machine'])}, "
               f"{result['date'][:10]} (medians of {result['repeats']}; from process CPU time per thread, "
               f"which waiting for a core on a shared machine does not stretch).")
    names = list(next(iter(result.get("reads", {}).values()), {}))
    lines = [caption + shared_machine_note(result), "",
             "| threads | read bandwidth (the best read) | " + "".join(f"{n} | " for n in names)
             + "GEMM float32 | GEMM bfloat16 |", "|--:|--:|" + "--:|" * len(names) + "--:|--:|"]
    for t in result["bandwidth"]:
        per_read = "".join(f"{result['reads'][t][n] / 1e9:.1f} | " for n in names)
        lines.append(f"| {t} | **{result['bandwidth'][t] / 1e9:.1f} GB/s** | {per_read}"
                     f"{result['gemm']['float32'][t] / 1e9:.0f} GFLOP/s | {_gflops(result['gemm']['bfloat16'].get(t))} |")
    if "decode" in result:
        d = result["decode"]
        lines += ["", f"Decode: {d['tok_s']:.2f} tok/s at {d['rows']} rows, {d['bytes_per_step'] / 1e6:.1f} MB "
                  f"per step: ceiling {d['ceiling_tok_s']:.2f} tok/s, **{100 * d['fraction']:.0f}%** of it."]
    if "prefill" in result:
        p = result["prefill"]
        lines += ["", f"Prefill: {p['tok_s']:.0f} tok/s x {p['flops_per_token'] / 1e6:.0f} MFLOP: "
                  f"**{100 * p['fraction']:.0f}%** of the float32 GEMM peak."]
    return "\n".join(lines) + "\n"


def _gflops(rate: Optional[float]) -> str:
    return "-" if rate is None else f"{rate / 1e9:.0f} GFLOP/s"


def plot(result: dict[str, Any], path: Any = None) -> Any:
    """The roofline (log-log): min(bandwidth x intensity, peak) for 1 and 2 threads, and the
    measured linears of decode_linear_cpu.json (old and new path) at their intensity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)  # 960 x 600 px
    ai = [2**e for e in range(-3, 9)]
    for t, style in (("1", "-"), ("2", "--")):
        if t not in result["bandwidth"]:
            continue
        bw, peak = result["bandwidth"][t], result["gemm"]["float32"][t]
        ax.plot(ai, [min(bw * a, peak) / 1e9 for a in ai], style, color="black",
                label=f"{t} thread{'s' if t != '1' else ''}: {bw / 1e9:.1f} GB/s, {peak / 1e9:.0f} GFLOP/s fp32")
    linears = RESULTS_DIR / ("decode_linear_cpu" + results_name().removeprefix("roofline_cpu") + ".json")
    if linears.exists():
        data = json.loads(linears.read_text())
        for key, marker, label in (("onednn_ms", "x", "oneDNN packed (before)"), ("kernel_ms", "o", "decode_linear (ours)")):
            xs, ys = [], []
            for case in data["cases"].values():
                # the weights that outgrow the 32 MB L3 (the LM head, gate_up): smaller ones stay
                # cached between back-to-back calls and land above the DRAM slope
                if case["rows"] <= 16 and case["weight_bytes"] > 20e6:
                    xs.append(case["rows"] / 2)
                    ys.append(2 * case["rows"] * case["weight_bytes"] / 4 / (case[key] / 1e3) / 1e9)
            ax.scatter(xs, ys, marker=marker, label=f"{label}: Qwen3-0.6B LM head, gate_up; 1-16 rows, 1 thread")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop per weight byte; float32 linear at M rows: M / 2)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Roofline of this machine: decode (1-16 rows) sits on the bandwidth slope")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = path or ASSETS_DIR / f"{results_name()}.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--decode-tok-s", type=float, default=None, help="a decode measurement, tokens/s")
        p.add_argument("--bytes-per-step", type=float, default=None, help="weight bytes a decode step reads")
        p.add_argument("--rows", type=int, default=1, help="sequences in the decode batch (default 1)")
        p.add_argument("--prefill-tok-s", type=float, default=None, help="a prefill measurement, tokens/s")
        p.add_argument("--flops-per-token", type=float, default=None, help="2 x parameters in the matmuls")

    def written(args: argparse.Namespace, result: dict[str, Any], name: str) -> None:
        print(f"wrote {plot(result)}")

    bench_main("benchmarks.roofline", __doc__, argv, run, render_markdown, name=lambda a, r: results_name(), repeats=5,
               options=options, written=written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
