"""Stage 04 on CPU: the attention backends alone, side by side, on one thread.

    python -m benchmarks.attention_cpu                 # full run, ~10 minutes on a busy 2-core box
    python -m benchmarks.attention_cpu --quick         # smoke run (small shapes, not written)

Workloads (Qwen3-0.6B's attention heads: Hq = 16, Hkv = 8, head_dim 128; float32; block_size
16, each sequence's blocks scattered over the pool in random order, as after some churn):

    prefill N      one sequence, N new tokens, no cached context (N = 512, 1024, 2048, 4096)
    decode         16 sequences x 1024 tokens of context, one new token each

For each backend (`naive`, `torch_flash`, `sdpa`): one untimed warm-up, then `--repeats` runs
interleaved across backends; the median wall time (and process CPU time, steadier on a shared
machine), the speed-up over `naive` (wall time, and CPU time in brackets), the largest tensor
the backend's forward allocates (recorded by `largest_allocation` of `tests/attention_utils.py`,
the same proxy the tests assert; the attention intermediate whose size decides peak memory) and
the largest difference from `naive`'s output.

A second table times the choices made inside `sdpa` (GQA through `enable_gqa` or by repeating
K/V; decodes one SDPA call per sequence, 1 MiB or 8 MiB of gathered K per call, or all in one call).

Writes `benchmarks/results/stage04_attention_cpu.json` (machine, every repeat) and `.md` (a
one-line caption and the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls
from benchmarks.results import machine_short, shared_machine_note
from folovllm.model_executor.attention_backends import get_attn_backend
from folovllm.model_executor.attention_backends.sdpa import SDPAAttentionBackend

BACKENDS = ("naive", "torch_flash", "sdpa")


import tests.attention_utils as helpers  # noqa: E402  (the same proxy the tests assert)


def workloads(quick: bool) -> dict[str, Any]:
    """name -> Batch. Quick: the same kinds, small enough for a smoke run."""
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 16
    Batch = helpers.Batch
    prefills = (128, 256) if quick else (512, 1024, 2048, 4096)
    out = {f"prefill {n}": Batch((n,), (n,), heads, kv_heads, head_dim, block_size)
           for n in prefills}
    num_seqs, context = (4, 256) if quick else (16, 1024)
    out[f"decode {num_seqs}x{context}"] = Batch(
        (1,) * num_seqs, (context,) * num_seqs, heads, kv_heads, head_dim, block_size)
    return out


@contextlib.contextmanager
def gqa_by_repeat() -> Iterator[None]:
    """Make SDPA see as many KV heads as query heads (repeat_interleave) instead of enable_gqa."""
    original = F.scaled_dot_product_attention

    def repeat_kv(q, k, v, *args, enable_gqa: bool = False, **kwargs):
        group = q.shape[-3] // k.shape[-3]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = repeat_kv
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def layer(backend: Any, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
          md: Any, scale: float) -> Callable[[], torch.Tensor]:
    """One layer's forward: its metadata is built once for the step, outside the timing (the
    model runner builds it once for every layer)."""
    backend_md = backend.build_metadata(md, key_cache)
    return lambda: backend.forward(q, key_cache, value_cache, backend_md, scale)


def bench(calls: dict[str, Callable[[], Any]], repeats: int, loads: list) -> dict[str, dict[str, Any]]:
    """`harness.time_calls`, summarized per system; the load averages seen go to `loads`."""
    runs = time_calls(calls, repeats)
    loads += [t.loadavg for ts in runs.values() for t in ts]
    return {name: summarize(ts) for name, ts in runs.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    design: dict[str, Any] = {}
    loads = []
    for name, batch in workloads(args.quick).items():
        q, key_cache, value_cache, md = helpers.random_paged_batch(batch, torch.float32, seed=0)
        scale = batch.head_dim**-0.5
        backends = {b: get_attn_backend(b) for b in BACKENDS}
        call = {b: layer(be, q, key_cache, value_cache, md, scale) for b, be in backends.items()}
        ref = call["naive"]()
        rows: dict[str, Any] = {}
        for b in BACKENDS:
            largest = helpers.largest_allocation(call[b])
            rows[b] = dict(
                largest_allocation=dict(op=largest.op, shape=list(largest.shape),
                                        dtype=str(largest.dtype), mib=largest.nbytes / 2**20),
                max_abs_err_vs_naive=(call[b]() - ref).abs().max().item(),
            )
        timings = bench(call, args.repeats, loads)
        for b in BACKENDS:
            rows[b].update(timings[b])
            rows[b]["speedup_vs_naive"] = (
                timings["naive"]["median_seconds"] / timings[b]["median_seconds"])
            rows[b]["cpu_speedup_vs_naive"] = (
                timings["naive"]["median_cpu_seconds"] / timings[b]["median_cpu_seconds"])
        results[name] = rows
        print(name, {b: f"{rows[b]['median_seconds'] * 1e3:.1f} ms" for b in BACKENDS}, flush=True)

        # Choices inside sdpa, on the workloads they matter for.
        variants: dict[str, Callable[[], torch.Tensor]] = {"sdpa (as shipped)": call["sdpa"]}

        def with_repeat() -> torch.Tensor:
            with gqa_by_repeat():
                return call["sdpa"]()

        variants["GQA by repeat_interleave"] = with_repeat
        if name.startswith("decode"):
            for label, chunk in (("decodes: one call per sequence", 1),
                                 ("decodes: 8 MiB of K per call", 8 << 20),
                                 ("decodes: all in one call", 1 << 40)):
                be = SDPAAttentionBackend(decode_chunk_bytes=chunk)
                variants[label] = layer(be, q, key_cache, value_cache, md, scale)
        for label, fn in variants.items():
            assert torch.allclose(fn(), ref, atol=1e-4), label
        design[name] = bench(variants, args.repeats, loads)
        print("  sdpa variants", {k: f"{v['median_seconds'] * 1e3:.1f} ms"
                                  for k, v in design[name].items()}, flush=True)
    return dict(workloads=results, sdpa_design=design, peak_loadavg_1m=peak_loadavg(loads))


def _shape(alloc: dict[str, Any]) -> str:
    return f"{alloc['mib']:.1f} MiB `[{', '.join(map(str, alloc['shape']))}]`"


def render_markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    caption = (
        f"Stage 04 attention backends alone on CPU (Hq 16, Hkv 8, head_dim 128, float32, "
        f"block_size 16, blocks in random order; median of {result['repeats']} interleaved runs): "
        f"`{result['command']}` on {machine_short(machine)}, {result['date'][:10]}."
    )
    lines = [caption + shared_machine_note(result), "",
             "| workload | backend | median ms (min–max) | CPU ms | × naive "
             "| largest tensor allocated | max abs err vs naive |",
             "|:--|:--|--:|--:|--:|:--|--:|"]
    for name, rows in result["workloads"].items():
        for b, r in rows.items():
            lines.append(
                f"| {name} | `{b}` | {r['median_seconds'] * 1e3:.1f} "
                f"({min(r['seconds']) * 1e3:.1f}–{max(r['seconds']) * 1e3:.1f}) "
                f"| {r['median_cpu_seconds'] * 1e3:.1f} | {r['speedup_vs_naive']:.2f} "
                f"(CPU {r['cpu_speedup_vs_naive']:.2f}) "
                f"| {_shape(r['largest_allocation'])} | {r['max_abs_err_vs_naive']:.1e} |")
    lines += ["", "Choices inside `sdpa` (same runs, same inputs):", "",
              "| workload | variant | median ms (min–max) | CPU ms | × as shipped |",
              "|:--|:--|--:|--:|--:|"]
    for name, variants in result["sdpa_design"].items():
        shipped = variants["sdpa (as shipped)"]["median_seconds"]
        for label, r in variants.items():
            lines.append(
                f"| {name} | {label} | {r['median_seconds'] * 1e3:.1f} "
                f"({min(r['seconds']) * 1e3:.1f}–{max(r['seconds']) * 1e3:.1f}) "
                f"| {r['median_cpu_seconds'] * 1e3:.1f} | {shipped / r['median_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.attention_cpu", __doc__, argv, run, render_markdown,
               name="stage04_attention_cpu", repeats=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
