"""Each CPU fast path of `custom_ops="all"` against the torch code it replaces, alone, one thread.

    python -m benchmarks.kernels_cpu              # ~3 minutes; writes perf_kernels_cpu.{json,md}
    python -m benchmarks.kernels_cpu --quick      # fewer repeats, nothing written
    FOLOVLLM_CPU_ISA=avx2 python -m benchmarks.kernels_cpu   # the AVX2 path (portable kernels,
                                                  # oneDNN capped at AVX2): perf_kernels_cpu_avx2

Shapes are the bench model's (hidden 512, 8/4 heads of 64, intermediate 1,536) and Qwen3-0.6B's
(hidden 1,024, 16/8 heads of 128, intermediate 3,072), float32:

    attention decode    16 sequences x 256 cached tokens (bench), 8 x 256 and 16 x 1,024 (Qwen3),
                        blocks in random order: `sdpa` (gather + SDPA) vs `cpu_attn` (in place)
    attention prefill   one prompt of 512 / 1,024 tokens: SDPA's flash kernel vs ours
    rms_norm + add, q/k norm + rope, silu_and_mul
                        16 and 512 tokens: the layer's forward_native vs forward_cpu
    linear              oneDNN matmul on the plain weight vs the weight packed by
                        `pack_linear_weight`, at 1-512 rows

Each row: median over interleaved repeats of the time per call (process CPU time; the machine
is shared), the speed-up, and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls
from benchmarks.results import machine_short, shared_machine_note
from folovllm import envs
from folovllm.model_executor.attention_backends import get_attn_backend
from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm.model_executor.layers.layernorm import RMSNorm
from folovllm.model_executor.layers.cpu_gemm import PACK_BATCH, dense_linear
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from tests.attention_utils import Batch, random_paged_batch, run_backend

SHAPES = {  # hidden, heads, kv_heads, head_dim, intermediate
    "bench": (512, 8, 4, 64, 1536),
    "qwen3-0.6b": (1024, 16, 8, 128, 3072),
}


def cases(quick: bool) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (torch path, fast path): two calls computing the same thing."""
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    sdpa, cpu_attn = get_attn_backend("sdpa"), get_attn_backend("cpu_attn")
    for model, (hidden, hq, hkv, d, inter) in SHAPES.items():
        decodes = [(16, 256)] if model == "bench" else [(8, 256), (16, 1024)]
        for seqs, ctx in decodes:
            batch = Batch((1,) * seqs, (ctx,) * seqs, hq, hkv, d, 16)
            out[f"{model} attention decode {seqs}x{ctx}"] = _attention(batch, sdpa, cpu_attn)
        for n in (512,) if quick else (512, 1024):
            out[f"{model} attention prefill {n}"] = _attention(Batch((n,), (n,), hq, hkv, d, 16), sdpa, cpu_attn)
        for tokens in (16, 512):
            norm = RMSNorm(hidden)
            x, res = torch.randn(tokens, hidden), torch.randn(tokens, hidden)
            # the kernel works in place: both paths copy the inputs into the same two buffers
            # first (fresh clones would time the allocator's page faults, not the op)
            xb, rb = torch.empty_like(x), torch.empty_like(res)

            def add_norm(path: str, norm=norm, x=x, res=res, xb=xb, rb=rb):
                xb.copy_(x)
                rb.copy_(res)
                return getattr(norm, f"forward_{path}")(xb, rb)
            out[f"{model} add + rms_norm, {tokens} tokens"] = (
                lambda f=add_norm: f("native"), lambda f=add_norm: f("cpu"))
            qkv = torch.randn(tokens, (hq + 2 * hkv) * d)
            q_norm, k_norm, rope = RMSNorm(d), RMSNorm(d), RotaryEmbedding(d, 4096, 1e6)
            positions = torch.arange(tokens) + 100

            def qk(path: str, qkv=qkv, q_norm=q_norm, k_norm=k_norm, rope=rope, positions=positions,
                   hq=hq, hkv=hkv, d=d):
                q = qkv[:, : hq * d].view(-1, hq, d)
                k = qkv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d)
                f = (lambda m, *a: getattr(m, f"forward_{path}")(*a))
                return f(rope, positions, f(q_norm, q), f(k_norm, k))
            out[f"{model} q/k norm + rope, {tokens} tokens"] = (lambda qk=qk: qk("native"), lambda qk=qk: qk("cpu"))
            act, gate_up = SiluAndMul(), torch.randn(tokens, 2 * inter)
            out[f"{model} silu_and_mul, {tokens} tokens"] = (
                lambda act=act, g=gate_up: act.forward_native(g), lambda act=act, g=gate_up: act.forward_cpu(g))
        for k_in, n_out in ((hidden, 2 * inter), (inter, hidden)):
            w = torch.randn(n_out, k_in)
            with torch.inference_mode():
                packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH)
            for rows in (1, 4, 16) if quick else (1, 2, 4, 16, 48, 128, 512):
                x = torch.randn(rows, k_in)
                out[f"{model} linear {k_in}->{n_out}, {rows} rows"] = (
                    lambda x=x, w=w: dense_linear(x, w), lambda x=x, p=packed: dense_linear(x, p))
    return out


def _attention(batch: Batch, sdpa: Any, cpu_attn: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    q, key_cache, value_cache, md = random_paged_batch(batch, seed=0)
    scale = batch.head_dim**-0.5

    def call(backend: Any) -> torch.Tensor:  # a step of one layer: its metadata, its forward
        return run_backend(backend, q, key_cache, value_cache, md, scale)
    return (lambda: call(sdpa)), (lambda: call(cpu_attn))


def _max_diff(a: Any, b: Any) -> float:
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    return (a.float() - b.float()).abs().max().item()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    if args.quick:
        args.repeats = 3
    rows, loads = {}, []
    with torch.inference_mode():
        for name, (native, fast) in cases(args.quick).items():
            # enough calls per timing for ~20 ms, so the clock's resolution does not matter
            probe = summarize(time_calls({"x": fast}, 1)["x"])["median_cpu_seconds"]
            n = max(1, min(200, int(0.02 / max(probe, 1e-6))))
            loop = {k: (lambda f=f: [f() for _ in range(n)]) for k, f in (("torch", native), ("fast", fast))}
            runs = time_calls(loop, args.repeats)
            loads += [t.loadavg for ts in runs.values() for t in ts]
            s = {k: summarize(ts) for k, ts in runs.items()}
            torch_ms = s["torch"]["median_cpu_seconds"] / n * 1e3
            fast_ms = s["fast"]["median_cpu_seconds"] / n * 1e3
            rows[name] = dict(torch_ms=torch_ms, fast_ms=fast_ms, speedup=torch_ms / fast_ms,
                              calls_per_timing=n, max_abs_diff=_max_diff(native(), fast()),
                              torch=s["torch"], fast=s["fast"])
            print(f"{name}: {torch_ms:.3f} -> {fast_ms:.3f} ms ({torch_ms / fast_ms:.2f}x)", flush=True)
    return dict(repeats=args.repeats, cases=rows, peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    caption = (f"Each CPU fast path against the torch code it replaces, alone (process CPU time per "
               f"call, median of {result['repeats']} interleaved repeats): `{result['command']}` on "
               f"{machine_short(result['machine'])}, {result['date'][:10]}.")
    lines = [caption + shared_machine_note(result), "",
             "| case | torch path, ms | fast path, ms | speed-up | max abs diff |", "|:--|--:|--:|--:|--:|"]
    for name, r in result["cases"].items():
        lines.append(f"| {name} | {r['torch_ms']:.3f} | {r['fast_ms']:.3f} | {r['speedup']:.2f}x "
                     f"| {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    def name(args: argparse.Namespace, result: dict[str, Any]) -> str:
        return "perf_kernels_cpu" + ("_avx2" if envs.cpu_isa() == "avx2" else "")

    bench_main("benchmarks.kernels_cpu", __doc__, argv, run, render_markdown, name=name, repeats=7)
    return 0


if __name__ == "__main__":
    sys.exit(main())
