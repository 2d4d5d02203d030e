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

import pytest
from tool_fixtures import ROOT, check_against_the_tool, checkpoint, fixture_names
from tool_fixtures import meta as tool_meta

from folovllm.model_executor.layers.quantization.gptq import KERNEL_ENV

TOOL = "llmcompressor"
NAMES = fixture_names(TOOL)


def meta(name: str) -> dict:
    return tool_meta(TOOL, name)


def test_the_fixtures_cover_sym_asym_group_channel():
    weights = [meta(n)["config"]["quantization_config"]["config_groups"]["group_0"]["weights"] for n in NAMES]
    assert {(w["symmetric"], w["strategy"]) for w in weights} == {(True, "group"), (False, "group"), (False, "channel")}
    assert all(meta(n)["config"]["quantization_config"]["format"] == "pack-quantized" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_llmcompressor_checkpoint_loads_with_its_exact_weights_and_logits(name, tmp_path, monkeypatch):
    """Every layer dequantizes to the tool's dense float32 weight bit for bit; float32 logits
    within 1e-4 of its forward; greedy tokens through the engine equal its greedy tokens."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    m = meta(name)
    path = checkpoint(TOOL, name, ROOT / m["base"], tmp_path / name)
    check_against_the_tool(TOOL, name, path, m["reference"]["weights"])
