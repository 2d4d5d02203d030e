"""Stage 11 on CPU: many LoRA adapters in one batch against the base model alone and against
merge-and-swap, side by side in one process, on one thread.

    python -m benchmarks.stage11_lora               # full run, several minutes on one thread
    python -m benchmarks.stage11_lora --quick       # smoke run (small, printed, not written)

The bench model (`benchmarks.bench_model`: Qwen3, 8 layers, random weights), float32, greedy,
`ignore_eos`, stage 05 (chunked prefill; no prefix cache, so repeats cost the same), 16 requests
of 16..128 prompt tokens and 32 output tokens each, submitted at once. Adapters: random, written
in PEFT's format (`folovllm.testing.lora_adapter`), rank 16 on all seven projections. Request i
runs under adapter i % 4.

    base          the same 16 requests on the base model, no adapter, enable_lora off
    multi-lora    enable_lora, max_loras=4: all 16 requests in one batch, each with its adapter;
                  the C++ SGMV kernel (csrc/cpu/lora.cpp) for every step (custom_ops="all")
    multi-lora    the same engine with the C++ BGMV kernel for decode steps (per token)
      (C++ bgmv decode)
    multi-lora    the same engine with the torch ops (the padded-bmm SGMV): before the kernel
      (torch ops)
    merge-swap    the base engine; for each adapter: merge it into the weights (W += s B A, the
                  fused layers' rows, re-laid out as the engine lays out that shape: streaming
                  panels or oneDNN's blocked layout), run its 4 requests, restore the weights.
                  Adapters are read from disk once, untimed (as the LRU keeps them); the merge
                  time is recorded apart as well.
    merged copies one engine per adapter with it merged in for good, untimed (4 copies of the
                  weights): each adapter's 4 requests as one batch on its engine. The strongest
                  merge-based baseline: merge-swap without the merges.

Then the cost of LoRA by rank (4, 8, 16, 64; max_lora_rank = rank) and by distinct adapters in
the batch (1, 2, 4, 8, 16; max_loras = that many), each against the base run in the same
round. Interleaved repeats, medians; output tok/s = 16 x 32 / wall time. Tokens: multi-lora and
merge-swap must agree (the same math, another summation order: recorded, not assumed).

Writes `benchmarks/results/stage11_lora_cpu.json`, `.md` and `stage11_lora_cpu.png`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import Timing, interleave, peak_loadavg, summarize, timed
from benchmarks.results import machine_short, shared_machine_note

NUM_REQUESTS, OUTPUT_TOKENS, NUM_ADAPTERS, RANK = 16, 32, 4, 16
RANKS = (4, 8, 16, 64)
DISTINCT = (1, 2, 4, 8, 16)


def make_prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))] for _ in range(num)]


def make_loras(path: Path, root: Path, rank: int, count: int) -> list[Any]:
    from folovllm.lora.request import LoRARequest
    from folovllm.model_executor.model_loader import load_hf_config
    from folovllm.testing.lora_adapter import write_random_lora

    cfg = load_hf_config(path)
    return [LoRARequest(f"r{rank}-{i}", 1000 * rank + i + 1,
                        str(write_random_lora(root / f"r{rank}-{i}", cfg, rank, seed=i)))
            for i in range(count)]


def engine(path: Path, **lora: Any) -> Any:
    from folovllm import LLM

    return LLM(str(path), stage=5, max_model_len=512, **lora)


def generate(llm: Any, prompts: list[list[int]], loras: Optional[list[Any]]) -> list[list[int]]:
    from folovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return [list(o.outputs[0].token_ids) for o in outs]


class MergeSwap:
    """Serve one adapter at a time by merging it into the base weights: W' = W + B' A (B' holds
    the scaling), for every adapted projection, in the fused layers' rows; the original weight
    objects are kept and put back to unmerge."""

    def __init__(self, llm: Any, loras: list[Any]) -> None:
        from folovllm.lora.lora_model import LoRAModel
        from folovllm.testing.lora_adapter import projection_shapes

        self.llm = llm
        self.model = llm.llm_engine.model_runner.model
        cfg = self.model.config
        shapes = projection_shapes(cfg)
        expected = {f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}": s
                    for i in range(cfg.num_hidden_layers) for p, s in shapes.items()}
        dtype = self.model.model.embed_tokens.weight.dtype
        self.adapters = {r.lora_int_id: LoRAModel.from_local_checkpoint(r, expected, 1024, dtype) for r in loras}

    def _target(self, module: str) -> tuple[Any, int]:
        """Checkpoint module name -> (our linear layer, first row of its part)."""
        parent, leaf = module.rsplit(".", 1)
        fused, shard = self.model.stacked_params_mapping.get(leaf, (leaf, None))
        layer = self.model.get_submodule(f"{parent}.{fused}")
        part = 0 if shard is None else layer.shard_ids.index(shard)
        return layer, sum(layer.output_partition_sizes[:part])

    def merge(self, lora_int_id: int) -> dict[Any, Any]:
        import torch
        from torch import nn

        from folovllm.model_executor.layers.cpu_gemm import pack_linear_weight, unpack_weight, weight_packing

        saved: dict[Any, Any] = {}
        dense: dict[Any, torch.Tensor] = {}
        for module, w in self.adapters[lora_int_id].loras.items():
            layer, row = self._target(module)
            if layer not in dense:
                saved[layer] = layer.weight
                dense[layer] = unpack_weight(layer.weight).clone()  # [out, in], whatever the layout
            dense[layer][row:row + w.lora_b.shape[0]] += w.lora_b @ w.lora_a  # [out, r] @ [r, in]
        for layer, weight in dense.items():
            layer.weight = nn.Parameter(weight, requires_grad=False)
            # re-laid out as the engine laid out the original (streaming panels or oneDNN's
            # blocked layout, chosen by shape): the merged model runs the base model's kernels
            packed = saved[layer].is_mkldnn or saved[layer].dim() == 3
            with weight_packing(packed):
                pack_linear_weight(layer)
        return saved

    def run(self, prompts: list[list[int]], loras: list[Any]) -> list[list[int]]:
        import time

        out: list[Optional[list[int]]] = [None] * len(prompts)
        self.merge_cpu_seconds = 0.0  # of this run: the part of its cost that is merging
        for lora_id in dict.fromkeys(r.lora_int_id for r in loras):
            rows = [i for i, r in enumerate(loras) if r.lora_int_id == lora_id]
            start = time.process_time()
            saved = self.merge(lora_id)
            self.merge_cpu_seconds += time.process_time() - start
            try:
                for i, tokens in zip(rows, generate(self.llm, [prompts[i] for i in rows], None)):
                    out[i] = tokens
            finally:
                for layer, weight in saved.items():  # unmerge: the original weights back
                    layer.weight = weight
        return out  # type: ignore[return-value]


class MergedCopies:
    """The strongest merge-based baseline: one engine per adapter with that adapter merged in
    for good (what serving each fine-tune as its own model amounts to: k copies of the weights,
    no merge at run time). Each adapter's requests run as one batch on its own engine; merging
    happens once, here, untimed."""

    def __init__(self, path: Path, loras: list[Any]) -> None:
        self.engines = {}
        for r in dict.fromkeys(loras):
            llm = engine(path)
            MergeSwap(llm, [r]).merge(r.lora_int_id)  # kept: never unmerged
            self.engines[r.lora_int_id] = llm

    def run(self, prompts: list[list[int]], loras: list[Any]) -> list[list[int]]:
        out: list[Optional[list[int]]] = [None] * len(prompts)
        for lora_id, llm in self.engines.items():
            rows = [i for i, r in enumerate(loras) if r.lora_int_id == lora_id]
            for i, tokens in zip(rows, generate(llm, [prompts[i] for i in rows], None)):
                out[i] = tokens
        return out  # type: ignore[return-value]


def tok_per_s(t: Timing) -> float:
    return NUM_REQUESTS * OUTPUT_TOKENS / t.seconds


def median_tps(ts: list[Timing]) -> float:
    return statistics.median(tok_per_s(t) for t in ts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    global NUM_REQUESTS, OUTPUT_TOKENS
    if args.quick:
        NUM_REQUESTS, OUTPUT_TOKENS = 8, 8
    path = bench_model_path()
    info = bench_model_info(path)
    prompts = make_prompts(NUM_REQUESTS, info["vocab_size"])
    root = Path(tempfile.mkdtemp(prefix="stage11_lora_"))
    loras = make_loras(path, root, RANK, max(DISTINCT))
    per_request = [loras[i % NUM_ADAPTERS] for i in range(NUM_REQUESTS)]

    # -- the main comparison ----------------------------------------------------------------
    base = engine(path)
    multi = engine(path, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    multi_bgmv = engine(path, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    multi_bgmv.llm_engine.model_runner.lora_manager.punica.decode_kernel = "bgmv"
    multi_torch = engine(path, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    multi_torch.llm_engine.model_runner.lora_manager.punica.use_kernel = False
    kernels = multi.llm_engine.model_runner.lora_manager.punica.use_kernel
    swap = MergeSwap(engine(path), per_request)
    copies = MergedCopies(path, per_request)
    merge_seconds: list[float] = []

    def swap_run() -> list[list[int]]:
        tokens = swap.run(prompts, per_request)
        merge_seconds.append(swap.merge_cpu_seconds)
        return tokens
    trials: dict[str, Callable[[], Timing]] = {
        "base": lambda: timed(lambda: generate(base, prompts, None)),
        "multi-lora": lambda: timed(lambda: generate(multi, prompts, per_request)),
        "multi-lora (C++ bgmv decode)": lambda: timed(lambda: generate(multi_bgmv, prompts, per_request)),
        "multi-lora (torch ops)": lambda: timed(lambda: generate(multi_torch, prompts, per_request)),
        "merge-swap": lambda: timed(swap_run),
        "merged copies (one engine per adapter)": lambda: timed(lambda: copies.run(prompts, per_request)),
    }
    runs = interleave(trials, args.repeats, warmup=trials,
                      log=lambda n, i, t: print(f"  {n} #{i}: {tok_per_s(t):.1f} tok/s", flush=True))
    tokens = {name: ts[0].value for name, ts in runs.items()}
    agree = sum(a == b for a, b in zip(tokens["multi-lora"], tokens["merge-swap"]))
    agree_bgmv = sum(a == b for a, b in zip(tokens["multi-lora"], tokens["multi-lora (C++ bgmv decode)"]))
    agree_torch = sum(a == b for a, b in zip(tokens["multi-lora"], tokens["multi-lora (torch ops)"]))
    agree_copies = sum(a == b for a, b in zip(tokens["merge-swap"], tokens["merged copies (one engine per adapter)"]))
    main = {name: dict(**summarize(ts), median_tok_per_s=round(median_tps(ts), 2))
            for name, ts in runs.items()}
    del base, multi, multi_bgmv, multi_torch, swap, copies

    # -- cost by rank and by distinct adapters ------------------------------------------------
    sweeps: dict[str, list[dict[str, Any]]] = {"rank": [], "distinct": []}
    base = engine(path)
    points: list[tuple[str, int, Any, list[Any]]] = []
    for rank in (RANKS[:2] if args.quick else RANKS):
        rank_loras = make_loras(path, root, rank, NUM_ADAPTERS)
        llm = engine(path, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=rank)
        points.append(("rank", rank, llm, [rank_loras[i % NUM_ADAPTERS] for i in range(NUM_REQUESTS)]))
    for k in (DISTINCT[:2] if args.quick else DISTINCT):
        llm = engine(path, enable_lora=True, max_loras=k, max_lora_rank=RANK)
        points.append(("distinct", k, llm, [loras[i % k] for i in range(NUM_REQUESTS)]))
    sweep_trials = {"base": lambda: timed(lambda: generate(base, prompts, None))}
    for kind, value, llm, lrs in points:
        sweep_trials[f"{kind}={value}"] = (lambda llm=llm, lrs=lrs: timed(lambda: generate(llm, prompts, lrs)))
    sweep_runs = interleave(sweep_trials, args.repeats, warmup=sweep_trials)
    base_tps = median_tps(sweep_runs["base"])
    for kind, value, _, _ in points:
        ts = sweep_runs[f"{kind}={value}"]
        sweeps[kind].append(dict(value=value, median_tok_per_s=round(median_tps(ts), 2),
                                 ratio_to_base=round(median_tps(ts) / base_tps, 3), **summarize(ts)))
    loads = [x for ts in list(runs.values()) + list(sweep_runs.values()) for t in ts for x in [t.loadavg]]
    return dict(model=info, num_requests=NUM_REQUESTS, output_tokens=OUTPUT_TOKENS,
                num_adapters=NUM_ADAPTERS, rank=RANK, systems=main,
                same_tokens_multi_lora_vs_merge_swap=f"{agree}/{NUM_REQUESTS}",
                same_tokens_sgmv_vs_bgmv=f"{agree_bgmv}/{NUM_REQUESTS}",
                same_tokens_kernel_vs_torch_ops=f"{agree_torch}/{NUM_REQUESTS}", lora_kernels=kernels,
                same_tokens_merge_swap_vs_merged_copies=f"{agree_copies}/{NUM_REQUESTS}",
                merge_swap_merge_cpu_seconds=round(statistics.median(merge_seconds[1:] or merge_seconds), 3),
                sweep_base=dict(median_tok_per_s=round(base_tps, 2), **summarize(sweep_runs["base"])),
                sweeps=sweeps, peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    rows, base = result["systems"], result["systems"]["base"]["median_tok_per_s"]
    ml = result["systems"]["multi-lora"]["median_tok_per_s"]
    caption = (
        f"Stage 11: {result['num_requests']} requests ({result['output_tokens']} output tokens each) "
        f"over {result['num_adapters']} LoRA adapters of rank {result['rank']} on all seven "
        "projections, bench model (Qwen3, 8 layers, random weights), float32, stage 05, one "
        f"thread; median of {result['repeats']} interleaved runs: `{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}." + shared_machine_note(result)
    )
    base_cpu = result["systems"]["base"]["median_cpu_seconds"]
    ml_cpu = result["systems"]["multi-lora"]["median_cpu_seconds"]
    lines = [caption, "", "| system | output tok/s | × base (CPU) | multi-lora × it (CPU) | wall (CPU) |",
             "|:--|--:|--:|--:|--:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['median_tok_per_s']:.1f} | {r['median_tok_per_s'] / base:.2f} "
                     f"({base_cpu / r['median_cpu_seconds']:.2f}) | {ml / r['median_tok_per_s']:.2f} "
                     f"({r['median_cpu_seconds'] / ml_cpu:.2f}) | {r['median_seconds']:.2f} s "
                     f"({r['median_cpu_seconds']:.2f} s) |")
    lines += ["", f"Same tokens, multi-lora vs merge-swap: {result['same_tokens_multi_lora_vs_merge_swap']} "
              f"requests; SGMV vs BGMV decode: {result['same_tokens_sgmv_vs_bgmv']}; C++ kernels vs "
              f"torch ops: {result.get('same_tokens_kernel_vs_torch_ops', 'n/a')}; merge-swap vs merged "
              f"copies: {result.get('same_tokens_merge_swap_vs_merged_copies', 'n/a')}. Of merge-swap's CPU "
              f"time, merging and unmerging the 4 adapters took "
              f"{result.get('merge_swap_merge_cpu_seconds', float('nan')):.2f} s (median).", "",
              f"Cost by rank (4 adapters, max_lora_rank = rank) and by distinct adapters (rank "
              f"{result['rank']}, max_loras = adapters), against the base model in the same rounds "
              f"({result['sweep_base']['median_tok_per_s']:.1f} tok/s):", "",
              "| sweep | value | output tok/s | × base (CPU) |", "|:--|--:|--:|--:|"]
    sweep_base_cpu = result["sweep_base"]["median_cpu_seconds"]
    for kind, points in result["sweeps"].items():
        for p in points:
            lines.append(f"| {kind} | {p['value']} | {p['median_tok_per_s']:.1f} | {p['ratio_to_base']:.2f} "
                         f"({sweep_base_cpu / p['median_cpu_seconds']:.2f}) |")
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, result: dict[str, Any], name: str) -> None:
    from benchmarks.plots import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, (kind, label) in zip(axes, (("rank", "LoRA rank (4 adapters)"),
                                        ("distinct", f"distinct adapters in the batch (rank {result['rank']})"))):
        points = result["sweeps"][kind]
        base_cpu = result["sweep_base"]["median_cpu_seconds"]
        ax.plot([p["value"] for p in points], [p["ratio_to_base"] for p in points], "o--", alpha=0.5,
                label="wall time")
        ax.plot([p["value"] for p in points], [base_cpu / p["median_cpu_seconds"] for p in points], "o-",
                label="CPU time (not stretched by a shared machine)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["value"] for p in points], [str(p["value"]) for p in points])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("× base model (same rounds)")
    axes[0].set_ylim(0, 1.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("multi-LoRA cost, bench model, 16 requests, 1 thread (CPU)", fontsize=10)
    fig.tight_layout()
    out = _save(fig, Path(args.out) / f"{name}.png")
    print(f"wrote {out}")


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage11_lora", __doc__, argv, run, render_markdown,
               name="stage11_lora_cpu", written=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
