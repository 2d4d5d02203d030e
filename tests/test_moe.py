"""Mixture of experts (Qwen3-MoE, `layers/fused_moe.py`, `models/qwen3_moe.py`).

Guards:
- the grouped fast path (`fused_experts`) and the reference loop (`moe_reference`) both equal a
  per-(token, slot) formula written here, on random routings drawn by hypothesis, including
  experts no token chose, every token on one expert, one token, large batches;
- `moe_align` groups the pairs as its docstring draws;
- the router (`fused_topk`) equals HF's formula, renormalised or not;
- greedy tokens equal HF `Qwen3MoeForCausalLM` (float32) at every stage 01-06, on tiny random
  checkpoints: top-2 renormalised with a dense first layer (`mlp_only_layers`), top-1 not
  renormalised with untied embeddings, top-3 with a dense layer from `decoder_sparse_step`;
  and at tensor_parallel_size=2;
- the C++ kernel (`fused_experts_cpu`) equals the reference loop on random routings (hypothesis:
  empty experts, one expert, one token, partial panels, top-1..3, float32 and bfloat16, expert
  parallelism's skipped ids); out-of-range ids are refused;
- the engine lays the experts out for the kernel with custom_ops="all" and not with "none",
  with HF's tokens either way;
- each rank's slice of the experts (TP) sums to the unsplit layer;
- expert parallelism: each rank holds whole experts (E/N of them, 1/N of the bytes), their
  outputs add up to the layer, greedy = HF over two worker processes;
- routing counts in the step record, /metrics and the trace equal HF's router top-k; a dense
  model records nothing;
- GPTQ experts: `folovllm quantize` writes GPTQModel's layout (router float), the 4-bit experts
  equal the model on their dequantized weights (logits, greedy), the int4 kernel matches the
  reference, and they run over two expert-parallel ranks;
- bad configs and checkpoints, quantized experts other than GPTQ, GPTQ experts sliced by TP,
  and expert counts that do not divide by the ranks are refused with a ValueError naming the
  field or tensor.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm import LLM, SamplingParams
from folovllm.config import LATEST_STAGE, verify_tensor_parallel
from folovllm.distributed import parallel_state
from folovllm.model_executor.layers import fused_moe
from folovllm.model_executor.layers.cpu_gemm import weight_packing
from folovllm.model_executor.layers.fused_moe import FusedMoE, fused_experts, fused_topk, moe_align, moe_reference
from folovllm.model_executor.model_loader import load_model
from folovllm.testing.tiny_moe import MoeRecipe, build_tiny_moe_checkpoint
from tests.fixtures import GREEDY_MIN_DISTINCT
from tests.helpers import hf_greedy, hf_logits, mixed_prompts, num_distinct, our_decode_logits

RECIPES = {
    # top-2, weights renormalised to sum to 1, layer 0 dense, tied embeddings
    "top2-renorm-dense0": MoeRecipe(top_k=2, norm_topk_prob=True, mlp_only_layers=(0,)),
    # top-1 of softmax, not renormalised (the weight is the max probability), untied head
    "top1-untied": MoeRecipe(top_k=1, norm_topk_prob=False, tie_word_embeddings=False, seed=1),
    # top-3 of 6 experts, every second layer sparse (layer 0 dense by decoder_sparse_step)
    "top3-step2": MoeRecipe(num_experts=6, top_k=3, norm_topk_prob=False, decoder_sparse_step=2, seed=2),
}


def per_pair_formula(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """y[t] = sum_j w[t, j] * down(silu(gate(x[t])) * up(x[t])) with expert ids[t, j]: the
    definition, one (token, slot) at a time."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            h = F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])
            out[t] += topk_weights[t, j] * (w2[e] @ h)
    return out


def random_topk_ids(gen: torch.Generator, tokens: int, num_experts: int, top_k: int, skew: str) -> torch.Tensor:
    """[T, k] distinct expert ids per token. skew: "uniform"; "one" = every token's first choice
    is expert 0 (with k = 1: all tokens on one expert); "few" = only the first k+1 experts used."""
    pool = {"uniform": num_experts, "one": num_experts, "few": min(num_experts, top_k + 1)}[skew]
    ids = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(tokens)])
    if skew == "one":
        zero_at = (ids == 0).int().argmax(-1)  # move expert 0 to slot 0 (or put it there)
        has_zero = (ids == 0).any(-1)
        for t in range(tokens):
            if has_zero[t]:
                ids[t, zero_at[t]] = ids[t, 0]
            ids[t, 0] = 0
    return ids


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 3, 7, 16, 64, 200]),
    num_experts=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    skew=st.sampled_from(["uniform", "one", "few"]),
    seed=st.integers(0, 2**16),
)
def test_fused_and_reference_equal_the_formula(tokens, num_experts, k_frac, skew, seed):
    top_k = 1 + int(k_frac * (min(num_experts, 4) - 1))
    hidden, inter = 8, 6
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, dtype=torch.float64)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, dtype=torch.float64)
    topk_ids = random_topk_ids(gen, tokens, num_experts, top_k, skew)
    topk_weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    want = per_pair_formula(x, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(moe_reference(x, w13, w2, topk_weights, topk_ids), want)
    torch.testing.assert_close(fused_experts(x, w13, w2, topk_weights, topk_ids), want)
    if num_experts % 2 == 0:  # expert parallelism over 2 ranks: each its half, the sums add up
        half, total = num_experts // 2, torch.zeros_like(want)
        for mine in (slice(0, half), slice(half, num_experts)):
            expert_map = torch.full((num_experts,), -1, dtype=torch.long)
            expert_map[mine] = torch.arange(half)
            total += fused_experts(x, w13[mine], w2[mine], topk_weights, topk_ids, expert_map=expert_map)
        torch.testing.assert_close(total, want)
    groups = moe_align(topk_ids, topk_weights, num_experts)
    assert groups.num_experts_touched == len(set(topk_ids.flatten().tolist()))


# --8<-- [start:kernel_test]
@settings(max_examples=30, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 3, 9, 17, 64, 150]),
    num_experts=st.integers(1, 10),
    k_frac=st.floats(0.0, 1.0),
    skew=st.sampled_from(["uniform", "one", "few"]),
    shape=st.sampled_from([(8, 6), (33, 16), (64, 20), (100, 40), (160, 136)]),  # (hidden, intermediate): 160
    # and 144 (136 padded to 16) span two of the prefill path's k-blocks of 128
    renormalize=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_reference_loop(tokens, num_experts, k_frac, skew, shape, renormalize, dtype, seed):
    """`fused_experts_cpu` (csrc/cpu/moe.cpp, built for this process's FOLOVLLM_CPU_ISA: the CI
    runs the suite under both) against `moe_reference` in float64 on the same values: experts
    with no tokens, every token on one expert, one token, batches past a row tile, hidden and
    intermediate sizes that leave partial panels, top-1..3 renormalised or not, float32 and
    bfloat16 (fp32 accumulation, one rounding to bf16 at the end); and a token alone gets
    bitwise the result it gets in the batch."""
    if not fused_moe.ops_available():
        pytest.skip("the CPU kernels cannot be built here")
    top_k = 1 + int(k_frac * (min(num_experts, 3) - 1))
    hidden, inter = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    topk_ids = random_topk_ids(gen, tokens, num_experts, top_k, skew)
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    if renormalize:
        topk_weights /= topk_weights.sum(-1, keepdim=True)
    want = moe_reference(x.double(), w13.double(), w2.double(), topk_weights.double(), topk_ids)
    with weight_packing(True):
        w13p, w2p = fused_moe.prepack_moe_weight(w13, w2)
    got = fused_moe.fused_experts_cpu(x, w13p, w2p, topk_weights, topk_ids, inter)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    # a token alone gets bitwise its row of the batch: each output is one FMA chain in k order
    # whether its expert's rows took the decode tiles or the k-blocked prefill ones
    for t in sorted({0, tokens // 2, tokens - 1}):
        alone = fused_moe.fused_experts_cpu(x[t:t + 1], w13p, w2p, topk_weights[t:t + 1], topk_ids[t:t + 1], inter)
        assert torch.equal(alone[0], got[t])
    if num_experts % 2 == 0:  # expert parallelism: each rank's half, ids -1 skipped, sums add up
        half, total = num_experts // 2, torch.zeros_like(want)
        for mine in (slice(0, half), slice(half, num_experts)):
            expert_map = torch.full((num_experts,), -1, dtype=torch.long)
            expert_map[mine] = torch.arange(half)
            with weight_packing(True):
                p13, p2 = fused_moe.prepack_moe_weight(w13[mine], w2[mine])
            total += fused_moe.fused_experts_cpu(x, p13, p2, topk_weights, topk_ids, inter, expert_map).double()
        torch.testing.assert_close(total, want, **tol)
# --8<-- [end:kernel_test]


def test_kernel_refuses_ids_outside_the_experts():
    if not fused_moe.ops_available():
        pytest.skip("the CPU kernels cannot be built here")
    with weight_packing(True):
        w13p, w2p = fused_moe.prepack_moe_weight(torch.randn(4, 32, 16), torch.randn(4, 16, 16))
    with pytest.raises(RuntimeError, match="expert id 4 is not in 0..3"):
        fused_moe.fused_experts_cpu(torch.randn(2, 16), w13p, w2p, torch.ones(2, 1), torch.tensor([[0], [4]]), 16)


def test_moe_align_is_the_docstring_picture():
    topk_ids = torch.tensor([[2, 0], [0, 3], [2, 0]])
    weights = torch.arange(6, dtype=torch.float32).reshape(3, 2)  # weight of pair p = p
    groups = moe_align(topk_ids, weights, num_experts=4)
    assert groups.sorted_token_ids.tolist() == [0, 1, 2, 0, 2, 1]
    assert groups.sorted_weights.tolist() == [1, 2, 5, 0, 4, 3]  # the pairs, by expert
    assert groups.expert_ids == [0, 2, 3] and groups.offsets == [0, 3, 5, 6]


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_is_hf_formula(renormalize):
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    weights, ids = fused_topk(logits, 3, renormalize)
    probs = torch.softmax(logits, -1)
    want_w, want_ids = probs.topk(3, -1)
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


def test_tp_slices_of_the_experts_sum_to_the_unsplit_layer(monkeypatch):
    """Each rank keeps rows [r*I/tp, (r+1)*I/tp) of every expert's gate and up and the same
    columns of its down; the ranks' partial outputs add up to the whole layer (the all-reduce)."""
    monkeypatch.setattr(fused_moe, "tensor_model_parallel_all_reduce", lambda x: x)
    E, k, H, inter, tp = 4, 2, 8, 6, 2
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(E, inter, H, generator=gen), torch.randn(E, inter, H, generator=gen)
    down = torch.randn(E, H, inter, generator=gen)
    x, logits = torch.randn(5, H, generator=gen), torch.randn(5, E, generator=gen)
    weights, ids = fused_topk(logits, k, True)
    want = per_pair_formula(x, torch.cat([gate, up], 1), down, weights, ids)
    total = torch.zeros_like(want)
    for rank in range(tp):
        monkeypatch.setattr(parallel_state, "_WORLD_SIZE", tp)
        monkeypatch.setattr(parallel_state, "_RANK", rank)
        layer = FusedMoE(E, k, H, inter, renormalize=True)
        for e in range(E):
            layer.weight_loader(layer.w13_weight, gate[e], "w1", e)
            layer.weight_loader(layer.w13_weight, up[e], "w3", e)
            layer.weight_loader(layer.w2_weight, down[e], "w2", e)
        assert layer.w13_weight.shape == (E, 2 * inter // tp, H) and layer.w2_weight.shape == (E, H, inter // tp)
        total += layer(x, logits)
    torch.testing.assert_close(total, want)


def test_ep_ranks_hold_whole_experts_and_sum_to_the_unsplit_layer(monkeypatch):
    """Expert parallelism: rank r keeps experts [r*E/ep, (r+1)*E/ep) whole (not a slice of
    each), computes only the pairs routed to them (an expert with no local pair costs
    nothing), and the ranks' outputs add up to the whole layer (the all-reduce)."""
    monkeypatch.setattr(fused_moe, "tensor_model_parallel_all_reduce", lambda x: x)
    E, k, H, inter, ep = 6, 2, 8, 6, 3
    gen = torch.Generator().manual_seed(1)
    gate, up = torch.randn(E, inter, H, generator=gen), torch.randn(E, inter, H, generator=gen)
    down = torch.randn(E, H, inter, generator=gen)
    x, logits = torch.randn(7, H, generator=gen), torch.randn(7, E, generator=gen)
    logits[:, 4:] -= 100.0  # experts 4 and 5 (the last rank's) get no token: it adds zeros
    weights, ids = fused_topk(logits, k, False)
    want = per_pair_formula(x, torch.cat([gate, up], 1), down, weights, ids)
    total = torch.zeros_like(want)
    monkeypatch.setattr(parallel_state, "_WORLD_SIZE", ep)
    for rank in range(ep):
        monkeypatch.setattr(parallel_state, "_RANK", rank)
        with parallel_state.expert_parallel(True):
            layer = FusedMoE(E, k, H, inter, renormalize=False)
        for e in range(E):  # every rank is offered every expert; it keeps its own
            layer.weight_loader(layer.w13_weight, gate[e], "w1", e)
            layer.weight_loader(layer.w13_weight, up[e], "w3", e)
            layer.weight_loader(layer.w2_weight, down[e], "w2", e)
        mine = slice(rank * E // ep, (rank + 1) * E // ep)
        assert torch.equal(layer.w13_weight, torch.cat([gate[mine], up[mine]], 1))  # whole experts
        assert torch.equal(layer.w2_weight, down[mine])
        part = layer(x, logits)
        assert rank < ep - 1 or torch.count_nonzero(part) == 0
        total += part
    torch.testing.assert_close(total, want)


# -- the model against HF transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def moe_reference_outputs(tmp_path_factory) -> Callable[[str], dict[str, Any]]:
    """moe_reference_outputs(recipe name) -> {path, prompts, max_tokens, outputs (HF greedy)}."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny_moe")
    cache: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in cache:
            path = build_tiny_moe_checkpoint(root / name, RECIPES[name])
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            prompts, max_tokens = mixed_prompts(hf.config.vocab_size, seed=0)
            outputs = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
            assert num_distinct(outputs) > GREEDY_MIN_DISTINCT, f"weak oracle: {name}"
            cache[name] = dict(path=path, hf=hf, prompts=prompts, max_tokens=max_tokens, outputs=outputs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", RECIPES)
def test_logits_equal_hf_prefill_and_decode(name, moe_reference_outputs):
    ref = moe_reference_outputs(name)
    model, config, _ = load_model(str(ref["path"]), dtype=torch.float32)
    assert any(isinstance(m, FusedMoE) for m in model.modules())
    prompts = [p for p in ref["prompts"] if len(p) <= 64][:4]
    ours = our_decode_logits(model, prompts, [max(1, len(p) // 2) for p in prompts])
    for prompt, got in zip(prompts, ours):
        torch.testing.assert_close(got, hf_logits(ref["hf"], prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stage", range(1, LATEST_STAGE + 1), ids=lambda s: f"stage{s:02d}")
@pytest.mark.parametrize("name", RECIPES)
def test_greedy_tokens_equal_hf_at_every_stage(name, stage, moe_reference_outputs):
    ref = moe_reference_outputs(name)
    llm = LLM(str(ref["path"]), stage=stage, dtype="float32", max_num_seqs=3, max_model_len=256)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref["max_tokens"]]
    outputs = llm.generate(ref["prompts"], params, use_tqdm=False)
    for i, (out, want) in enumerate(zip(outputs, ref["outputs"])):
        assert out.outputs[0].token_ids == want, f"{name} stage {stage}, prompt {i}"


@pytest.mark.parametrize("custom_ops", ["all", "none"])
def test_engine_packs_the_experts_only_with_custom_ops(custom_ops, moe_reference_outputs):
    """custom_ops="all" (the CPU default): each layer's weights in the panels of our C++ MoE
    kernel (`fused_experts_cpu`), one call per layer; "none": the stacked torch weights and the
    torch grouped path. Both give HF's tokens (so every HF-equality test here runs the kernel)."""
    ref = moe_reference_outputs("top1-untied")
    llm = LLM(str(ref["path"]), stage=6, dtype="float32", max_num_seqs=3, max_model_len=256,
              custom_ops=custom_ops)
    layers = [m for m in llm.llm_engine.model_executor.model_runner.model.modules() if isinstance(m, FusedMoE)]
    assert layers and all((m.w13_kernel is not None) == (custom_ops == "all") for m in layers)
    if custom_ops == "all":  # one copy of the weights, in the kernel's layout only
        assert all(m.w13_packed is None and m.w13_weight.numel() == m.w2_weight.numel() == 0 for m in layers)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref["max_tokens"]]
    outputs = llm.generate(ref["prompts"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == ref["outputs"]


def test_greedy_tokens_equal_hf_with_tensor_parallel_2(moe_reference_outputs):
    """Two worker processes, each with half of every expert's intermediate dimension."""
    ref = moe_reference_outputs("top3-step2")
    llm = LLM(str(ref["path"]), stage=5, dtype="float32", max_num_seqs=3, max_model_len=256,
              tensor_parallel_size=2)
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref["max_tokens"]]
        outputs = llm.generate(ref["prompts"], params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == ref["outputs"]


def test_greedy_tokens_equal_hf_with_expert_parallel_2(moe_reference_outputs):
    """enable_expert_parallel with two worker processes (gloo): each rank holds 3 of the 6
    experts whole, so half the expert bytes; HF's tokens; the routing counts still cover every
    expert (each rank routes every token)."""
    ref = moe_reference_outputs("top3-step2")
    hf_cfg = ref["hf"].config
    E, H, I = hf_cfg.num_experts, hf_cfg.hidden_size, hf_cfg.moe_intermediate_size
    llm = LLM(str(ref["path"]), stage=6, dtype="float32", max_num_seqs=3, max_model_len=256,
              tensor_parallel_size=2, enable_expert_parallel=True, custom_ops="none")
    try:
        shapes = llm.llm_engine.model_executor.collective_rpc("param_shapes")
        params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref["max_tokens"]]
        outputs = llm.generate(ref["prompts"], params, use_tqdm=False)
        expert_load = llm.llm_engine.stats.expert_load
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == ref["outputs"]
    for rank_shapes in shapes:
        experts = {n: s for n, s in rank_shapes.items() if ".mlp.experts." in n}
        assert experts == {"model.layers.1.mlp.experts.w13_weight": (E // 2, 2 * I, H),
                           "model.layers.1.mlp.experts.w2_weight": (E // 2, H, I)}
        # 1/2 of the experts' bytes: E/2 whole experts, against E halves under plain TP
        assert sum(math.prod(s) for s in experts.values()) * 2 == E * 3 * H * I
    assert len(expert_load) == E and sum(expert_load) > 0


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def moe_copy(moe_reference_outputs, tmp_path) -> Path:
    src = moe_reference_outputs("top2-renorm-dense0")["path"]
    dst = tmp_path / "moe"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 .* 1\.\.num_experts=8"),
    (dict(num_experts_per_tok=0), r"num_experts_per_tok=0"),
    (dict(num_local_experts=0), r"num_experts=0"),  # HF writes num_experts under this name
    (dict(moe_intermediate_size=-4), r"moe_intermediate_size=-4"),
    (dict(mlp_only_layers=[5]), r"mlp_only_layers=\[5\] .* 0\.\.1"),
    (dict(decoder_sparse_step=0), r"decoder_sparse_step=0"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", shared_expert_intermediate_size=64),
     r"shared_expert_intermediate_size=64"),
])
def test_bad_configs_are_refused_naming_the_field(moe_copy, changes, match):
    _edit_config(moe_copy, **changes)
    with pytest.raises(ValueError, match=match):
        LLM(str(moe_copy), stage=1, dtype="float32", max_model_len=64)


def test_missing_or_extra_expert_tensors_are_named(moe_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(moe_copy / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(missing, moe_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing .*experts\.3\.up_proj"):
        load_model(str(moe_copy))
    extra = dict(tensors)
    extra["model.layers.1.mlp.experts.8.up_proj.weight"] = tensors["model.layers.1.mlp.experts.3.up_proj.weight"].clone()
    save_file(extra, moe_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"expert 8 is out of range.*num_experts=8"):
        load_model(str(moe_copy))
    wrong = dict(tensors)
    wrong["model.layers.1.mlp.experts.0.down_proj.weight"] = torch.zeros(64, 16)
    save_file(wrong, moe_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts\.0\.down_proj\.weight' has shape \(64, 16\), expected \(64, 32\)"):
        load_model(str(moe_copy))


def test_tensor_parallel_must_divide_the_experts(moe_reference_outputs):
    config = moe_reference_outputs("top2-renorm-dense0")["hf"].config
    verify_tensor_parallel(config, 2)  # 32 / 2
    config = type(config)(**{**config.to_dict(), "moe_intermediate_size": 33})
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide the model's moe_intermediate_size \(33\)"):
        verify_tensor_parallel(config, 2)


def test_quantized_experts_other_than_gptq_are_refused(moe_reference_outputs):
    from folovllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

    class AnyQuant:  # stands for compressed-tensors or any format but GPTQ's
        pass

    config = moe_reference_outputs("top2-renorm-dense0")["hf"].config
    with pytest.raises(ValueError, match=r"AnyQuant Qwen3-MoE checkpoint: quantized experts are read in GPTQ's format only"):
        Qwen3MoeForCausalLM(config, AnyQuant())


def test_gptq_experts_sliced_by_tensor_parallel_are_refused(monkeypatch):
    from folovllm.model_executor.layers.quantization.gptq import GPTQConfig

    monkeypatch.setattr(parallel_state, "_WORLD_SIZE", 2)
    with pytest.raises(ValueError, match=r"GPTQ experts with tensor_parallel_size=2 need enable_expert_parallel=True"):
        FusedMoE(4, 2, 64, 32, renormalize=True, quant_config=GPTQConfig(group_size=32))
    with parallel_state.expert_parallel(True):  # whole experts: 2 of the 4 on this rank
        layer = FusedMoE(4, 2, 64, 32, renormalize=True, quant_config=GPTQConfig(group_size=32))
    assert layer.w13_qweight.shape == (2, 2, 64 // 8, 32) and layer.w2_qweight.shape == (2, 32 // 8, 64)


# -- GPTQ experts: `folovllm quantize` on a MoE checkpoint, then loaded back --------------------


@pytest.fixture(scope="module")
def gptq_moe(moe_reference_outputs, tmp_path_factory) -> dict[str, Path]:
    """The top-2 tiny MoE quantized by our tool (4 bits, groups of 32, act-order so gate and up
    keep different g_idx), and the float checkpoint it dequantizes to."""
    from folovllm.tools.gptq_quantizer import dequantize_checkpoint, quantize_checkpoint

    root = tmp_path_factory.mktemp("gptq_moe")
    src = moe_reference_outputs("top2-renorm-dense0")["path"]
    quantized = quantize_checkpoint(str(src), str(root / "gptq"), bits=4, group_size=32, desc_act=True,
                                    num_samples=8, seq_len=32, progress=False)
    return {"float": src, "gptq": quantized, "dequantized": dequantize_checkpoint(str(quantized), str(root / "deq"))}


def test_quantized_moe_has_gptqmodel_tensor_names(gptq_moe):
    """GPTQModel's layout for Qwen3-MoE: each expert's gate/up/down is a quantized linear
    (qweight, qzeros, scales, g_idx); the router (`mlp.gate`) and the dense layer's norms stay
    float; no float expert weight is left."""
    from safetensors.torch import load_file

    tensors = load_file(gptq_moe["gptq"] / "model.safetensors")
    config = json.loads((gptq_moe["gptq"] / "config.json").read_text())
    E, H, inter = config.get("num_experts", config.get("num_local_experts")), config["hidden_size"], config["moe_intermediate_size"]
    assert config["quantization_config"]["quant_method"] == "gptq"
    expert_names = {n for n in tensors if ".mlp.experts." in n}
    assert expert_names == {f"model.layers.1.mlp.experts.{e}.{p}.{k}" for e in range(E)
                            for p in ("gate_proj", "up_proj", "down_proj")
                            for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.qweight"].shape == (H // 8, inter)
    assert tensors["model.layers.1.mlp.experts.0.down_proj.qweight"].shape == (inter // 8, H)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router: float
    assert "model.layers.1.mlp.gate.qweight" not in tensors
    assert "model.layers.0.mlp.gate_proj.qweight" in tensors  # the dense layer is quantized too


def test_gptq_experts_equal_the_model_on_its_dequantized_weights(gptq_moe, moe_reference_outputs):
    """Our 4-bit experts (reference kernel: dequantize per expert, the same grouped path) give
    the logits of the float model run on the dequantized weights, and its greedy tokens."""
    ref = moe_reference_outputs("top2-renorm-dense0")
    model, _, _ = load_model(str(gptq_moe["gptq"]), dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert layers and all(type(m.quant_method).__name__ == "GPTQFusedMoEMethod" for m in layers)
    float_model, _, _ = load_model(str(gptq_moe["dequantized"]), dtype=torch.float32)
    prompts = [p for p in ref["prompts"] if len(p) <= 64][:3]
    starts = [max(1, len(p) // 2) for p in prompts]
    for got, want in zip(our_decode_logits(model, prompts, starts), our_decode_logits(float_model, prompts, starts)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref["max_tokens"]]
    tokens = {}
    for name in ("gptq", "dequantized"):
        llm = LLM(str(gptq_moe[name]), stage=6, dtype="float32", max_num_seqs=3, max_model_len=256)
        tokens[name] = [o.outputs[0].token_ids for o in llm.generate(ref["prompts"], params, use_tqdm=False)]
    assert tokens["gptq"] == tokens["dequantized"]
    assert num_distinct(tokens["gptq"]) > GREEDY_MIN_DISTINCT


def test_gptq_experts_on_the_int4_kernel_match_the_reference(gptq_moe, monkeypatch):
    """Each expert segment through torch's int4 CPU kernel (stage 07's cpu_int4, bfloat16
    activations) and our int4 decode kernel (cpu_int4_panel) against the reference
    dequantize-then-matmul, on the same checkpoint."""
    from folovllm.model_executor.layers.quantization.gptq import cpu_int4_available

    if not cpu_int4_available():
        pytest.skip("this torch has no int4 CPU kernel")
    from folovllm.model_executor.layers.quantization.gptq import GPTQConfig, int4_panel_supported

    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 4, 17]]
    logits = {}
    panel = int4_panel_supported(GPTQConfig(), 64, torch.float32) is None  # our kernels build here
    for kernel in ("reference", "cpu_int4") + (("cpu_int4_panel",) if panel else ()):
        monkeypatch.setenv("FOLOVLLM_GPTQ_KERNEL", kernel)
        model, _, _ = load_model(str(gptq_moe["gptq"]), dtype=torch.float32)
        assert all(m.quant_method.kernels == {"w13": kernel, "w2": kernel}
                   for m in model.modules() if isinstance(m, FusedMoE))
        logits[kernel] = torch.cat(our_decode_logits(model, prompts, [3, 1]))
    torch.testing.assert_close(logits["cpu_int4"], logits["reference"], atol=0.1, rtol=0.05)
    if panel:  # our kernel, float32 activations and accumulation: float32 rounding only
        torch.testing.assert_close(logits["cpu_int4_panel"], logits["reference"], atol=1e-4, rtol=1e-4)


def test_expert_parallel_needs_experts_divisible_by_the_ranks(moe_reference_outputs):
    config = moe_reference_outputs("top3-step2")["hf"].config  # 6 experts
    verify_tensor_parallel(config, 2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"enable_expert_parallel=True with tensor_parallel_size=4: .*"
                                         r"num_experts=6 does not divide by 4"):
        verify_tensor_parallel(config, 4, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"enable_expert_parallel must be true or false"):
        LLM(str(moe_reference_outputs("top3-step2")["path"]), enable_expert_parallel="yes")


# -- routing counts: the engine's record, /metrics, the trace ----------------------------------


def hf_routing_counts(hf, token_ids: list[int]) -> torch.Tensor:
    """[L, E]: tokens HF's routers send to each expert of each MoE layer, from its gate logits
    (softmax, top-k: the choice does not depend on renormalisation)."""
    with torch.no_grad():
        out = hf(torch.tensor([token_ids]), output_router_logits=True)
    k, E = hf.config.num_experts_per_tok, hf.config.num_experts
    return torch.stack([torch.bincount(logits.reshape(-1, E).topk(k, -1).indices.reshape(-1), minlength=E)
                        for logits in out.router_logits])


@pytest.mark.parametrize("name", ["top1-untied", "top3-step2"])
def test_routing_counts_equal_hf_router_choices(name, moe_reference_outputs):
    """Every step's record carries the tokens routed to each expert; over a run they add up to
    what HF's routers pick for the same tokens (each request's prompt and the outputs it fed
    back), the first step's (the prompts' prefill) to HF's on the prompts alone; /metrics and
    the trace show the same counts."""
    from folovllm.engine.metrics import PrometheusMetrics
    from folovllm.trace.recorder import StepTracer

    ref = moe_reference_outputs(name)
    hf, prompts, max_tokens = ref["hf"], ref["prompts"][:3], ref["max_tokens"][:3]
    llm = LLM(str(ref["path"]), stage=6, dtype="float32", max_num_seqs=3, max_model_len=256)
    engine = llm.llm_engine
    metrics = PrometheusMetrics("m", engine.kv_cache_capacity_tokens)
    engine.stat_loggers.append(metrics.record)
    tracer = StepTracer.attach(engine)
    outputs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens],
                           use_tqdm=False)
    steps = list(tracer.steps)
    want_first = sum(hf_routing_counts(hf, p) for p in prompts)  # [L, E]
    first = steps[0].expert_load
    assert steps[0].num_prefill_tokens == sum(map(len, prompts))  # the three prompts at once
    assert first.num_tokens_per_expert == want_first.sum(0).tolist()
    assert first.num_experts_touched == (want_first > 0).sum(1).tolist()
    computed = [p + o.outputs[0].token_ids[:-1] for p, o in zip(prompts, outputs)]  # the last is never fed
    want = sum(hf_routing_counts(hf, ids) for ids in computed).sum(0)  # [E]
    got = torch.tensor([s.expert_load.num_tokens_per_expert for s in steps]).sum(0)
    assert got.tolist() == want.tolist() and engine.stats.expert_load == want.tolist()
    num_layers = len(hf_routing_counts(hf, [1]))
    assert int(want.sum()) == sum(map(len, computed)) * hf.config.num_experts_per_tok * num_layers
    text = metrics.render().decode()
    for e, count in enumerate(want.tolist()):
        if count:
            assert f'folovllm:moe_expert_tokens_total{{expert="{e}",model_name="m"}} {float(count)}' in text
    step_event = next(e for e in tracer.perfetto_events() if e.get("name") == "step 1")
    assert step_event["args"]["experts"].startswith(f"touched {first.mean_experts_touched:.1f}/")


def test_dense_model_records_no_routing(tiny_qwen3):
    """A dense model has no recorder to fill: no bincount, no record, no metric series."""
    from folovllm.engine.metrics import PrometheusMetrics
    from folovllm.model_executor.layers.fused_moe import NoExpertLoadRecorder

    llm = LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=64)
    engine = llm.llm_engine
    assert isinstance(engine.model_executor.worker.expert_load, NoExpertLoadRecorder)
    metrics = PrometheusMetrics("m", engine.kv_cache_capacity_tokens)
    engine.stat_loggers.append(metrics.record)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert engine.last_scheduler_stats.expert_load is None and engine.stats.expert_load == []
    assert "moe_expert_tokens_total{" not in metrics.render().decode()


def test_gptq_experts_with_expert_parallel_2(gptq_moe, moe_reference_outputs):
    """GPTQ experts over two ranks: each holds half the experts' 4-bit tensors, whole; the
    tokens equal the one-process run of the same checkpoint."""
    ref = moe_reference_outputs("top2-renorm-dense0")
    prompts, params = ref["prompts"][:3], SamplingParams(temperature=0.0, max_tokens=8)
    one = LLM(str(gptq_moe["gptq"]), stage=6, dtype="float32", max_model_len=256)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(gptq_moe["gptq"]), stage=6, dtype="float32", max_model_len=256,
              tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        shapes = llm.llm_engine.model_executor.collective_rpc("param_shapes")
    finally:
        llm.llm_engine.shutdown()
    assert got == want
    E = ref["hf"].config.num_experts
    assert all(s["model.layers.1.mlp.experts.w13_qweight"][0] == E // 2 for s in shapes)
