"""Where stage 11's time goes: the LoRA op against the base linears in the multi-LoRA run, and
merge-and-swap's cost taken apart, on `benchmarks.stage11_lora`'s workload (printed, one thread).

    python -m benchmarks.stage11_lora_profile              # 3 rounds, about a minute of CPU each
    python -m benchmarks.stage11_lora_profile --rounds 1

How: the multi-LoRA engine's `PunicaWrapper.add_lora_linear` (the LoRA op, one call per LoRA
layer) is wrapped on that engine's instance by a timer, and forward hooks on every
`LinearWithLoRA` time the whole layer, both with `time.thread_time` (one torch thread: the work
runs in this thread); the base linears are the layers' time minus the op's. Merge-and-swap is split into
its merges (`MergeSwap.merge_cpu_seconds`) and the same four batches of four requests run on
engines that hold the merged weights already (`MergedCopies`). All numbers are CPU seconds of
this process for the whole workload (16 requests, 32 output tokens each); the prompts alone (one
output token) are measured too, to split each run into prefill and decode.

The cost model it checks: merge-swap = merges + k batches of n/k requests; multi-LoRA = one
batch of n requests + the LoRA op. So however cheap the LoRA op gets,

    merge-swap / multi-LoRA  <=  (merges + k batches of n/k) / (one batch of n)

and that bound is set by the base model's own batching gain on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch


def lora_op_timer(llm: Any) -> dict[str, float]:
    """Time this engine's LoRA op (`PunicaWrapper.add_lora_linear`, one call per LoRA layer) and
    the linears it adds to, in thread CPU seconds, accumulated in the returned dict. The op is
    wrapped on this engine's own `PunicaWrapper` instance (timing only, same arguments, same
    result); the linears by forward hooks on every `LinearWithLoRA`."""
    from folovllm.lora.layers import LinearWithLoRA

    acc = {"lora_op": 0.0, "lora_op_decode": 0.0, "decode_calls": 0.0, "linear_with_lora": 0.0}
    punica = llm.llm_engine.model_runner.lora_manager.punica
    op = punica.add_lora_linear

    def timed_op(*args: Any, **kwargs: Any) -> None:
        start = time.thread_time()
        op(*args, **kwargs)
        spent = time.thread_time() - start
        acc["lora_op"] += spent
        if args[1].shape[0] <= 16:  # x [T, in]: a step of at most 16 tokens, here a decode step
            acc["lora_op_decode"] += spent
            acc["decode_calls"] += 1

    punica.add_lora_linear = timed_op
    start: dict[int, float] = {}

    def pre(module: torch.nn.Module, args: Any) -> None:
        start[id(module)] = time.thread_time()

    def post(module: torch.nn.Module, args: Any, out: Any) -> None:
        acc["linear_with_lora"] += time.thread_time() - start.pop(id(module))

    for module in llm.llm_engine.model_runner.model.modules():
        if isinstance(module, LinearWithLoRA):
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
    return acc


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks.bench_model import bench_model_info, bench_model_path
    from benchmarks.stage11_lora import (NUM_ADAPTERS, NUM_REQUESTS, RANK, MergedCopies, MergeSwap, engine,
                                         generate, make_loras, make_prompts)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = bench_model_path()
    prompts = make_prompts(NUM_REQUESTS, bench_model_info(path)["vocab_size"])
    loras = make_loras(path, Path(tempfile.mkdtemp(prefix="stage11_profile_")), RANK, NUM_ADAPTERS)
    per_request = [loras[i % NUM_ADAPTERS] for i in range(NUM_REQUESTS)]
    base = engine(path)
    multi = engine(path, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    swap, copies = MergeSwap(engine(path), per_request), MergedCopies(path, per_request)
    acc = lora_op_timer(multi)

    def prefill_only(llm: Any, batch: list[list[int]]) -> Any:
        from folovllm import SamplingParams

        return llm.generate(batch, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)

    def cpu(fn: Any) -> float:
        t = time.process_time()
        fn()
        return time.process_time() - t

    rows: dict[str, list[float]] = {}
    for i in range(args.rounds + 1):  # round 0 warms up
        acc.update(lora_op=0.0, lora_op_decode=0.0, decode_calls=0.0, linear_with_lora=0.0)
        r = {"base (16 requests, one batch)": cpu(lambda: generate(base, prompts, None)),
             "multi-lora (one batch)": cpu(lambda: generate(multi, prompts, per_request))}
        r["  of which LoRA op"] = acc["lora_op"]
        r["    of which in decode steps (<= 16 tokens)"] = acc["lora_op_decode"]
        r["    decode calls"] = acc["decode_calls"]
        r["  of which base linears it adds to"] = acc["linear_with_lora"] - acc["lora_op"]
        r["merge-swap"] = cpu(lambda: swap.run(prompts, per_request))
        r["  of which merges"] = swap.merge_cpu_seconds
        r["merged copies (4 batches of 4)"] = cpu(lambda: copies.run(prompts, per_request))
        # the prompts alone (one output token): what no system multiplies
        r["base, prefill only"] = cpu(lambda: prefill_only(base, prompts))
        r["merged copies, prefill only"] = cpu(lambda: [prefill_only(llm, [prompts[j] for j in range(NUM_REQUESTS)
                                                                             if per_request[j].lora_int_id == i])
                                                        for i, llm in copies.engines.items()])
        if i:
            for k, v in r.items():
                rows.setdefault(k, []).append(v)
        print(f"round {i}: " + ", ".join(f"{k.strip()} {v:.3f}" for k, v in r.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedian CPU seconds over {args.rounds} rounds (load {__import__('os').getloadavg()[0]:.1f}):")
    for k, v in med.items():
        print(f"  {k:<36} {v:7.3f}")
    base_s, multi_s = med["base (16 requests, one batch)"], med["multi-lora (one batch)"]
    bound = (med["  of which merges"] + med["merged copies (4 batches of 4)"]) / base_s
    print(f"\nmulti-lora / base: {base_s / multi_s:.3f}x   merge-swap / multi-lora: {med['merge-swap'] / multi_s:.2f}x"
          f"   bound with a free LoRA op, (merges + 4 batches of 4) / one batch of 16: {bound:.2f}x"
          f"   batching gain of the base model alone, 4 batches of 4 / one of 16: "
          f"{med['merged copies (4 batches of 4)'] / base_s:.2f}x")
    d16 = base_s - med["base, prefill only"]
    d4 = med["merged copies (4 batches of 4)"] - med["merged copies, prefill only"]
    print(f"decode alone: one batch of 16 {d16:.3f} s, 4 batches of 4 {d4:.3f} s ({d4 / d16:.2f}x); "
          f"prefill {med['base, prefill only']:.3f} s of the base run's {base_s:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
