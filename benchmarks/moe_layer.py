"""One mixture-of-experts layer of Qwen3-30B-A3B's shapes: the C++ kernel (`fused_experts_cpu`)
and the torch grouped path (`fused_experts`) against the reference loop (`moe_reference`), and
against a per-(token, expert) loop.

    python -m benchmarks.moe_layer             # ~3-5 minutes; writes moe_layer_cpu.{json,md}
    python -m benchmarks.moe_layer --dtype bfloat16    # writes moe_layer_cpu_bf16.{json,md}
    python -m benchmarks.moe_layer --quick     # 16 experts, printed only
    python -m benchmarks.moe_layer --paths kernel,reference --name moe_layer_avx2_cpu
                                               # some paths only: one or two copies of the layer

Memory: each path holds its own copy of the layer's weights (2.4 GB in float32, 1.2 GB in
bfloat16): the kernel's panels, oneDNN's blocked experts ("fused"), the plain stacked tensors
("fused-plain", "reference", "per-pair" share one). All five in float32 need about 7.5 GB;
`--paths` keeps what a run times. oneDNN packs bfloat16 weights only where the CPU has
AVX512-BF16: elsewhere (AVX2) "fused" is refused and "fused-plain" is the torch path.

Before the weights, the run measures this machine's limits at its threads (`machine_limits`:
a 1 GiB float32 sum for the read bandwidth, a 2,048^3 float32 matmul for the GEMM rate), and
the table gives the kernel's GB/s (weights read / its CPU time) and GFLOP/s against them.

Shapes: 128 experts, top-8, hidden 2,048, expert intermediate 768 (w13 [128, 1536, 2048], w2
[128, 2048, 768]: 2.4 GB in float32), random weights and a random router (routing close to
uniform, as a trained router's load balancing aims for), float32 (or `--dtype bfloat16`), one
thread. Cases:

    decode 1, decode 16      one and sixteen tokens (a decode step's batch)
    prefill 1024             one 1,024-token prompt

Paths, each given the same router output:

    kernel      fused_experts_cpu: the whole layer in one C++ call (csrc/cpu/moe.cpp) on the
                weights re-laid in its panels; the engine's path with custom_ops="all"
    fused       fused_experts: sort pairs by expert, one gate|up GEMM + SiLU·mul + one down GEMM
                per touched expert, index_add_ back; each expert's weights packed in oneDNN's
                layout, the SiLU·mul our kernel (the engine's path before the kernel)
    fused-plain the same on the stacked, unpacked weights, SiLU·mul in torch (custom_ops="none")
    reference   moe_reference: loop over the 128 experts, torch.where for each one's tokens,
                gate / up / down as three matmuls (HF transformers' eager loop)
    per-pair    for each token, for each of its 8 experts, the expert's MLP on that one token
                (timed at decode 16 and on a 64-token prefill only: at 1,024 tokens it would
                re-read 8,192 experts' weights, ~150 GB)

Each row: median over interleaved repeats (wall and process CPU time; the machine is shared), the
experts the batch touched, the weight bytes those experts hold (each is read once by the grouped
path), and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls, timed
from benchmarks.roofline import GEMM_N, GIB
from benchmarks.results import machine_short, shared_machine_note
from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm.model_executor.layers.cpu_gemm import pack_weight, weight_packing
from folovllm.model_executor.layers.fused_moe import (
    fused_experts,
    fused_experts_cpu,
    fused_topk,
    moe_align,
    moe_reference,
    prepack_moe_weight,
)

# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B)
QWEN3_30B_A3B = dict(num_experts=128, top_k=8, hidden=2048, inter=768, layers=48, heads=32, kv_heads=4,
                     head_dim=128, vocab=151_936, norm_topk_prob=True)


def per_pair(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
             ids: torch.Tensor) -> torch.Tensor:
    """The loop nobody should write: every (token, slot) runs its expert alone (a GEMV that reads
    the expert's whole weights for one token)."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])
            out[t] += weights[t, j] * (w2[e] @ h)
    return out


PATHS = ("kernel", "fused", "fused-plain", "reference", "per-pair")
CASES = {1: "decode 1", 16: "decode 16", 64: "prefill 64", 1024: "prefill 1024"}


def case_name(tokens: int) -> str:
    return CASES.get(tokens, f"{'decode' if tokens <= 16 else 'prefill'} {tokens}")


def machine_limits(repeats: int, threads: int, gib: float) -> dict[str, Any]:
    """This machine's read bandwidth (a `gib` GiB float32 sum: one sequential pass) and float32
    GEMM FLOP/s (a 2,048^3 matmul), at `threads`, from CPU time per thread (roofline.py's
    measures, float32 only: a bfloat16 matmul without AVX512-BF16 takes minutes)."""
    x = torch.ones(int(gib * GIB) // 4)
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    with torch.inference_mode():
        runs = {"sum": [timed(x.sum) for _ in range(repeats + 1)][1:],
                "gemm": [timed(lambda: a @ b) for _ in range(repeats + 1)][1:]}
    cpu = {name: statistics.median(t.cpu_seconds for t in r) / threads for name, r in runs.items()}
    return dict(bandwidth={str(threads): x.numel() * 4 / cpu["sum"]},
                gemm={"float32": {str(threads): 2 * GEMM_N**3 / cpu["gemm"]}},
                peak_loadavg_1m=peak_loadavg(t.loadavg for r in runs.values() for t in r))


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = dict(QWEN3_30B_A3B)
    if args.quick:
        shape.update(num_experts=16)
    E, k, H, inter = shape["num_experts"], shape["top_k"], shape["hidden"], shape["inter"]
    paths = [p.strip() for p in args.paths.split(",")]
    if unknown := set(paths) - set(PATHS):
        raise SystemExit(f"--paths: unknown {sorted(unknown)}; known: {', '.join(PATHS)}")
    tokens_list = [int(t) for t in args.cases.split(",")]
    # The machine's limits first, before the weights take the memory: read bandwidth (a 1 GiB
    # sum) and a float32 GEMM's FLOP/s, at this run's threads (benchmarks/roofline.py).
    limits = None if args.no_limits else machine_limits(args.repeats, args.threads, gib=0.25 if args.quick else 1.0)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(E, H, generator=gen) * 0.02

    def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's random w13 [2I, H] and w2 [H, I], the same whichever copies are built."""
        g = torch.Generator().manual_seed(1 + e)
        return ((torch.randn(2 * inter, H, generator=g) * 0.02).to(dtype),
                (torch.randn(H, inter, generator=g) * 0.02).to(dtype))

    # Each layout is built expert by expert, so the process holds only the copies its paths time
    # (float32: 2.4 GB each): the kernel's panels, oneDNN's blocked experts, the plain stacked ones.
    plain = bool({"fused-plain", "reference", "per-pair"} & set(paths))
    w13 = torch.empty(E if plain else 0, 2 * inter, H, dtype=dtype)  # [E, 2I, H]
    w2 = torch.empty(E if plain else 0, H, inter, dtype=dtype)  # [E, H, I]
    w13p = w2p = None
    w13_packed, w2_packed = [], []
    with weight_packing(True):
        for e in range(E):
            a, b = expert(e)
            if plain:
                w13[e], w2[e] = a, b
            if "kernel" in paths:
                packed = prepack_moe_weight(a[None], b[None])
                if packed is None:
                    raise SystemExit("the kernels do not build here: the rows would not be the engine's paths")
                if w13p is None:
                    w13p = torch.empty((E,) + packed[0].shape[1:], dtype=dtype)
                    w2p = torch.empty((E,) + packed[1].shape[1:], dtype=dtype)
                w13p[e], w2p[e] = packed[0][0], packed[1][0]
            if "fused" in paths:
                w13_packed.append(pack_weight(a))
                w2_packed.append(pack_weight(b))
                if w13_packed[-1] is None:
                    raise SystemExit(f"oneDNN cannot pack {dtype} weights here: the rows would not be the engine's")
    expert_bytes = (2 * inter * H + H * inter) * torch.empty(0, dtype=dtype).element_size()
    act = SiluAndMul()
    act.use_kernel(True)
    rows = []
    loads = []
    for tokens in tokens_list:
        case = case_name(tokens)
        x = torch.randn(tokens, H, generator=gen)
        weights, ids = fused_topk(x @ router.T, k, shape["norm_topk_prob"])
        x = x.to(dtype)
        touched = moe_align(ids, weights, E).num_experts_touched
        every: dict[str, Callable[[], Any]] = {
            "kernel": lambda: fused_experts_cpu(x, w13p, w2p, weights, ids, inter),
            "fused": lambda: fused_experts(x, w13_packed, w2_packed, weights, ids, act=act),
            "fused-plain": lambda: fused_experts(x, w13, w2, weights, ids),
            "reference": lambda: moe_reference(x, w13, w2, weights, ids),
            "per-pair": lambda: per_pair(x, w13, w2, weights, ids),
        }
        # per-pair re-reads an expert for every pair: timed up to 64 tokens (at 1,024 it would
        # read ~150 GB); the reference loop skips the 64-token case (there only for per-pair)
        calls = {name: fn for name, fn in every.items() if name in paths
                 and not (name == "per-pair" and tokens > 64)
                 and not (name == "reference" and tokens == 64 and "per-pair" in paths)}
        outs = {name: fn() for name, fn in calls.items()}
        first = next(iter(outs.values()))
        err = max((o.float() - first.float()).abs().max().item() for o in outs.values())
        timings = time_calls(calls, args.repeats)
        summary = {name: summarize(t) for name, t in timings.items()}
        loads += [x for t in timings.values() for x in (t_.loadavg for t_ in t)]
        rows.append(dict(case=case, tokens=tokens, pairs=tokens * k, experts_touched=touched,
                         weight_bytes_touched=touched * expert_bytes,
                         flops=2 * 3 * H * inter * tokens * k, max_abs_diff=err, paths=summary))
        print(f"{case}: " + ", ".join(f"{n} {s['median_seconds'] * 1e3:.1f} ms ({s['median_cpu_seconds'] * 1e3:.1f} cpu)"
                                      for n, s in summary.items()), flush=True)
    return dict(shape=shape, dtype=args.dtype, expert_bytes=expert_bytes, rows=rows, limits=limits,
                peak_loadavg_1m=peak_loadavg(loads + [(limits or {}).get("peak_loadavg_1m")]))


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def render_markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    limits = result.get("limits")
    t = str(result["machine"].get("torch_threads", 1))
    bw = limits["bandwidth"].get(t) if limits else None
    peak = limits["gemm"]["float32"].get(t) if limits else None
    lines = [
        f"One MoE layer, {shape['num_experts']} experts, top-{shape['top_k']}, hidden {shape['hidden']:,}, "
        f"expert intermediate {shape['inter']}, {result.get('dtype', 'float32')}, "
        f"{result['machine'].get('torch_threads', 1)} thread, "
        f"median of {result['repeats']} interleaved repeats ({machine_short(result['machine'])}). "
        "Time in ms, wall (process CPU time in brackets)." + shared_machine_note(result),
    ]
    if bw and peak:
        lines[-1] += (f" This machine, same run: read bandwidth {bw / 1e9:.1f} GB/s (a 1 GiB sum), float32 GEMM "
                      f"{peak / 1e9:.0f} GFLOP/s (2,048^3 matmul); the kernel's rates below are from its CPU time.")
    paths = [p for p in PATHS if any(p in row["paths"] for row in result["rows"])]
    titles = {"kernel": "kernel", "fused": "fused (torch, oneDNN-packed)", "fused-plain": "fused, plain weights",
              "reference": "reference loop", "per-pair": "per-pair loop"}
    ratios = [(n, b) for n, b in (("reference", "kernel"), ("fused", "kernel"), ("reference", "fused"),
                                  ("per-pair", "kernel")) if n in paths and b in paths]
    lines += [
        "",
        "| case | tokens | experts touched | weights read (GB) | " + " | ".join(titles[p] for p in paths)
        + "".join(f" | {n} / {b}" for n, b in ratios)
        + (" | kernel GB/s | kernel GFLOP/s" if "kernel" in paths else "") + " |",
        "|---|---:|---:|---:|" + "---:|" * (len(paths) + len(ratios) + (2 if "kernel" in paths else 0)),
    ]
    for row in result["rows"]:
        p = row["paths"]

        def cell(name: str) -> str:
            if name not in p:
                return "-"
            return f"{_ms(p[name]['median_seconds'])} ({_ms(p[name]['median_cpu_seconds'])})"

        def ratio(name: str, base: str = "kernel") -> str:
            if name not in p or base not in p:
                return "-"
            b = p[base]
            return (f"{p[name]['median_seconds'] / b['median_seconds']:.2f}x "
                    f"({p[name]['median_cpu_seconds'] / b['median_cpu_seconds']:.2f}x)")

        def rate(value: float, limit: Optional[float]) -> str:
            return f"{value / 1e9:.1f}" + (f" ({value / limit:.0%})" if limit else "")

        rates = ""
        if "kernel" in p:
            cpu = p["kernel"]["median_cpu_seconds"]
            flops = row.get("flops", 2 * 3 * shape["hidden"] * shape["inter"] * row["pairs"])
            rates = f" | {rate(row['weight_bytes_touched'] / cpu, bw)} | {rate(flops / cpu, peak)}"
        lines.append(f"| {row['case']} | {row['tokens']:,} | {row['experts_touched']} | "
                     f"{row['weight_bytes_touched'] / 1e9:.2f} | " + " | ".join(cell(n) for n in paths)
                     + "".join(f" | {ratio(n, b)}" for n, b in ratios) + rates + " |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma-separated, of {', '.join(PATHS)} (default all; float32 needs ~7.5 GB with "
                        "all, ~2.5 GB per copy of the layer: kernel panels, oneDNN's, the plain stacked)")
    p.add_argument("--cases", default=",".join(map(str, CASES)),
                   help="comma-separated token counts (default 1,16,64,1024)")
    p.add_argument("--no-limits", action="store_true",
                   help="skip measuring the machine's read bandwidth and GEMM FLOP/s")


def main(argv: list[str] | None = None) -> None:
    bench_main("benchmarks.moe_layer", __doc__, argv, run, render_markdown, repeats=5, options=add_options,
               name=lambda args, _: "moe_layer_cpu" + ("" if args.dtype == "float32" else "_bf16"))


if __name__ == "__main__":
    main()
