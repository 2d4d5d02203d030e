"""Our model files against HF transformers, logits in float32, for every architecture.

Guards: the Qwen3 / Qwen2 / Llama forward (q/k norm, biases, GQA, RoPE incl. llama3 scaling,
SwiGLU, tied and untied heads), weight loading (fused qkv / gate_up slices, sharded checkpoints),
and the attention layer's packed varlen prefill and cached decode paths.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from folovllm.model_executor.model_loader import load_model
from tests.helpers import ARCHS, hf_logits, our_decode_logits, our_prefill_logits

ATOL = 1e-4


def _prompts(vocab_size: int, lens: tuple[int, ...] = (1, 5, 37, 130), seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lens]


def _assert_close(ours: list[torch.Tensor], hf_model, prompts: list[list[int]]) -> None:
    for p, got in zip(prompts, ours):
        want = hf_logits(hf_model, p)
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        # The logits are O(1..10): 1e-4 is float32 rounding, not a near miss of a real bug.
        assert want.abs().max().item() > 1.0
        assert err <= ATOL, f"prompt of {len(p)} tokens: max |ours - HF| = {err:.2e}"


@pytest.fixture(scope="module")
def our_models(tiny_checkpoints):
    return {arch: load_model(str(path), torch.float32)[0] for arch, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_hf(arch, our_models, hf_models):
    hf = hf_models(arch)
    prompts = _prompts(hf.config.vocab_size)
    # One prompt alone, then all of them packed into one flat batch of different lengths.
    _assert_close(our_prefill_logits(our_models[arch], prompts[2:3]), hf, prompts[2:3])
    _assert_close(our_prefill_logits(our_models[arch], prompts), hf, prompts)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_through_kv_cache_matches_hf(arch, our_models, hf_models):
    """Prefill part of each prompt, then one token per step read back from the KV cache."""
    hf = hf_models(arch)
    prompts = _prompts(hf.config.vocab_size, lens=(6, 20, 45))
    ours = our_decode_logits(our_models[arch], prompts, num_prefill=[1, 12, 30])
    _assert_close(ours, hf, prompts)


def test_architecture_variants_are_really_different(our_models):
    """The three checkpoints exercise different code: q/k norm (qwen3), q/k/v bias (qwen2)."""
    def attn(arch):
        return our_models[arch].model.layers[0].self_attn

    assert attn("qwen3").qk_norm and attn("qwen3").qkv_proj.bias is None
    assert not attn("qwen2").qk_norm and attn("qwen2").qkv_proj.bias is not None
    assert attn("qwen2").qkv_proj.bias.abs().sum() > 0  # loaded, not left at zero
    assert not attn("llama").qk_norm and attn("llama").qkv_proj.bias is None


def test_untied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from folovllm.testing.tiny_model import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "untied", arch="qwen3", tie_word_embeddings=False, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # The case is real: the checkpoint's head differs from its embedding.
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ours = load_model(str(path), torch.float32)[0]
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)
    prompts = _prompts(hf.config.vocab_size)
    _assert_close(our_prefill_logits(ours, prompts), hf, prompts)


def test_sharded_checkpoint(tmp_path, tiny_qwen3, hf_qwen3, our_models):
    sharded = tmp_path / "sharded"
    hf_qwen3.save_pretrained(sharded, max_shard_size="50KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    ours = load_model(str(sharded), torch.float32)[0]
    prompts = _prompts(hf_qwen3.config.vocab_size)
    _assert_close(our_prefill_logits(ours, prompts), hf_qwen3, prompts)
    # Same weights as the single-file checkpoint, tensor for tensor.
    single = dict(our_models["qwen3"].named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, single[name]), name


def test_llama3_rope_scaling(tmp_path):
    """Llama 3.x scales RoPE frequencies by wavelength; positions past the original context
    (here 64) only match HF if the scaling is right."""
    import transformers

    from folovllm.testing.tiny_model import SIZES

    config = transformers.LlamaConfig(
        vocab_size=300,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
        rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=True, **SIZES["tiny"],
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.save_pretrained(tmp_path / "llama3")
    ours, hf_config, _ = load_model(str(tmp_path / "llama3"), torch.float32)
    assert hf_config.rope_parameters["rope_type"] == "llama3"
    # The scaled table really differs from the unscaled one (else the test proves nothing).
    from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    plain = RotaryEmbedding(16, 1024, 10000.0).cos_sin_cache
    assert not torch.allclose(ours.model.layers[0].self_attn.rotary_emb.cos_sin_cache, plain)
    prompts = _prompts(300, lens=(150,))
    _assert_close(our_prefill_logits(ours, prompts), hf, prompts)
