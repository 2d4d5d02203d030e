"""Stage 07 against llm-compressor itself: compressed-tensors checkpoints llm-compressor 0.14 wrote,
committed as fixtures.

`python tools/llmcompressor_checkpoint.py OUT --fixtures` had llm-compressor (`GPTQModifier`
with config groups of 4-bit weights, in a venv of its own) quantize the tiny random Qwen3 cut to
one layer three ways (symmetric and asymmetric groups of 32, asymmetric channel-wise; actorder
"static", its default) and recorded the tool's own reading of each: transformers + compressed-tensors
decompressing it (`run_compressed=False`), the sha256 of every layer's float32 dense weight, the
float32 logits of its forward on a fixed prompt and 8 greedy tokens. Files:
`tests/fixtures/llmcompressor/` (`NAME.safetensors`: `weight_packed`, `weight_scale`,
`weight_zero_point`, `weight_shape`; `NAME.json`: its config.json and the reference;
`NAME.reference.safetensors`: the logits). The float tensors and the tokenizer are GPTQModel's
fixtures' (`gptqmodel/base-qwen3.safetensors`, bfloat16): the model given to llm-compressor had exactly
those values, which the tool script checked when it packed the files. No llm-compressor is
needed here. llm-compressor 0.14 no longer writes act-order `weight_g_idx` (actorder "group" is
gone from compressed-tensors 0.19); `test_07_compressed_tensors.py` covers it from the spec.

Guards: every layer dequantizes to exactly the tool's dense weights, float32 logits within 1e-4
of its forward, greedy tokens through the engine equal its greedy tokens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from folovllm import LLM, SamplingParams
from folovllm.model_executor.layers.linear import LinearBase
from folovllm.model_executor.layers.quantization.gptq import KERNEL_ENV, dequantize_gptq
from folovllm.model_executor.model_loader import load_model
from folovllm.tools.gptq_quantizer import forward_sequences

ROOT = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
FIXTURES = ROOT / "llmcompressor"
NAMES = sorted(p.name[: -len(".reference.safetensors")] for p in FIXTURES.glob("*.reference.safetensors"))
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def meta(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def checkpoint(name: str, dst: Path) -> Path:
    """The checkpoint folder llm-compressor wrote, put back together from the fixture's files."""
    m = meta(name)
    tensors = load_file(str(ROOT / m["base"]))
    tensors.update(load_file(str(FIXTURES / f"{name}.safetensors")))
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(m["config"]))
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the tiny models' one tokenizer
        shutil.copy(ROOT / "gptqmodel" / f, dst / f)
    return dst


def digest(w: torch.Tensor) -> str:
    return hashlib.sha256(w.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def test_the_fixtures_cover_sym_asym_group_channel():
    weights = [meta(n)["config"]["quantization_config"]["config_groups"]["group_0"]["weights"] for n in NAMES]
    assert {(w["symmetric"], w["strategy"]) for w in weights} == {(True, "group"), (False, "group"), (False, "channel")}
    assert all(meta(n)["config"]["quantization_config"]["format"] == "pack-quantized" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_llmcompressor_checkpoint_loads_with_its_exact_weights_and_logits(name, tmp_path, monkeypatch):
    """Every layer dequantizes to the tool's dense float32 weight bit for bit; float32 logits
    within 1e-4 of its forward; greedy tokens through the engine equal its greedy tokens."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    ref = meta(name)["reference"]
    path = checkpoint(name, tmp_path / name)
    model = load_model(str(path), torch.float32)[0]
    seen = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, LinearBase):
            w = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, model.quant_config.bits)
            parent, own = prefix.rsplit(".", 1)
            for part, rows in zip(PARTS.get(own, (own,)), w.t().split(layer.output_sizes)):  # [N_part, K]
                seen[f"{parent}.{part}"] = digest(rows)
    assert seen.keys() == ref["weights"].keys()
    wrong = [n for n in seen if seen[n] != ref["weights"][n]]
    assert not wrong, f"dequantized weights differ from llm-compressor's in {wrong}"

    want = load_file(str(FIXTURES / f"{name}.reference.safetensors"))
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
