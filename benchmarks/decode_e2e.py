"""End-to-end decode speed, old linears against new, on the bench model: one command, < 3 minutes.

    python -m benchmarks.decode_e2e                        # bench model, 1 thread: decode_e2e_cpu.*
    python -m benchmarks.decode_e2e --threads 2
    python -m benchmarks.decode_e2e --model qwen3-0.6b     # Qwen3-0.6B shapes (2.4 GB, builds once)
    python -m benchmarks.decode_e2e --model qwen3-0.6b --dtype bfloat16   # bf16 weights: bf16 panels

Two engines in one process (`LLM`, `custom_ops="all"`), built under `FOLOVLLM_CPU_GEMM=onednn`
(every linear on oneDNN's packed weight, or for bf16 without oneDNN bf16 kernels `F.linear`: the
path before) and `auto` (the measured table for the dtype: `decode_linear` where it won). For each batch size (1 and 8 sequences of 16 prompt tokens, 64
new tokens, greedy, ignore_eos) the requests are added, the engine steps until every one has its
first token (prefill, not timed), then the decode steps are timed: decode tok/s = rows x steps /
time. Repeats interleave the two engines. Process CPU time beside wall time (the machine may be
shared); the greedy tokens of the two engines must be identical.

Each row is also a fraction of the bandwidth ceiling (benchmarks.roofline's measured read
bandwidth / the weight bytes a step reads: every linear weight and the LM head once, the
embedding row lookups aside).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.roofline import decode_fraction, load_limits
from folovllm import LLM, SamplingParams
from folovllm.model_executor.layers.cpu_gemm import logical_shape
from folovllm.model_executor.layers.linear import LinearBase

PATHS = ("onednn", "auto")  # FOLOVLLM_CPU_GEMM: before, after
PROMPT_LEN, NEW_TOKENS = 16, 64


def model_path(name: str) -> str:
    from benchmarks.profile_step import model_path as resolve

    return resolve(name)


def build(path: str, gemm: str, dtype: str = "float32") -> LLM:
    before = os.environ.get("FOLOVLLM_CPU_GEMM")
    os.environ["FOLOVLLM_CPU_GEMM"] = gemm  # read while the weights load
    try:
        return LLM(path, dtype=dtype, max_model_len=512, custom_ops="all")
    finally:
        os.environ.pop("FOLOVLLM_CPU_GEMM") if before is None else os.environ.__setitem__("FOLOVLLM_CPU_GEMM", before)


def step_bytes(llm: LLM) -> int:
    """Weight bytes one decode step reads: every linear's weight and the LM head's, once."""
    model = llm.llm_engine.model_runner.model
    return sum(_weight_bytes(m) for m in [m for m in model.modules() if isinstance(m, LinearBase)] + [model.lm_head])


def _weight_bytes(m: torch.nn.Module) -> int:
    w = m.weight  # panels: count the real outputs and inputs, not the padding
    out_features, in_features = logical_shape(w)
    return out_features * in_features * w.element_size()


def decode_run(llm: LLM, rows: int, vocab: int, seed: int, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """`rows` requests of PROMPT_LEN random tokens; prefill untimed, then the decode steps timed
    (also stage07_int4's and llama_cpp_peer's decode timing)."""
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(rows):
        ids = torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist()
        engine.add_request(f"r{seed}-{i}", dict(prompt_token_ids=ids), params)
    tokens: dict[str, list[int]] = {}
    while len(tokens) < rows or any(len(t) == 0 for t in tokens.values()):  # prefill, untimed
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
    steps, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return dict(steps=steps, wall_seconds=wall, cpu_seconds=cpu, loadavg=loadavg(),
                tokens=[tokens[k] for k in sorted(tokens)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = model_path(args.model)
    paths = tuple(args.paths.split(","))
    llms = {gemm: build(path, gemm, args.dtype) for gemm in paths}
    vocab = 500  # prompt ids: the local BPE's (both models' tokenizer)
    limits = load_limits()
    bw = limits["bandwidth"].get(str(args.threads)) if limits else None
    nbytes = step_bytes(llms[paths[0]])
    rows_list = (1,) if args.quick else (1, 8)
    out: dict[str, Any] = dict(model=args.model, dtype=args.dtype, bytes_per_step=nbytes, bandwidth=bw, rows={}, loads=[])
    for rows in rows_list:
        runs: dict[str, list[dict[str, Any]]] = {g: [] for g in paths}
        for gemm in paths:  # warm-up: oneDNN's primitives, the kernels' first calls
            decode_run(llms[gemm], rows, vocab, seed=99)
        for rep in range(args.repeats):
            for gemm in paths:
                r = decode_run(llms[gemm], rows, vocab, seed=rep)
                runs[gemm].append(r)
                out["loads"].append(r["loadavg"])
        row: dict[str, Any] = dict(identical_tokens=all(a["tokens"] == b["tokens"] for a, b in zip(*runs.values()))
                                   if len(paths) == 2 else None)
        for gemm, rs in runs.items():
            tok = rows * rs[0]["steps"]
            wall = statistics.median(r["wall_seconds"] for r in rs)
            cpu = statistics.median(r["cpu_seconds"] for r in rs)
            cpu_per_thread = cpu / args.threads
            row[gemm] = dict(steps=rs[0]["steps"], wall_seconds=wall, cpu_seconds=cpu,
                             tok_s_wall=tok / wall, tok_s_cpu=tok / cpu_per_thread,
                             step_ms_cpu=cpu_per_thread / rs[0]["steps"] * 1e3,
                             walls=[r["wall_seconds"] for r in rs], cpus=[r["cpu_seconds"] for r in rs])
            if bw:
                row[gemm]["of_ceiling"] = decode_fraction(row[gemm]["tok_s_cpu"], nbytes, bw, rows)
        out["rows"][str(rows)] = row
        if len(paths) < 2:  # one engine (--paths auto: half the memory): its tok/s, no comparison
            print(f"batch {rows}, {paths[0]}: {row[paths[0]]['tok_s_cpu']:.1f} tok/s (CPU time), "
                  f"step {row[paths[0]]['step_ms_cpu']:.1f} ms", flush=True)
            continue
        row["speedup_cpu"] = row["auto"]["tok_s_cpu"] / row["onednn"]["tok_s_cpu"]
        row["speedup_wall"] = row["auto"]["tok_s_wall"] / row["onednn"]["tok_s_wall"]
        print(f"batch {rows}: before {row['onednn']['tok_s_cpu']:.1f} tok/s, after {row['auto']['tok_s_cpu']:.1f} "
              f"(CPU time; {row['speedup_cpu']:.2f}x, wall {row['speedup_wall']:.2f}x), identical tokens: "
              f"{row['identical_tokens']}", flush=True)
    if "1" in out["rows"] and "8" in out["rows"]:  # the goal: a batch-8 step <= 1.15x a batch-1 step
        out["step_ratio_8_to_1"] = {g: out["rows"]["8"][g]["step_ms_cpu"] / out["rows"]["1"][g]["step_ms_cpu"]
                                    for g in paths}
    out["peak_loadavg_1m"] = peak_loadavg(out.pop("loads"))
    out["repeats"], out["paths"] = args.repeats, list(paths)
    return out


def render_markdown(result: dict[str, Any]) -> str:
    caption = (f"Decode, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens each, {result['model']} model "
               f"in {result.get('dtype', 'float32')} ({result['bytes_per_step'] / 1e6:.1f} MB of weights per step), "
               f"oneDNN's packed linears "
               f"(before) against the measured table's choice (after), median of {result['repeats']} "
               f"interleaved repeats: `{result['command']}` on {machine_short(result['machine'])}, "
               f"{result['date'][:10]}. tok/s from process CPU time per thread (wall time beside it)")
    caption += (f"; ceiling = {result['bandwidth'] / 1e9:.1f} GB/s (benchmarks.roofline) / bytes per step."
                if result.get("bandwidth") else ".")
    lines = [caption + shared_machine_note(result), "",
             "| batch | before tok/s | % of ceiling | after tok/s | % of ceiling | speed-up (CPU) | speed-up (wall) | step ms before -> after | same tokens |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|:-:|"]
    if len(result.get("paths", PATHS)) < 2:  # one engine: no before/after table
        g = result["paths"][0]
        lines = [caption + shared_machine_note(result), "", f"| batch | {g} tok/s | step ms |", "|--:|--:|--:|"]
        lines += [f"| {rows} | {r[g]['tok_s_cpu']:.1f} | {r[g]['step_ms_cpu']:.1f} |" for rows, r in result["rows"].items()]
    for rows, r in (result["rows"].items() if len(result.get("paths", PATHS)) == 2 else ()):
        pct = lambda g: f"{100 * r[g]['of_ceiling']:.0f}%" if "of_ceiling" in r[g] else "-"  # noqa: E731
        lines.append(f"| {rows} | {r['onednn']['tok_s_cpu']:.1f} | {pct('onednn')} | {r['auto']['tok_s_cpu']:.1f} | "
                     f"{pct('auto')} | {r['speedup_cpu']:.2f}x | {r['speedup_wall']:.2f}x | "
                     f"{r['onednn']['step_ms_cpu']:.1f} -> {r['auto']['step_ms_cpu']:.1f} | "
                     f"{'yes' if r['identical_tokens'] else 'NO'} |")
    if "step_ratio_8_to_1" in result:
        ratio = result["step_ratio_8_to_1"]
        lines += ["", "A batch-8 step costs " + ", ".join(f"{ratio[g]:.2f}x a batch-1 step on {g}" for g in ratio)
                  + " (CPU time)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="bench", help="bench | qwen3-0.6b | a checkpoint folder")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="the model's dtype (default float32)")
        p.add_argument("--paths", default="onednn,auto", choices=("onednn,auto", "auto", "onednn"),
                       help="engines to build (default both; one halves the memory, no comparison)")

    def name(args: argparse.Namespace, result: dict[str, Any]) -> str:
        model = args.model if args.model in ("bench", "qwen3-0.6b") else "model"
        return (f"decode_e2e_{model}_t{args.threads}" + ("_bf16" if args.dtype == "bfloat16" else "")
                + ("" if args.paths == "onednn,auto" else f"_{args.paths}") + "_cpu")

    bench_main("benchmarks.decode_e2e", __doc__, argv, run, render_markdown, name=name, repeats=3, options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
