"""Stage 04 end to end: every attention backend gives the same greedy tokens as HF and stage 03."""

from __future__ import annotations

import os

import pytest

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm._custom_ops import ops_available
from tests.helpers import hf_greedy, mixed_prompts

CPU_BACKENDS = ["torch_flash", "sdpa"] + (["cpu_attn"] if ops_available() else [])


def run(path, stage: int, prompts, max_tokens, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), stage=stage, dtype="float32", max_num_seqs=4, max_model_len=256, **kw)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm


@pytest.fixture(scope="module")
def workload(hf_qwen3):
    prompts, max_tokens = mixed_prompts(hf_qwen3.config.vocab_size, seed=5)
    reference = [hf_greedy(hf_qwen3, p, m) for p, m in zip(prompts, max_tokens)]
    return prompts, max_tokens, reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_greedy_matches_hf_and_stage_03(tiny_qwen3, workload, backend):
    prompts, max_tokens, reference = workload
    out4, llm = run(tiny_qwen3, 4, prompts, max_tokens, attention_backend=backend)
    assert llm.llm_engine.config.attention_backend == backend
    out3, _ = run(tiny_qwen3, 3, prompts, max_tokens)
    assert out4 == reference
    assert out4 == out3


@pytest.mark.parametrize("backend", ["naive", *CPU_BACKENDS])
def test_metadata_is_built_once_per_step(tiny_qwen3, backend):
    """The runner builds the step's metadata before the forward pass, once for all layers: one
    `build_metadata` per model forward, and every layer's `forward` gets that very object."""
    llm = LLM(str(tiny_qwen3), stage=4, dtype="float32", max_num_seqs=4, max_model_len=256,
              attention_backend=backend)
    runner = llm.llm_engine.model_runner
    be, layers = runner.attn_backend, len(runner.attn_layers)
    assert layers > 1 and all(layer.backend is be for layer in runner.attn_layers)
    built, seen, steps = [], [], []  # metadata built; given to each layer; given to the model
    build, forward = be.build_metadata, be.forward

    def counting_build(common, key_cache):
        built.append(build(common, key_cache))
        return built[-1]

    def counting_forward(q, key_cache, value_cache, md, scale):
        seen.append(md)
        return forward(q, key_cache, value_cache, md, scale)

    be.build_metadata, be.forward = counting_build, counting_forward  # this instance only
    runner.model.register_forward_pre_hook(lambda model, args: steps.append(args[2]))
    llm.generate([[5, 6, 7], [9] * 20], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(steps) >= 4 and len(built) == len(steps) and len(seen) == layers * len(steps)
    assert all(md is step for md, step in zip(built, steps))
    assert all(md is steps[i // layers] for i, md in enumerate(seen))


def test_stage_04_default_backend_on_cpu():
    # With our compiled kernels (they build where gcc is: ninja comes with the package): the
    # cpu_attn backend; without them, SDPA.
    config = EngineConfig.for_stage(4).resolve(max_position_embeddings=1024)
    expected = ("all", "cpu_attn") if ops_available() else ("none", "sdpa")
    assert (config.custom_ops, config.attention_backend) == expected
    plain = EngineConfig.for_stage(4, custom_ops="none").resolve(1024)
    assert (plain.custom_ops, plain.attention_backend) == ("none", "sdpa")
    assert EngineConfig.for_stage(3).resolve(1024).attention_backend == "naive"


def test_unavailable_backends_are_refused_clearly():
    with pytest.raises(ValueError, match="flash_attn' needs device='cuda'"):
        EngineConfig.for_stage(4, attention_backend="flash_attn")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="triton' needs device='cuda'"):
            EngineConfig.for_stage(4, attention_backend="triton")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig.for_stage(4, attention_backend="xformers")


def test_flash_attn_backend_equals_naive_where_installed():
    """flash-attn is optional (CUDA, block_size a multiple of 256): tested wherever it exists."""
    pytest.importorskip("flash_attn")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("flash_attn needs CUDA")
    from folovllm.model_executor.attention_backends import get_attn_backend
    from folovllm.model_executor.layers.attention import naive_attention
    from tests.attention_utils import Batch, random_paged_batch, run_backend

    batch = Batch((5, 1, 40), (300, 257, 40), heads=8, kv_heads=2, head_dim=128, block_size=256)
    q, key_cache, value_cache, md = random_paged_batch(batch, torch.float16, seed=0, device="cuda")
    out = run_backend(get_attn_backend("flash_attn"), q, key_cache, value_cache, md, 128**-0.5)
    ref = naive_attention(q.float(), key_cache.float(), value_cache.float(), md, 128**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)
