"""Each linear of a decode step, old path against new, alone, one thread: oneDNN's matmul on its
packed weight (1-3 rows padded to 4) against `decode_linear` on its panels
(folovllm/csrc/cpu/decode_gemm.cpp), at 1, 2, 4, 8, 16 rows (decode) and 64, 512 (prefill).

    python -m benchmarks.decode_linear                  # ~3 minutes; decode_linear_cpu.{json,md}
    python -m benchmarks.decode_linear --write-table    # ... and the table cpu_gemm.py reads
    FOLOVLLM_CPU_ISA=avx2 python -m benchmarks.decode_linear --write-table   # the AVX2 rows
    python -m benchmarks.decode_linear --dtype bfloat16 --write-table   # bf16 weights (and x)

Shapes: Qwen3-0.6B's (qkv 1,024 -> 4,096, o 2,048 -> 1,024, gate_up 1,024 -> 6,144, down
3,072 -> 1,024, LM head 1,024 -> 151,936) and the bench model's (hidden 512, intermediate
1,536, vocabulary 512); the LM head at up to 64 rows only (it computes one row per sequence in
a step, never a prompt's rows, prompt_logprobs aside). Per row: median process CPU time per call over interleaved repeats (the
machine is shared; wall time is kept in the JSON), the weight's GB/s (bytes / time: a decode
linear reads its weight once) and, with `benchmarks/results/roofline_cpu.json`, that as a
fraction of the measured one-thread read bandwidth. A weight that fits the 32 MB L3 (the bench
model's, qkv at 16 MB) can beat DRAM bandwidth when it is called back to back: only the LM head
and gate_up of Qwen3-0.6B are honest DRAM numbers.

`--write-table` writes folovllm/model_executor/layers/cpu_gemm_table.json for this ISA path
and dtype (keeping the other rows): each shape's times, and the rule's choice
(`cpu_gemm.table_choice`). With `--dtype bfloat16` the "before" is what a bf16 weight gets
without panels: oneDNN's packed bf16 matmul where oneDNN has bf16 kernels, else `F.linear`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.roofline import load_limits
from folovllm._custom_ops import load_ops
from folovllm.model_executor.layers import cpu_gemm
from folovllm.platforms.cpu import kernel_isa

SHAPES = {  # name -> (in, out)
    "qwen3-0.6b qkv_proj": (1024, 4096),
    "qwen3-0.6b o_proj": (2048, 1024),
    "qwen3-0.6b gate_up_proj": (1024, 6144),
    "qwen3-0.6b down_proj": (3072, 1024),
    "qwen3-0.6b lm_head": (1024, 151936),
    "bench qkv_proj": (512, 1024),
    "bench o_proj": (512, 512),
    "bench gate_up_proj": (512, 3072),
    "bench down_proj": (1536, 512),
    "bench lm_head": (512, 512),
}
ROWS = (1, 2, 4, 8, 16, 64, 512)


def baseline_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight as the path before the panels holds it: oneDNN's packed layout where oneDNN
    takes the dtype (float32 always; bf16 where it has bf16 kernels), else plain (`F.linear`)."""
    if cpu_gemm.onednn_takes(w.dtype):
        return torch.ops.mkldnn._reorder_linear_weight(w, cpu_gemm.PACK_BATCH)
    return w


def run(args: argparse.Namespace) -> dict[str, Any]:
    ops = load_ops()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    limits = load_limits()
    bw = limits["bandwidth"].get(str(args.threads)) if limits else None
    cases, loads = {}, []
    rows_list = (1, 16) if args.quick else ROWS
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or "bench" in k}
    with torch.inference_mode():
        for name, (k_in, n_out) in shapes.items():
            w = (torch.randn(n_out, k_in) / k_in**0.5).to(dtype)
            packed = baseline_weight(w)
            panels = ops.pack_decode_weight(w)
            panels.out_features, panels.in_features = n_out, k_in
            for m in rows_list:
                if "lm_head" in name and m > 64:  # the LM head sees one row per sequence, not a prompt's
                    continue
                x = torch.randn(m, k_in).to(dtype)
                ref = F.linear(x.double(), w.double())
                diff = max((cpu_gemm.dense_linear(x, p).double() - ref).abs().max().item() for p in (packed, panels))
                # calls per timing: ~50 ms of work, so the clock's resolution does not matter
                probe = summarize(time_calls({"k": lambda: cpu_gemm.dense_linear(x, panels)}, 1)["k"])
                n = max(1, min(200, int(0.05 / max(probe["median_cpu_seconds"], 1e-6))))
                calls = {"onednn": lambda x=x: [cpu_gemm.dense_linear(x, packed) for _ in range(n)],
                         "kernel": lambda x=x: [cpu_gemm.dense_linear(x, panels) for _ in range(n)]}
                runs = time_calls(calls, args.repeats)
                loads += [t.loadavg for ts in runs.values() for t in ts]
                s = {key: summarize(ts) for key, ts in runs.items()}
                ms = {key: s[key]["median_cpu_seconds"] / n * 1e3 for key in s}
                wall = {key: s[key]["median_seconds"] / n * 1e3 for key in s}
                nbytes = n_out * k_in * w.element_size()
                case = dict(shape=name, rows=m, in_features=k_in, out_features=n_out, weight_bytes=nbytes,
                            onednn_ms=ms["onednn"], kernel_ms=ms["kernel"], speedup=ms["onednn"] / ms["kernel"],
                            onednn_wall_ms=wall["onednn"], kernel_wall_ms=wall["kernel"],
                            onednn_gb_s=nbytes / ms["onednn"] / 1e6, kernel_gb_s=nbytes / ms["kernel"] / 1e6,
                            max_abs_diff=diff, calls_per_timing=n, timings=s)
                if bw:
                    case.update(onednn_of_bw=case["onednn_gb_s"] * 1e9 / bw, kernel_of_bw=case["kernel_gb_s"] * 1e9 / bw)
                cases[f"{name}, {m} rows"] = case
                print(f"{name} {m} rows: oneDNN {ms['onednn']:.3f} ms ({case['onednn_gb_s']:.1f} GB/s) | kernel "
                      f"{ms['kernel']:.3f} ms ({case['kernel_gb_s']:.1f} GB/s) | {case['speedup']:.2f}x", flush=True)
    return dict(repeats=args.repeats, isa=kernel_isa(), dtype=args.dtype,
                table_key=cpu_gemm.table_key(dtype), bandwidth_1t=bw, cases=cases,
                peak_loadavg_1m=peak_loadavg(loads))


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per shape for cpu_gemm_table.json: {"name", "in", "out", "ms": {rows: [kernel,
    oneDNN]}, "gemm": the rule's choice}."""
    rows: dict[str, dict[str, Any]] = {}
    for c in result["cases"].values():
        r = rows.setdefault(c["shape"], dict(name=c["shape"], **{"in": c["in_features"], "out": c["out_features"]}, ms={}))
        r["ms"][str(c["rows"])] = [round(c["kernel_ms"], 4), round(c["onednn_ms"], 4)]
    for r in rows.values():
        r["gemm"] = cpu_gemm.table_choice(r)
    return list(rows.values())


def write_table(result: dict[str, Any]) -> None:
    try:
        table = json.loads(cpu_gemm.TABLE_PATH.read_text())
    except OSError:
        table = dict(shapes={})
    table["about"] = ("Measured by `python -m benchmarks.decode_linear --write-table` (one thread, "
                      "median process CPU time per call): [decode_linear ms, oneDNN packed ms] per "
                      "row count; `gemm` is cpu_gemm.table_choice's pick. Read by cpu_gemm.choose_gemm.")
    key = result.get("table_key", result["isa"])
    table.setdefault("machine", {})[key] = dict(
        cpu=machine_short(result["machine"]), date=result["date"][:10], peak_loadavg_1m=result["peak_loadavg_1m"])
    table["shapes"][key] = table_rows(result)
    cpu_gemm.TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {cpu_gemm.TABLE_PATH}")


def render_markdown(result: dict[str, Any]) -> str:
    caption = (f"Each linear alone, {result.get('dtype', 'float32')} weights, oneDNN on its packed weight "
               f"(before; bf16 without oneDNN bf16 kernels: `F.linear`) against `decode_linear` on its "
               f"panels (after), {result['isa']} path, process CPU time per call, median of {result['repeats']} "
               f"interleaved repeats: `{result['command']}` on {machine_short(result['machine'])}, "
               f"{result['date'][:10]}. GB/s = weight bytes / time")
    caption += (f"; % = of the measured one-thread read bandwidth ({result['bandwidth_1t'] / 1e9:.1f} GB/s, "
                "benchmarks.roofline)." if result.get("bandwidth_1t") else ".")
    lines = [caption + shared_machine_note(result), "",
             "| shape (in -> out) | rows | oneDNN ms | GB/s | ours ms | GB/s | speed-up |",
             "|:--|--:|--:|--:|--:|--:|--:|"]
    for c in result["cases"].values():
        pct = lambda key: f" ({100 * c[key]:.0f}%)" if key in c else ""  # noqa: E731
        lines.append(f"| {c['shape']} ({c['in_features']} -> {c['out_features']}) | {c['rows']} | "
                     f"{c['onednn_ms']:.3f} | {c['onednn_gb_s']:.1f}{pct('onednn_of_bw')} | {c['kernel_ms']:.3f} | "
                     f"{c['kernel_gb_s']:.1f}{pct('kernel_of_bw')} | {c['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--write-table", action="store_true",
                       help="also write cpu_gemm_table.json's rows for this ISA path and dtype")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="weight and activation dtype (default float32)")

    def name(args: argparse.Namespace, result: dict[str, Any]) -> str:
        return ("decode_linear_cpu" + ("_avx2" if kernel_isa() == "avx2" else "")  # forced or an AVX2-only CPU
                + ("_bf16" if args.dtype == "bfloat16" else ""))

    def written(args: argparse.Namespace, result: dict[str, Any], out_name: str) -> None:
        if args.write_table:
            write_table(result)

    bench_main("benchmarks.decode_linear", __doc__, argv, run, render_markdown, name=name, repeats=5,
               options=options, written=written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
