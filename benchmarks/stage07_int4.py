"""Stage 07's int4 decode kernel (`cpu_int4_panel`, csrc/cpu/int4_gemm.cpp) against torch's int4
kernel (`cpu_int4`) and the float32 panels (`decode_linear`), per linear and end to end.

    python -m benchmarks.stage07_int4                  # ~15 minutes on a busy 2-core box
    python -m benchmarks.stage07_int4 --quick          # smoke run (small, not written)
    FOLOVLLM_CPU_ISA=avx2 python -m benchmarks.stage07_int4 --name stage07_int4_cpu_avx2
    python -m benchmarks.stage07_int4 --no-linears --no-e2e --perplexity --name stage07_int4_q8_perplexity_cpu

Two measurements, one thread unless `--threads`:

    per linear   Qwen3-0.6B's four linears (qkv 1024 -> 4096, o 2048 -> 1024, gate_up
                 1024 -> 6144, down 3072 -> 1024; groups of 128) at 1, 8 and 16 rows: our kernel
                 with float32 and with bfloat16 activations, and with int8 ones (the opt-in
                 cpu_int4_panel_q8), torch's int4 kernel (bfloat16, the only dtype in which it
                 is fast), and the float32 weight on our float32 panels.
                 Median process CPU time of `--repeats` interleaved rounds of 20 calls; GB/s =
                 the bytes the int4 kernel streams (codes, scales and zeros) / time
    end to end   a Qwen3-0.6B-shaped GPTQ checkpoint (`stage07_vllm_gptq.write_checkpoint`:
                 groups of 128, random codes), `LLM` with custom_ops="all", batch 1 and 8,
                 16-token prompts, `--new-tokens` greedy tokens with ignore_eos; decode tok/s
                 from the steps after every request has its first token. bfloat16: torch's
                 int4 kernel against ours; float32: ours (torch's is 20x slower than a dense
                 matmul there, stage07_gptq.py). Torch's kernel rounds the scales and zeros to
                 bfloat16 and ours keeps them in float32, so their greedy tokens may part on a
                 random model; the share of identical requests is reported. (Ours equals the
                 float model on the dequantized weights in float32: stages/07's engine test.)

`gptq_decode` is the end-to-end run as one function (for peers that compare with other engines,
e.g. llama.cpp's Q4_0): it builds or reuses the checkpoint and returns tok/s and the tokens.

`--perplexity` adds the trained stage-09 target's held-out perplexity on the exact kernel and
on cpu_int4_panel_q8 (`perplexity_section`). Writes `benchmarks/results/stage07_int4_cpu.json`
and `.md` with the machine and load.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg, summarize, time_calls
from benchmarks.results import machine_short, shared_machine_note

# (name, in, out) as our Qwen3 fuses them
LINEARS = (("qkv_proj", 1024, 4096), ("o_proj", 2048, 1024), ("gate_up_proj", 1024, 6144),
           ("down_proj", 3072, 1024))
GROUP = 128
ROWS = (1, 8, 16)
CALLS = 20
PROMPT_LEN = 16


def random_gptq(K: int, N: int, group: int = GROUP, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """qweight, qzeros (v2), scales, g_idx of a random GPTQ layer."""
    from folovllm.model_executor.layers.quantization.gptq import pack_int32

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(0, 16, (K // group, N), generator=g)
    scales = torch.rand(K // group, N, generator=g) * 0.01 + 0.001
    return pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1), scales, torch.arange(K) // group


def linears_section(repeats: int, rows: tuple[int, ...] = ROWS) -> dict[str, Any]:
    from folovllm._custom_ops import load_ops
    from folovllm.model_executor.layers.quantization.gptq import (
        CpuInt4Weight,
        Int4PanelWeight,
        dequantize_gptq,
    )

    ops = load_ops()
    out: dict[str, Any] = {}
    for name, K, N in LINEARS:
        qw, qz, s, gi = random_gptq(K, N)
        panel = Int4PanelWeight.from_gptq(qw, qz, s, gi)
        panel_q8 = Int4PanelWeight.from_gptq(qw, qz, s, gi, int8_activations=True)
        torch_int4 = CpuInt4Weight.from_gptq(qw, qz, s, gi)
        dense = ops.pack_decode_weight(dequantize_gptq(qw, qz, s, gi, 4).t().contiguous())  # fp32 panels
        nbytes = panel.packed.numel() * 4
        cases: dict[str, Any] = {}
        for M in rows:
            x = torch.randn(M, K)
            xb = x.bfloat16()
            cases[f"{M} int4_panel fp32"] = lambda x=x: [panel.matmul(x) for _ in range(CALLS)]
            cases[f"{M} int4_panel bf16"] = lambda x=xb: [panel.matmul(x) for _ in range(CALLS)]
            cases[f"{M} int4_panel q8"] = lambda x=x: [panel_q8.matmul(x) for _ in range(CALLS)]
            cases[f"{M} torch int4 bf16"] = lambda x=xb: [torch_int4.matmul(x) for _ in range(CALLS)]
            cases[f"{M} fp32 panels"] = lambda x=x: [ops.decode_linear(x, dense, N) for _ in range(CALLS)]
        load = loadavg()
        times = {k: summarize(v)["median_cpu_seconds"] / CALLS * 1e3 for k, v in time_calls(cases, repeats).items()}
        row: dict[str, Any] = {"in": K, "out": N, "int4_bytes": nbytes, "fp32_bytes": K * N * 4, "loadavg": load,
                               "ms": {}}
        for M in rows:
            t = {k.split(" ", 1)[1]: v for k, v in times.items() if k.split(" ", 1)[0] == str(M)}
            t["GB/s int4 fp32"] = nbytes / (t["int4_panel fp32"] * 1e-3) / 1e9
            t["GB/s int4 bf16"] = nbytes / (t["int4_panel bf16"] * 1e-3) / 1e9
            t["GB/s int4 q8"] = nbytes / (t["int4_panel q8"] * 1e-3) / 1e9
            t["GFLOP/s fp32"] = 2 * M * K * N / (t["int4_panel fp32"] * 1e-3) / 1e9
            t["GFLOP/s q8"] = 2 * M * K * N / (t["int4_panel q8"] * 1e-3) / 1e9
            row["ms"][str(M)] = t
            print(f"  {name} M={M}: panel fp32 {t['int4_panel fp32']:.3f} ms ({t['GB/s int4 fp32']:.1f} GB/s), "
                  f"bf16 {t['int4_panel bf16']:.3f}, q8 {t['int4_panel q8']:.3f} ({t['GB/s int4 q8']:.1f} GB/s), "
                  f"torch int4 {t['torch int4 bf16']:.3f}, "
                  f"fp32 panels {t['fp32 panels']:.3f}", flush=True)
        out[name] = row
    return out


# -- end to end ---------------------------------------------------------------------------------


def gptq_checkpoint(path: Optional[str] = None) -> str:
    """The Qwen3-0.6B-shaped GPTQ checkpoint of stage07_vllm_gptq (written once, ~0.6 GB)."""
    from benchmarks.stage07_vllm_gptq import DEFAULT_MODEL, write_checkpoint

    return str(write_checkpoint(Path(path or DEFAULT_MODEL)))


def build_llm(path: str, dtype: str, kernel: str) -> Any:
    """`LLM` on the checkpoint with every GPTQ layer on `kernel` (FOLOVLLM_GPTQ_KERNEL, read while
    the weights load)."""
    from folovllm import LLM

    before = os.environ.get("FOLOVLLM_GPTQ_KERNEL")
    os.environ["FOLOVLLM_GPTQ_KERNEL"] = kernel
    try:
        # 256 MiB of KV cache: plenty for 8 x (16 + 64) tokens, and three engines fit a shared box
        return LLM(path, dtype=dtype, max_model_len=512, custom_ops="all", kv_cache_memory=256 << 20)
    finally:
        os.environ.pop("FOLOVLLM_GPTQ_KERNEL") if before is None else os.environ.__setitem__("FOLOVLLM_GPTQ_KERNEL", before)


def decode_run(llm: Any, rows: int, new_tokens: int, seed: int, vocab: int = 500) -> dict[str, Any]:
    """decode_e2e's decode timing (prefill untimed, then the decode steps) with this script's
    argument order."""
    from benchmarks.decode_e2e import decode_run as timed_decode

    return timed_decode(llm, rows, vocab, seed, new_tokens=new_tokens)


# --8<-- [start:gptq_decode]
def gptq_decode(batch: int = 1, dtype: str = "bfloat16", kernel: str = "cpu_int4_panel", new_tokens: int = 32,
                repeats: int = 3, threads: Optional[int] = None, path: Optional[str] = None,
                llm: Any = None) -> dict[str, Any]:
    """GPTQ int4 decode of the Qwen3-0.6B-shaped checkpoint through folovllm's engine: `batch`
    requests of 16 random prompt tokens, `new_tokens` greedy tokens each (ignore_eos); returns
    the median decode tok/s by wall and by process CPU time (per thread), the step time and the
    greedy tokens of the last repeat. For peers (llama.cpp's Q4_0) run in the same script."""
    if threads is not None:
        torch.set_num_threads(threads)
    llm = llm or build_llm(gptq_checkpoint(path), dtype, kernel)
    decode_run(llm, batch, 4, seed=99)  # warm-up
    runs = [decode_run(llm, batch, new_tokens, seed=rep) for rep in range(repeats)]
    n_threads = torch.get_num_threads()
    wall = statistics.median(r["wall_seconds"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs) / n_threads
    steps = runs[0]["steps"]
    return dict(batch=batch, dtype=dtype, kernel=kernel, threads=n_threads, steps=steps,
                tok_s_wall=batch * steps / wall, tok_s_cpu=batch * steps / cpu, step_ms_cpu=cpu / steps * 1e3,
                loadavg=[r["loadavg"] for r in runs], tokens=runs[-1]["tokens"])
# --8<-- [end:gptq_decode]


def e2e_section(args: argparse.Namespace) -> dict[str, Any]:
    path = gptq_checkpoint(args.model)
    systems = (("bfloat16", "cpu_int4"), ("bfloat16", "cpu_int4_panel"), ("float32", "cpu_int4_panel"),
               ("float32", "cpu_int4_panel_q8"))
    batches = (1,) if args.quick else (1, 8)
    new = 4 if args.quick else args.new_tokens
    out: dict[str, Any] = {"model": path, "new_tokens": new, "rows": {}}
    for batch in batches:
        out["rows"][str(batch)] = {}
    for dtype, kernel in systems:  # one engine at a time: each holds ~1-3 GB on a shared box
        llm = build_llm(path, dtype, kernel)
        for batch in batches:
            r = gptq_decode(batch, dtype, kernel, new, args.repeats, llm=llm)
            out["rows"][str(batch)][f"{dtype} {kernel}"] = r
            print(f"  batch {batch} {dtype} {kernel}: {r['tok_s_cpu']:.2f} tok/s by CPU time "
                  f"({r['tok_s_wall']:.2f} wall), step {r['step_ms_cpu']:.1f} ms", flush=True)
        del llm
        gc.collect()
    for row in out["rows"].values():
        bf = row["bfloat16 cpu_int4"]["tokens"], row["bfloat16 cpu_int4_panel"]["tokens"]
        row["bf16_same_tokens"] = bf[0] == bf[1]
        row["bf16_same_requests"] = sum(a == b for a, b in zip(*bf)) / len(bf[0])
    return out


# -- what int8 activations cost in quality --------------------------------------------------


# --8<-- [start:q8_perplexity]
def perplexity_section(group: int = GROUP) -> dict[str, Any]:
    """Held-out perplexity of the trained stage-09 target (`folovllm train-pair`: 4 layers, hidden
    256, trained on stdlib sources; its held-out files) as float32, and as its round-to-nearest
    GPTQ checkpoint (groups of `group`) on the exact kernel and on cpu_int4_panel_q8: the second
    difference is what rounding the activations to int8 costs on top of the 4-bit weights."""
    import tempfile

    from folovllm.model_executor.model_loader import load_model
    from folovllm.tools import train_pair
    from folovllm.tools.gptq_quantizer import perplexity, quantize_checkpoint

    target = train_pair.default_pair_dir() / "target"
    if not (target / "config.json").is_file():
        raise SystemExit(f"{target} not found: run `folovllm train-pair` first")
    recipe = train_pair.TrainRecipe()
    from transformers import AutoTokenizer

    _, held_texts = train_pair.split_corpus(train_pair.stdlib_files(recipe.max_files), recipe.held_out_every)
    held = train_pair.held_out_windows(train_pair.encode_corpus(AutoTokenizer.from_pretrained(target), held_texts),
                                       recipe).tolist()
    gptq = quantize_checkpoint(str(target), tempfile.mkdtemp(prefix="stage07_q8_"), group_size=group, method="rtn")
    out: dict[str, Any] = {"held_out_tokens": sum(len(w) for w in held), "group": group}
    before = os.environ.get("FOLOVLLM_GPTQ_KERNEL")
    try:
        out["float32"] = perplexity(load_model(str(target), torch.float32)[0], held)
        for kernel in ("cpu_int4_panel", "cpu_int4_panel_q8"):
            os.environ["FOLOVLLM_GPTQ_KERNEL"] = kernel  # read while the weights load
            out[f"RTN g{group} {kernel}"] = perplexity(load_model(str(gptq), torch.float32)[0], held)
    finally:
        os.environ.pop("FOLOVLLM_GPTQ_KERNEL") if before is None else os.environ.__setitem__("FOLOVLLM_GPTQ_KERNEL", before)
    for k, v in out.items():
        print(f"  perplexity {k}: {v}", flush=True)
    return out
# --8<-- [end:q8_perplexity]


def render(res: dict[str, Any]) -> str:
    lines = [f"Stage 07 int4 decode kernel: `{res['command']}` on {machine_short(res['machine'])}, commit "
             f"{res['git_commit']}, {res['date'][:10]}, {res.get('threads', 1)} thread(s)"
             + shared_machine_note(res), ""]
    if "linears" in res:
        lines += ["**Per linear** (Qwen3-0.6B shapes, groups of 128): ms of process CPU time per call (median "
                  f"of {res['repeats']} interleaved rounds of {CALLS} calls); GB/s = int4 bytes streamed "
                  "(codes + float32 scales and zeros) / time of our kernel (each layer's 1-7 MB stay in the L3 cache "
                  "between calls here: per-linear GB/s can pass the DRAM read bandwidth; end to end they cannot):", "",
                  "| linear | rows | ours fp32 act | ours bf16 act | ours int8 act (q8) | torch int4 (bf16) | fp32 panels | ours bf16 vs torch int4 | ours fp32 vs fp32 panels | q8 vs fp32 act | GB/s fp32 / bf16 / q8 | GFLOP/s fp32 / q8 |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for name, row in res["linears"].items():
            for M, t in row["ms"].items():
                q8 = "int4_panel q8" in t  # results written before the int8 way lack it
                lines.append(f"| {name} {row['in']}->{row['out']} | {M} | {t['int4_panel fp32']:.3f} | "
                             f"{t['int4_panel bf16']:.3f} | {t['int4_panel q8']:.3f} | " if q8 else
                             f"| {name} {row['in']}->{row['out']} | {M} | {t['int4_panel fp32']:.3f} | "
                             f"{t['int4_panel bf16']:.3f} | - | ")
                lines[-1] += (f"{t['torch int4 bf16']:.3f} | {t['fp32 panels']:.3f} | "
                              f"{t['torch int4 bf16'] / t['int4_panel bf16']:.2f}x | "
                              f"{t['fp32 panels'] / t['int4_panel fp32']:.2f}x | "
                              + (f"{t['int4_panel fp32'] / t['int4_panel q8']:.2f}x | " if q8 else "- | ")
                              + f"{t['GB/s int4 fp32']:.1f} / {t['GB/s int4 bf16']:.1f}"
                              + (f" / {t['GB/s int4 q8']:.1f} | {t['GFLOP/s fp32']:.0f} / {t['GFLOP/s q8']:.0f} |" if q8 else " | - |"))
        lines.append("")
    if "e2e" in res:
        e = res["e2e"]
        lines += [f"**End to end**, Qwen3-0.6B-shaped GPTQ checkpoint (groups of 128), {PROMPT_LEN}-token prompts, "
                  f"{e['new_tokens']} greedy tokens each; decode tok/s by process CPU time per thread (wall beside):", "",
                  "| batch | dtype | kernel | tok/s (CPU) | tok/s (wall) | step ms (CPU) |", "|--:|---|---|--:|--:|--:|"]
        for batch, row in e["rows"].items():
            for key, r in row.items():
                if isinstance(r, dict):
                    lines.append(f"| {batch} | {r['dtype']} | {r['kernel']} | {r['tok_s_cpu']:.2f} | "
                                 f"{r['tok_s_wall']:.2f} | {r['step_ms_cpu']:.1f} |")
        agree = []
        for b, r in e["rows"].items():
            same = "identical" if r["bf16_same_tokens"] else f"{100 * r['bf16_same_requests']:.0f}% of requests identical"
            agree.append(f"batch {b}: {same}")
        lines += ["", "bfloat16 greedy tokens, torch's kernel vs ours: " + ", ".join(agree)]
    if "perplexity" in res:
        q = res["perplexity"]
        lines += ["", f"**Perplexity** of the trained stage-09 target on {q['held_out_tokens']} held-out tokens "
                  f"(round-to-nearest GPTQ, groups of {q['group']}, float32):", "",
                  "| weights, kernel | perplexity | change vs float32 |", "|---|--:|--:|"]
        for k, v in q.items():
            if k not in ("held_out_tokens", "group"):
                lines.append(f"| {k} | {v:.3f} | {v - q['float32']:+.3f} |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="where the GPTQ checkpoint is written / read")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="rows per linear call (128: prefill)")
    p.add_argument("--no-linears", action="store_true")
    p.add_argument("--perplexity", action="store_true",
                   help="also the trained target's perplexity on the exact and the int8-activation kernel")


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"threads": torch.get_num_threads()}
    if not args.no_linears:
        print("per linear", flush=True)
        res["linears"] = linears_section(1 if args.quick else args.repeats, (1,) if args.quick else tuple(args.rows))
        res["peak_loadavg_1m"] = peak_loadavg([r["loadavg"] for r in res["linears"].values()])
    if not args.no_e2e:
        print("end to end", flush=True)
        res["e2e"] = e2e_section(args)
    if args.perplexity:
        print("perplexity", flush=True)
        res["perplexity"] = perplexity_section()
    return res


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage07_int4", __doc__, argv, run, render, name="stage07_int4_cpu", repeats=5,
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
