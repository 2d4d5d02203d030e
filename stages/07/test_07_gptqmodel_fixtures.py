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

import pytest
import torch
from safetensors.torch import load_file
from tool_fixtures import ROOT, check_against_the_tool, checkpoint, fixture_names
from tool_fixtures import meta as tool_meta

from folovllm.model_executor.layers.quantization.gptq import KERNEL_ENV

TOOL = "gptqmodel"
FIXTURES = ROOT / TOOL
NAMES = fixture_names(TOOL)


def meta(name: str) -> dict:
    return tool_meta(TOOL, name)


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
    path = checkpoint(TOOL, name, FIXTURES / f"base-{m['arch']}.safetensors", tmp_path / name)
    check_against_the_tool(TOOL, name, path, {n: w["sha256"] for n, w in m["reference"]["weights"].items()})


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
