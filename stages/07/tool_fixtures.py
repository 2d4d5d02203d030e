"""Checkpoints written by the quantization tools themselves (GPTQModel, llm-compressor), kept as
test fixtures under tests/fixtures/<tool>/, and the one check both tools' tests run on them.

Each fixture is `NAME.safetensors` (the quantized tensors), `NAME.json` (the tool's config.json
and its own reading: per-layer sha256 of the float32 dequantized weight, greedy tokens) and
`NAME.reference.safetensors` (the prompt and the tool's float32 logits); the float tensors and the
tokenizer are shared (`gptqmodel/base-ARCH.safetensors`, `gptqmodel/tokenizer*.json`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from folovllm import LLM, SamplingParams
from folovllm.model_executor.layers.linear import LinearBase
from folovllm.model_executor.layers.quantization.gptq import dequantize_gptq
from folovllm.model_executor.model_loader import load_model
from folovllm.tools.gptq_quantizer import forward_sequences

ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fixture_names(tool: str) -> list[str]:
    return sorted(p.name[: -len(".reference.safetensors")] for p in (ROOT / tool).glob("*.reference.safetensors"))


def meta(tool: str, name: str) -> dict:
    return json.loads((ROOT / tool / f"{name}.json").read_text())


def digest(w: torch.Tensor) -> str:
    return hashlib.sha256(w.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def checkpoint(tool: str, name: str, base: Path, dst: Path) -> Path:
    """The checkpoint folder the tool wrote, put back together from the fixture's files."""
    m = meta(tool, name)
    tensors = load_file(str(base))
    tensors.update(load_file(str(ROOT / tool / f"{name}.safetensors")))
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(m["config"]))
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the tiny models' one tokenizer
        shutil.copy(ROOT / "gptqmodel" / f, dst / f)
    return dst


def check_against_the_tool(tool: str, name: str, path: Path, weight_sha256: dict[str, str]) -> None:
    """Every checkpoint matrix dequantizes to the tool's float32 weight bit for bit (`weight_sha256`:
    layer name -> sha256); float32 logits within 1e-4 of its forward on the same prompt; greedy
    tokens through the engine equal its greedy tokens. (Call with the reference GPTQ kernel.)"""
    ref = meta(tool, name)["reference"]
    model = load_model(str(path), torch.float32)[0]
    seen = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, LinearBase):
            w = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, model.quant_config.bits)
            parent, own = prefix.rsplit(".", 1)
            for part, rows in zip(PARTS.get(own, (own,)), w.t().split(layer.output_sizes)):  # [N_part, K]
                seen[f"{parent}.{part}"] = digest(rows)
    assert seen.keys() == weight_sha256.keys()
    wrong = [n for n in seen if seen[n] != weight_sha256[n]]
    assert not wrong, f"dequantized weights differ from {tool}'s in {wrong}"

    want = load_file(str(ROOT / tool / f"{name}.reference.safetensors"))
    prompt = want["input_ids"].tolist()
    logits = model.compute_logits(forward_sequences(model, [prompt]))  # [T, vocab] float32
    logits = logits[: len(want["logits"])]  # the tool's logits of the prompt's first positions
    torch.testing.assert_close(logits, want["logits"], rtol=0, atol=1e-4)

    llm = LLM(str(path), dtype="float32", max_model_len=64, max_num_seqs=2)
    try:
        [res] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=len(ref["greedy_tokens"]),
                                                      ignore_eos=True), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert list(res.outputs[0].token_ids) == ref["greedy_tokens"]
