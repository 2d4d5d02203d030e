"""One mixture-of-experts layer of Qwen3-30B-A3B's shapes: the C++ kernel (`fused_experts_cpu`)
and the torch grouped path (`fused_experts`) against the reference loop (`moe_reference`), and
against a per-(token, expert) loop.

    python -m benchmarks.moe_layer             # ~3-5 minutes, 2.4 GB of weights; writes moe_layer_cpu.{json,md}
    python -m benchmarks.moe_layer --dtype bfloat16    # writes moe_layer_cpu_bf16.{json,md}
    python -m benchmarks.moe_layer --quick     # 16 experts, printed only

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
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = dict(QWEN3_30B_A3B)
    if args.quick:
        shape.update(num_experts=16)
    E, k, H, inter = shape["num_experts"], shape["top_k"], shape["hidden"], shape["inter"]
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, H, generator=gen) * 0.02).to(dtype)  # [E, 2I, H]
    w2 = (torch.randn(E, H, inter, generator=gen) * 0.02).to(dtype)  # [E, H, I]
    router = torch.randn(E, H, generator=gen) * 0.02
    with weight_packing(True):
        w13_packed = [pack_weight(w13[e]) for e in range(E)]
        w2_packed = [pack_weight(w2[e]) for e in range(E)]
        kernel_weights = prepack_moe_weight(w13, w2)
    if any(w is None for w in w13_packed) or kernel_weights is None:
        raise SystemExit(f"oneDNN cannot pack {dtype} weights here, or the kernels do not build: "
                         "the rows would not be the engine's paths")
    w13p, w2p = kernel_weights
    act = SiluAndMul()
    act.use_kernel(True)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    cases: dict[str, int] = {"decode 1": 1, "decode 16": 16, "prefill 64": 64, "prefill 1024": 1024}
    rows = []
    loads = []
    for case, tokens in cases.items():
        x = torch.randn(tokens, H, generator=gen)
        weights, ids = fused_topk(x @ router.T, k, shape["norm_topk_prob"])
        x = x.to(dtype)
        touched = moe_align(ids, weights, E).num_experts_touched
        calls: dict[str, Callable[[], Any]] = {
            "kernel": lambda: fused_experts_cpu(x, w13p, w2p, weights, ids, inter),
            "fused": lambda: fused_experts(x, w13_packed, w2_packed, weights, ids, act=act),
            "fused-plain": lambda: fused_experts(x, w13, w2, weights, ids),
        }
        if case != "prefill 64":  # that case is only there to time per-pair on a prefill
            calls["reference"] = lambda: moe_reference(x, w13, w2, weights, ids)
        if tokens <= 64:
            calls["per-pair"] = lambda: per_pair(x, w13, w2, weights, ids)
        outs = {name: fn() for name, fn in calls.items()}
        err = max((outs[n].float() - outs["kernel"].float()).abs().max().item() for n in outs)
        timings = time_calls(calls, args.repeats)
        summary = {name: summarize(t) for name, t in timings.items()}
        loads += [x for t in timings.values() for x in (t_.loadavg for t_ in t)]
        rows.append(dict(case=case, tokens=tokens, pairs=tokens * k, experts_touched=touched,
                         weight_bytes_touched=touched * expert_bytes, max_abs_diff=err, paths=summary))
        print(f"{case}: " + ", ".join(f"{n} {s['median_seconds'] * 1e3:.1f} ms" for n, s in summary.items()),
              flush=True)
    return dict(shape=shape, dtype=args.dtype, expert_bytes=expert_bytes, rows=rows, peak_loadavg_1m=peak_loadavg(loads))


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def render_markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    lines = [
        f"One MoE layer, {shape['num_experts']} experts, top-{shape['top_k']}, hidden {shape['hidden']:,}, "
        f"expert intermediate {shape['inter']}, {result.get('dtype', 'float32')}, "
        f"{result['machine'].get('torch_threads', 1)} thread, "
        f"median of {result['repeats']} interleaved repeats ({machine_short(result['machine'])}). "
        "Time in ms, wall (process CPU time in brackets)." + shared_machine_note(result),
        "",
        "| case | tokens | experts touched | weights read (GB) | kernel | fused (torch, oneDNN-packed) "
        "| fused, plain weights | reference loop | per-pair loop | reference / kernel | fused / kernel "
        "| reference / fused | per-pair / kernel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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

        lines.append(f"| {row['case']} | {row['tokens']:,} | {row['experts_touched']} | "
                     f"{row['weight_bytes_touched'] / 1e9:.2f} | {cell('kernel')} | {cell('fused')} | "
                     f"{cell('fused-plain')} | {cell('reference')} | {cell('per-pair')} | {ratio('reference')} | "
                     f"{ratio('fused')} | {ratio('reference', 'fused')} | {ratio('per-pair')} |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def main(argv: list[str] | None = None) -> None:
    bench_main("benchmarks.moe_layer", __doc__, argv, run, render_markdown, repeats=5, options=add_options,
               name=lambda args, _: "moe_layer_cpu" + ("" if args.dtype == "float32" else "_bf16"))


if __name__ == "__main__":
    main()
