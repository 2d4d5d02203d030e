"""What log-probabilities and the batch-invariant mode cost (issue 33's goals), side by side.

    python -m benchmarks.logprobs_cost                 # all three parts, 1 thread, bench model
    python -m benchmarks.logprobs_cost --parts invariant --dtypes float32 --repeats 5
    python -m benchmarks.logprobs_cost --quick         # the workloads' quick sizes (the published run)

Three comparisons, each run interleaved (A, B, A, B, ...) in one process at one thread, medians
of the CPU time of the process (not stretched by waiting for a core on a shared machine) and of
wall time, and their ratio:

    invariant        batch_invariant=True vs the default, every workload below, float32 and
                     bfloat16: the time of the whole `generate` (the same steps in both: the
                     mode changes kernels, not the schedule), so the ratio is the mean step
                     time's. Goal <= 1.25x.
    logprobs         logprobs=5 on every request vs none: decode throughput (16 requests,
                     32-token prompts, 64 tokens each, temperature 0.8, seeded). Goal <= 3%.
    prompt_logprobs  prompt_logprobs=5 on a 1,024-token prompt vs none (max_tokens=1: the
                     prefill). Goal <= 10%.
    attention        (`--parts attention`) the kernels alone: 16 decodes by the decode kernel
                     vs one prefill-kernel call each (the mode), at contexts 256 and 1,024.

The bench model (benchmarks/bench_model.py) has a 512-token vocabulary, so the vocabulary-wide
work of log-probabilities (log_softmax, top-k, ranks) is nearly free on it; `logprobs_vocab`
times that work alone on a Qwen3-sized [16, 151936] batch of logits, to set against a real
model's step time. Every repeat builds a fresh engine (untimed): no prefix-cache hit carries over
from one repeat to the next. Results: benchmarks/results/logprobs_cost_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from typing import Any, Callable, Optional

import torch

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.harness import Timing, interleave, loadavg, summarize, timed
from benchmarks.results import RESULTS_DIR, machine_short, result_record, shared_machine_note, write_results
from benchmarks.workloads import get_workload

WORKLOADS = ("mixed", "long_tail", "prompts_1024", "shared_prefix")


def compare(make: dict[str, Callable[[], Callable[[], Any]]], repeats: int) -> dict[str, Any]:
    """`make[name]()` builds a fresh engine (untimed) and returns the call to time. Interleaved,
    after one untimed warm-up of each. Returns each one's summary and the CPU/wall ratios of the
    second to the first."""
    def trial(name: str) -> Callable[[], Timing]:
        return lambda: timed(make[name]())

    runs = interleave({name: trial(name) for name in make}, repeats,
                      warmup={name: (lambda n=name: make[n]()()) for name in make},
                      log=lambda name, i, t: print(f"  {name:>10s} #{i}: cpu {t.cpu_seconds:.3f}s wall {t.seconds:.3f}s",
                                                   file=sys.stderr))
    out = {name: summarize(ts) for name, ts in runs.items()}
    base, other = list(make)
    out["cpu_ratio"] = round(out[other]["median_cpu_seconds"] / out[base]["median_cpu_seconds"], 4)
    out["wall_ratio"] = round(out[other]["median_seconds"] / out[base]["median_seconds"], 4)
    return out


def llm(path: str, dtype: str, **kw: Any) -> Any:
    from folovllm import LLM

    return LLM(path, dtype=dtype, max_model_len=2048, max_num_seqs=16, **kw)


def part_invariant(path: str, dtypes: list[str], quick: bool, repeats: int,
                   workloads: tuple[str, ...] = WORKLOADS) -> list[dict[str, Any]]:
    from folovllm import SamplingParams

    rows = []
    for dtype in dtypes:
        for name in workloads:
            wl = get_workload(name, vocab_size=512, quick=quick)
            prompts = [r.prompt_token_ids for r in wl.requests]
            params = [SamplingParams(temperature=wl.temperature, max_tokens=r.max_tokens, ignore_eos=True, seed=i)
                      for i, r in enumerate(wl.requests)]

            def make(invariant: bool) -> Callable[[], Any]:
                engine = llm(path, dtype, batch_invariant=invariant)
                return lambda: engine.generate(prompts, params, use_tqdm=False)

            print(f"invariant: {dtype} {name}", file=sys.stderr)
            r = compare({"default": lambda: make(False), "invariant": lambda: make(True)}, repeats)
            rows.append(dict(dtype=dtype, workload=name, description=wl.description, requests=len(wl),
                             prompt_tokens=wl.num_prompt_tokens, output_tokens=wl.num_output_tokens, **r))
    return rows


def part_logprobs(path: str, quick: bool, repeats: int) -> dict[str, Any]:
    from folovllm import SamplingParams

    rng = random.Random(0)
    n, out_len = 16, 64  # the same with --quick: two short runs
    prompts = [[rng.randrange(3, 512) for _ in range(32)] for _ in range(n)]

    def make(k: Optional[int]) -> Callable[[], Any]:
        engine = llm(path, "float32")
        params = [SamplingParams(temperature=0.8, seed=i, max_tokens=out_len, ignore_eos=True, logprobs=k)
                  for i in range(n)]
        return lambda: engine.generate(prompts, params, use_tqdm=False)

    print("logprobs=5 vs none", file=sys.stderr)
    r = compare({"none": lambda: make(None), "logprobs=5": lambda: make(5)}, repeats)
    r["cost_percent"] = round((r["cpu_ratio"] - 1) * 100, 2)
    return dict(requests=n, prompt_tokens=32, output_tokens=out_len, **r)


def part_prompt_logprobs(path: str, quick: bool, repeats: int) -> dict[str, Any]:
    from folovllm import SamplingParams

    rng = random.Random(1)
    length = 1024  # the same with --quick: one prefill
    prompt = [rng.randrange(3, 512) for _ in range(length)]

    def make(k: Optional[int]) -> Callable[[], Any]:
        engine = llm(path, "float32")
        params = SamplingParams(max_tokens=1, prompt_logprobs=k)
        return lambda: engine.generate([prompt], params, use_tqdm=False)

    print("prompt_logprobs=5 vs none", file=sys.stderr)
    r = compare({"none": lambda: make(None), "prompt_logprobs=5": lambda: make(5)}, repeats)
    r["cost_percent"] = round((r["cpu_ratio"] - 1) * 100, 2)
    return dict(prompt_tokens=length, **r)


def part_logprobs_vocab(repeats: int) -> dict[str, Any]:
    """The sampler's log-probability work on a Qwen3-sized vocabulary, alone: log_softmax,
    the top 5 and the sampled token's rank for 16 rows (`Sampler.compute_logprobs`)."""
    from folovllm.worker.sampler import gather_logprobs

    torch.manual_seed(0)
    logits = torch.randn(16, 151936) * 4
    tokens = torch.randint(0, 151936, (16,))
    work = lambda: gather_logprobs(logits.log_softmax(dim=-1), tokens, 5)  # noqa: E731
    work()
    ts = [timed(work) for _ in range(max(repeats, 5))]
    return dict(rows=16, vocab_size=151936, **summarize(ts))


def part_attention(repeats: int) -> list[dict[str, Any]]:
    """Where the mode's cost goes: the attention of 16 decoding sequences (the bench model's 8
    query / 4 KV heads of 64) by the decode kernel in one call, and by the prefill kernel in one
    call per sequence (what `BatchInvariantCPUAttentionBackend` does), per context length."""
    from folovllm._custom_ops import load_ops

    ops = load_ops()
    B, Hq, Hkv, D, bs = 16, 8, 4, 64, 16
    rows = []
    for L in (256, 1024):
        nb = L // bs
        torch.manual_seed(0)
        kc = torch.randn(B * nb + 1, bs, Hkv, D)
        vc = torch.randn_like(kc)
        q, out = torch.randn(B, Hq, D), torch.empty(B, Hq, D)
        tables = torch.arange(B * nb).view(B, nb)
        each = [tables[b].contiguous() for b in range(B)]
        lens, decode_rows = torch.full((B,), L), torch.arange(B)

        def decode() -> None:
            ops.paged_attention_decode(out, q, kc, vc, decode_rows, tables, lens, 0.125)

        def prefill() -> None:
            for b in range(B):
                ops.paged_attention_prefill(out[b:b + 1], q[b:b + 1], kc, vc, each[b], L, 0.125)

        runs = interleave({"decode": lambda: timed(decode), "prefill": lambda: timed(prefill)},
                          max(repeats, 40), warmup={"decode": decode, "prefill": prefill})
        r = {name: summarize(ts) for name, ts in runs.items()}
        rows.append(dict(context=L, sequences=B, decode_ms=round(r["decode"]["median_cpu_seconds"] * 1e3, 3),
                         prefill_ms=round(r["prefill"]["median_cpu_seconds"] * 1e3, 3),
                         ratio=round(r["prefill"]["median_cpu_seconds"] / r["decode"]["median_cpu_seconds"], 2)))
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# What log-probabilities and the batch-invariant mode cost ({machine_short(result['machine'])}, "
             f"{result['threads']} thread)", "", f"`{result['command']}` at {result['git_commit']}, {result['date']}.",
             "Medians of interleaved repeats, a fresh engine per repeat; CPU time of the process (wall time in "
             "brackets)." + shared_machine_note(result), ""]
    if result.get("invariant"):
        lines += ["## batch_invariant=True vs the default (goal <= 1.25x)", "",
                  "| dtype | workload | requests | default s | invariant s | ratio |", "|---|---|---|---|---|---|"]
        for r in result["invariant"]:
            lines.append(f"| {r['dtype']} | {r['workload']} ({r['description']}) | {r['requests']} | "
                         f"{r['default']['median_cpu_seconds']:.3f} ({r['default']['median_seconds']:.3f}) | "
                         f"{r['invariant']['median_cpu_seconds']:.3f} ({r['invariant']['median_seconds']:.3f}) | "
                         f"**{r['cpu_ratio']:.3f}x** ({r['wall_ratio']:.3f}x) |")
        lines.append("")
    for key, title, goal in (("logprobs", "logprobs=5 on every request vs none, decode", "3%"),
                             ("prompt_logprobs", "prompt_logprobs=5 on a {n}-token prompt vs none, prefill", "10%")):
        r = result.get(key)
        if not r:
            continue
        a, b = list(k for k in r if isinstance(r[k], dict))
        lines += [f"## {title.format(n=r.get('prompt_tokens'))} (goal <= {goal})", "",
                  f"| {a} s | {b} s | cost |", "|---|---|---|",
                  f"| {r[a]['median_cpu_seconds']:.3f} ({r[a]['median_seconds']:.3f}) | "
                  f"{r[b]['median_cpu_seconds']:.3f} ({r[b]['median_seconds']:.3f}) | "
                  f"**{r['cost_percent']:+.1f}%** ({(r['wall_ratio'] - 1) * 100:+.1f}%) |", ""]
    if result.get("attention"):
        lines += ["## Where the mode's cost goes: decode attention, 16 sequences, 8/4 heads of 64", "",
                  "| context | decode kernel, 1 call | prefill kernel, 1 call per sequence | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['context']} | {r['decode_ms']:.3f} ms | {r['prefill_ms']:.3f} ms | {r['ratio']:.1f}x |"
                  for r in result["attention"]]
        lines.append("")
    v = result.get("logprobs_vocab")
    if v:
        lines += ["## The log-probability work alone on a Qwen3-sized vocabulary", "",
                  f"log_softmax + top 5 + rank of 16 rows x {v['vocab_size']}: **{v['median_cpu_seconds'] * 1e3:.2f} ms** "
                  f"CPU ({v['median_seconds'] * 1e3:.2f} ms wall) per step.", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["invariant", "logprobs", "prompt_logprobs", "logprobs_vocab"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), help="for the invariant part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--name", default="logprobs_cost_cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = str(bench_model_path())
    result = result_record("benchmarks.logprobs_cost", argv, threads=args.threads, model=bench_model_info(path),
                           quick=args.quick, repeats=args.repeats)
    if "invariant" in args.parts:
        result["invariant"] = part_invariant(path, args.dtypes, args.quick, args.repeats, tuple(args.workloads))
    if "logprobs" in args.parts:
        result["logprobs"] = part_logprobs(path, args.quick, args.repeats)
    if "prompt_logprobs" in args.parts:
        result["prompt_logprobs"] = part_prompt_logprobs(path, args.quick, args.repeats)
    if "attention" in args.parts:
        result["attention"] = part_attention(args.repeats)
    if "logprobs_vocab" in args.parts:
        result["logprobs_vocab"] = part_logprobs_vocab(args.repeats)
    loads = [x for x in [loadavg()] if x is not None]
    result["peak_loadavg_1m"] = max(loads, default=None)
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(RESULTS_DIR, args.name, result, text)


if __name__ == "__main__":
    main()
