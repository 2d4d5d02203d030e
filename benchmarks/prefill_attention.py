"""The prefill attention kernel against its previous version and torch's SDPA, one layer, side by side.

    python -m benchmarks.prefill_attention                       # before = main's last kernel change
    python -m benchmarks.prefill_attention --before e83d07b --threads 2    # an older kernel
    FOLOVLLM_CPU_ISA=avx2 python -m benchmarks.prefill_attention --name prefill_attention_avx2
    python -m benchmarks.prefill_attention --lengths 1024 --dtypes float32
    python -m benchmarks.prefill_attention --lengths 512 1024 4096 --heads qwen3-0.6b --repeats 5
    python -m benchmarks.prefill_attention --quick               # smoke run, not written

Workloads: one prompt of N tokens (N = 1,024 and 4,096), no cached context, blocks of 16 in random
order; the bench model's heads (8 query / 4 KV heads of 64) and Qwen3-0.6B's (16 / 8 of 128);
float32 and bfloat16. Systems:

    sdpa      the `sdpa` backend (gather the blocks, torch's flash kernel), the torch reference
    before    `csrc/cpu/prefill_attention.cpp` as it was at `--before` (git show), built alone
              with the same flags (`_custom_ops.build_extension`)
    kernel    the checkout's kernel (`load_ops().paged_attention_prefill`, what `cpu_attn` calls)

Each call once untimed, then `--repeats` interleaved rounds; medians of wall and process CPU time
(steadier on a shared machine), GFLOP/s of the useful work (4 * Hq * D * N^2 / 2), and the largest
difference from `sdpa`'s output. Writes benchmarks/results/prefill_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, summarize, time_calls
from benchmarks.results import machine_short, shared_machine_note
from folovllm import _custom_ops
from folovllm.model_executor.attention_backends import get_attn_backend
from tests.attention_utils import Batch, random_paged_batch

HEADS = {"bench": (8, 4, 64), "qwen3-0.6b": (16, 8, 128)}  # Hq, Hkv, head_dim
SYSTEMS = ("sdpa", "before", "kernel")
KERNEL = "folovllm/csrc/cpu/prefill_attention.cpp"
_BINDING = """#include <torch/extension.h>
#include "ops.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_attention_prefill", &paged_attention_prefill); }
"""


def build_before(rev: str) -> Any:
    """The kernel at git revision `rev`, built alone (its own cache key) with today's flags."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="prefill_before_"))
    (folder / "prefill_attention.cpp").write_text(src)
    (folder / "binding.cpp").write_text(_BINDING)
    (folder / "ops.h").write_text((root / "folovllm/csrc/cpu/ops.h").read_text())
    return _custom_ops.build_extension(
        "prefill_before", sources=[folder / "prefill_attention.cpp", folder / "binding.cpp"],
        depends=[folder / "ops.h"], extra_cflags=_custom_ops.kernel_cflags() + [f"-I{folder}"],
        extra_ldflags=_custom_ops._LDFLAGS, what=f"the prefill kernel at {rev}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    before = build_before(args.before)
    ops = _custom_ops.load_ops()
    sdpa = get_attn_backend("sdpa")
    lengths = (256,) if args.quick else args.lengths
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    rows: dict[str, Any] = {}
    loads: list = []
    for dtype in (dtypes[d] for d in args.dtypes):
        for model, (hq, hkv, d) in ((m, HEADS[m]) for m in args.heads):
            for n in lengths:
                q, kc, vc, md = random_paged_batch(Batch((n,), (n,), hq, hkv, d, 16), dtype, seed=0)
                scale, table = d**-0.5, md.block_tables[0].long()
                smd = sdpa.build_metadata(md, kc)
                outs = {s: torch.empty_like(q) for s in SYSTEMS}

                def kernel(module: Any, out: torch.Tensor) -> Callable[[], torch.Tensor]:
                    return lambda: module.paged_attention_prefill(out, q, kc, vc, table, n, scale)

                calls = {"sdpa": lambda: outs["sdpa"].copy_(sdpa.forward(q, kc, vc, smd, scale)),
                         "before": kernel(before, outs["before"]),
                         "kernel": kernel(ops, outs["kernel"])}
                runs = time_calls(calls, args.repeats)  # also fills outs (the warm-up call)
                loads += [t.loadavg for ts in runs.values() for t in ts]
                flops = 4 * hq * d * n * n / 2
                name = f"{model} {n} {str(dtype).removeprefix('torch.')}"
                rows[name] = {}
                for s in SYSTEMS:
                    r = summarize(runs[s])
                    r["gflops_cpu"] = flops / r["median_cpu_seconds"] / 1e9 / args.threads
                    r["max_abs_diff_vs_sdpa"] = (outs[s].float() - outs["sdpa"].float()).abs().max().item()
                    rows[name][s] = r
                print(name, {s: f"{rows[name][s]['median_cpu_seconds'] * 1e3:.1f} ms CPU" for s in SYSTEMS},
                      flush=True)
    return dict(workloads=rows, before=args.before, isa=_custom_ops.cpu_platform.kernel_isa(),
                peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    caption = (f"Prefill attention, one layer, one prompt (blocks of 16 in random order; "
               f"{result['isa']}; median of {result['repeats']} interleaved runs): "
               f"`{result['command']}` on {machine_short(result['machine'])}, {result['date'][:10]}; "
               f"`before` = the kernel at {result['before']}.")
    lines = [caption + shared_machine_note(result), "",
             "| workload | sdpa CPU ms | before CPU ms | kernel CPU ms | kernel GFLOP/s a core "
             "| × before (CPU; wall) | × sdpa (CPU; wall) | max diff vs sdpa |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in result["workloads"].items():
        s, b, k = r["sdpa"], r["before"], r["kernel"]

        def ratio(x: dict[str, Any]) -> str:
            return (f"{x['median_cpu_seconds'] / k['median_cpu_seconds']:.2f}; "
                    f"{x['median_seconds'] / k['median_seconds']:.2f}")

        lines.append(f"| {name} | {s['median_cpu_seconds'] * 1e3:.1f} | {b['median_cpu_seconds'] * 1e3:.1f} "
                     f"| {k['median_cpu_seconds'] * 1e3:.1f} | {k['gflops_cpu']:.0f} | {ratio(b)} | {ratio(s)} "
                     f"| {k['max_abs_diff_vs_sdpa']:.1e} |")
    return "\n".join(lines) + "\n"


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--before", default="9a2fa23", help="git revision of the kernel to compare with")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="prompt tokens")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS),
                   help="head shapes: bench (8/4 of 64), qwen3-0.6b (16/8 of 128)")


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.prefill_attention", __doc__, argv, run, render_markdown,
               name="prefill_attention", repeats=3, options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
