"""Stage 07 against GPTQModel itself: checkpoints GPTQModel 7.7.0 wrote, committed as fixtures.

`tools/gptqmodel_fixtures.py` had GPTQModel (in a venv of its own) quantize tiny random Qwen3,
Qwen2 and Llama models eight ways and recorded GPTQModel's own reading of each: the sha256 of
every layer's float32 dequantized weight from its torch kernel (after its loader turned v1 zeros
into v2), and the float32 logits and greedy tokens of its forward. The files are in
`tests/fixtures/gptqmodel/` (`base-ARCH.safetensors`: the float tensors GPTQModel wrote, shared
by the variants of one architecture; `NAME.safetensors`: the quantized tensors; `NAME.json`:
GPTQModel's config.json and the reference; `NAME.reference.safetensors`: the logits). No GPTQModel
is needed here.

Guards: every layer dequantizes to exactly GPTQModel's weights, float32 logits within 1e-4 of its
forward, greedy tokens through the engine equal its; the set covers v1 and v2 zeros, sym and
asym, 4 and 8 bits, groups 32/64/128/-1 and act-order; the asymmetric v1 variant with zero
points of 0 really tells the word-level reading from the field-by-field one.
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

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gptqmodel"
NAMES = sorted(p.name[: -len(".reference.safetensors")] for p in FIXTURES.glob("*.reference.safetensors"))
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def meta(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def checkpoint(name: str, dst: Path) -> Path:
    """The checkpoint folder GPTQModel wrote, put back together from the fixture's files."""
    m = meta(name)
    tensors = load_file(str(FIXTURES / f"base-{m['arch']}.safetensors"))
    tensors.update(load_file(str(FIXTURES / f"{name}.safetensors")))
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(m["config"]))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / f, dst / f)
    return dst


def digest(w: torch.Tensor) -> str:
    return hashlib.sha256(w.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def test_the_fixtures_cover_the_eight_variants():
    """v1 and v2 zeros, sym and asym, 4 and 8 bits, groups 32/64/128/-1, act-order, and an
    asymmetric v1 checkpoint with zero points of 0, each written by GPTQModel itself."""
    assert len(NAMES) == 8, NAMES
    cfgs = [meta(n)["config"]["quantization_config"] for n in NAMES]
    assert all(c["quant_method"] == "gptq" and c["meta"]["quantizer"][0].startswith("gptqmodel:") for c in cfgs)
    assert {c["checkpoint_format"] for c in cfgs} == {"gptq", "gptq_v2"}
    assert {c["sym"] for c in cfgs} == {True, False}
    assert {c["bits"] for c in cfgs} == {4, 8}
    assert {c["group_size"] for c in cfgs} == {32, 64, 128, -1}
    assert {c["desc_act"] for c in cfgs} == {True, False}
    assert {meta(n)["arch"] for n in NAMES} == {"qwen3", "qwen2", "llama"}
    assert any(c["checkpoint_format"] == "gptq" and not c["sym"] and meta(n)["reference"]["zero_points_of_0"]
               for n, c in zip(NAMES, cfgs))


@pytest.mark.parametrize("name", NAMES)
def test_gptqmodel_checkpoint_loads_with_its_exact_weights_and_logits(name, tmp_path, monkeypatch):
    """Every checkpoint matrix dequantizes to GPTQModel's float32 weight bit for bit; float32
    logits within 1e-4 of its forward on the same prompt; greedy tokens through the engine equal
    its greedy tokens."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    m = meta(name)
    ref = m["reference"]
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
    wrong = [n for n in seen if seen[n] != ref["weights"][n]["sha256"]]
    assert not wrong, f"dequantized weights differ from GPTQModel's in {wrong}"

    want = load_file(str(FIXTURES / f"{name}.reference.safetensors"))
    prompt = want["input_ids"].tolist()
    logits = model.compute_logits(forward_sequences(model, [prompt]))  # [T, vocab] float32
    logits = logits[: len(want["logits"])]  # GPTQModel's logits of the prompt's first positions
    torch.testing.assert_close(logits, want["logits"], rtol=0, atol=1e-4)

    llm = LLM(str(path), dtype="float32", max_model_len=64, max_num_seqs=2)
    try:
        [res] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=len(ref["greedy_tokens"]),
                                                      ignore_eos=True), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert list(res.outputs[0].token_ids) == ref["greedy_tokens"]


def test_the_zero_point_0_fixture_tells_word_level_from_field_by_field():
    """GPTQModel wrote the asymmetric v1 fixture with zero points of 0: its qzeros words only read
    right with one 32-bit +0x11111111 per word (the borrow given back); adding 1 field by field,
    as folovllm did before, changes the zeros of the neighbouring fields (weights off by a whole
    scale step there)."""
    [name] = [n for n in NAMES if meta(n)["config"]["quantization_config"]["checkpoint_format"] == "gptq"
              and not meta(n)["config"]["quantization_config"]["sym"]
              and not meta(n)["config"]["quantization_config"]["desc_act"]]
    bits = 4
    shifts = torch.arange(32 // bits, dtype=torch.int64) * bits
    differ = 0
    for key, words in load_file(str(FIXTURES / f"{name}.safetensors")).items():
        if key.endswith(".qzeros"):
            w = words.to(torch.int64) & 0xFFFFFFFF  # the unsigned 32-bit words
            word_level = (((w + 0x11111111) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF
            field_by_field = ((w.unsqueeze(-1) >> shifts) & 0xF) + 1
            differ += int((word_level != field_by_field).sum())
    assert differ > 0
