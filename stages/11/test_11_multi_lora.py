"""Stage 11: multi-LoRA serving. `pytest stages/11` reproduces the stage.

The oracle is HF transformers + PEFT: adapters are made by `peft` itself (random non-zero A and
B, different ranks and target sets, one rsLoRA), and every row of a batch that mixes them with
the base model must give the greedy tokens of its own HF + PEFT model. The batched operation is
checked against a per-token loop written here, on random layouts (hypothesis).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm import _custom_ops
from folovllm.lora.punica_wrapper import (PunicaWrapper, SGMVSegments, add_lora_reference,
                                          bgmv_add_lora, bgmv_add_lora_cpu, sgmv_add_lora,
                                          sgmv_add_lora_cpu)
from folovllm.lora.request import LoRARequest
from lora_cases import make_peft_adapter, reference_tokens
from tests.helpers import ARCHS

# One mixed batch: the base model and three adapters, interleaved, with max_loras=2 so the
# adapters must take turns in the slots.
NAMES = [None, "A", "B", "C", None, "A", "B", "C", "A", None]


def lora_llm(path: Path, stage: int = 4, **kw: Any) -> LLM:
    kw.setdefault("max_model_len", 256)
    return LLM(str(path), stage=stage, dtype="float32", enable_lora=True, max_loras=2,
               max_lora_rank=16, **kw)


def run(llm: LLM, prompts, max_tokens, names, adapters, n: int = 1) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, n=n) for m in max_tokens]
    loras = [None if name is None else adapters[name].request for name in names]
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return [list(c.token_ids) for o in outputs for c in o.outputs]


def record_adapters_per_step(llm: LLM) -> list[int]:
    """The number of distinct adapters of every step, as the engine hands them to the slots."""
    manager, seen = llm.llm_engine.lora_manager, []
    assign = manager.assign_slots

    def counting(batch, requests):
        seen.append(len({r.lora_request.lora_int_id for r in requests if r.lora_request}))
        assign(batch, requests)

    manager.assign_slots = counting
    return seen


# -- tokens: HF + PEFT is the oracle ---------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_hf_peft(greedy_reference, hf_models, adapters, arch):
    """Base rows and three adapters in one batch, two slots: every row equals its HF + PEFT
    greedy tokens, each adapter changes its rows' tokens, and no step holds three adapters."""
    ref, ad = greedy_reference(arch), adapters(arch)
    expected = reference_tokens(hf_models(arch), ad, ref.prompts, ref.max_tokens, NAMES)
    for name in "ABC":  # an adapter that changed nothing could not fail this test
        rows = [i for i, n in enumerate(NAMES) if n == name]
        assert any(expected[i] != ref.outputs[i] for i in rows), name
    llm = lora_llm(ref.path, max_cpu_loras=2)  # three adapters over two CPU copies: re-read
    per_step = record_adapters_per_step(llm)
    assert run(llm, ref.prompts, ref.max_tokens, NAMES, ad) == expected
    assert max(per_step) == 2  # full slots, and never more than max_loras
    worker = llm.llm_engine.model_runner.lora_manager
    assert worker.num_loads > 3  # the CPU LRU dropped an adapter and read it again


@pytest.mark.parametrize("first", ["adapters first", "base first"])
def test_prefix_caching_keys_blocks_by_adapter(greedy_reference, hf_models, adapters, first):
    """Stage 06: one 40-token prompt (two full blocks) under adapter A, adapter C and the base,
    one after another in both orders: each equals HF + PEFT, and a block computed under one
    never serves another (no hit), while the same prompt under the same adapter again hits."""
    ref, ad = greedy_reference("qwen3"), adapters("qwen3")
    hf = hf_models("qwen3")
    prompt = [random.Random(7).randrange(3, hf.config.vocab_size) for _ in range(40)]
    order = ["A", "C", None] if first == "adapters first" else [None, "A", "C"]
    llm = lora_llm(ref.path, stage=6)
    stats = llm.llm_engine.stats
    for name in order:
        before = stats.prefix_cache.hits
        assert run(llm, [prompt], [12], [name], ad) == reference_tokens(hf, ad, [prompt], [12], [name])
        assert stats.prefix_cache.hits == before  # another adapter's blocks are not this one's
    before = stats.prefix_cache.hits
    assert run(llm, [prompt] * 3, [12] * 3, order, ad) == reference_tokens(hf, ad, [prompt] * 3, [12] * 3, order)
    assert stats.prefix_cache.hits - before == 3 * 32  # now each finds its own two blocks


def test_chunked_prefill_budget_13(greedy_reference, hf_models, adapters):
    """Stage 05 with a 13-token budget: prompts cut into chunks that share steps with the
    decodes of other adapters (SGMV's grouped layout), equal to HF + PEFT."""
    ref, ad = greedy_reference("llama"), adapters("llama")
    expected = reference_tokens(hf_models("llama"), ad, ref.prompts, ref.max_tokens, NAMES)
    llm = lora_llm(ref.path, stage=5, max_num_batched_tokens=13, max_num_seqs=8)
    assert run(llm, ref.prompts, ref.max_tokens, NAMES, ad) == expected


def test_preemption_and_n_samples(greedy_reference, hf_models, adapters):
    """A KV cache of 20 blocks for ten requests: preemption recomputes requests under their
    adapter; n=2 greedy samples of each prompt both equal HF + PEFT."""
    ref, ad = greedy_reference("qwen2"), adapters("qwen2")
    expected = reference_tokens(hf_models("qwen2"), ad, ref.prompts, ref.max_tokens, NAMES)
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # (K, V) x 2 layers x 2 kv heads x 16 dims x float32
    llm = lora_llm(ref.path, stage=4, kv_cache_memory=20 * 16 * bytes_per_token, max_num_seqs=8)
    got = run(llm, ref.prompts, ref.max_tokens, NAMES, ad, n=2)
    assert got == [e for e in expected for _ in range(2)]
    assert llm.stats.num_preemptions > 0


def test_tensor_parallel_2(greedy_reference, hf_models, adapters):
    """Stage 08 at TP=2: base rows and two adapters in one batch (B: all seven projections,
    rsLoRA; C: rank 16 on k, o, gate, down), A and B sliced like their base layer on each rank
    (column-parallel B by output rows, row-parallel A by input columns, the LoRA term inside
    the row-parallel layer's all-reduce): every row equals HF + PEFT."""
    ref, ad = greedy_reference("qwen3"), adapters("qwen3")
    names = [None, "B", "C", None, "C", "B", "B", None, "C", "B"][:len(ref.prompts)]
    expected = reference_tokens(hf_models("qwen3"), ad, ref.prompts, ref.max_tokens, names)
    llm = lora_llm(ref.path, stage=5, tensor_parallel_size=2, kv_cache_memory=512 * 1024)
    try:
        got = run(llm, ref.prompts, ref.max_tokens, names, ad)
    finally:
        llm.llm_engine.shutdown()
    assert got == expected


# -- the batched op against a per-token loop ---------------------------------------------------

def per_token_loop(y, x, a_list, b_list, scales, token_slots, part_sizes):
    """The definition, token by token: y[t] += scale * B_i (A_i x[t]) per fused part."""
    y = y.clone()
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        offset = 0
        for p, size in enumerate(part_sizes):
            a, b = a_list[slot][p], b_list[slot][p]  # [r_i, in], [size, r_i]
            y[t, offset:offset + size] += scales[slot] * (b @ (a @ x[t]))
            offset += size
    return y


def stacked(a_list, b_list, num_slots, rank, part_sizes, dim_in):
    """The slots' zero-padded stacks: A [S, P*R, in] and P x B [S, out_p, R]."""
    P = len(part_sizes)
    lora_a = torch.zeros(num_slots, P * rank, dim_in, dtype=torch.float64)
    lora_b = [torch.zeros(num_slots, size, rank, dtype=torch.float64) for size in part_sizes]
    for slot in range(num_slots):
        for p in range(P):
            r = a_list[slot][p].shape[0]
            lora_a[slot, p * rank:p * rank + r] = a_list[slot][p]
            lora_b[p][slot, :, :r] = b_list[slot][p]
    return lora_a, lora_b


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_batched_op_matches_per_token_loop(data):
    """Random rows (empty ones, all-base batches, one token each for BGMV), random ranks below
    the slots' rank (padding), one to three fused parts: reference, SGMV (a loop over segments,
    and one padded bmm) and BGMV all equal the per-token definition."""
    num_slots = data.draw(st.integers(1, 4))
    rank = data.draw(st.sampled_from([1, 4, 8]))
    part_sizes = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    dim_in = data.draw(st.integers(1, 7))
    decode = data.draw(st.booleans())
    num_rows = data.draw(st.integers(0, 8))
    row_slots = data.draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_rows, max_size=num_rows))
    query_lens = [1] * num_rows if decode else data.draw(
        st.lists(st.integers(0, 5), min_size=num_rows, max_size=num_rows))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    ranks = [data.draw(st.integers(1, rank)) for _ in range(num_slots)]
    a_list = [[torch.randn(ranks[s], dim_in, generator=g, dtype=torch.float64) for _ in part_sizes]
              for s in range(num_slots)]
    b_list = [[torch.randn(size, ranks[s], generator=g, dtype=torch.float64) for size in part_sizes]
              for s in range(num_slots)]
    scales = torch.rand(num_slots, generator=g, dtype=torch.float64) + 0.5
    T = sum(query_lens)
    x = torch.randn(T, dim_in, generator=g, dtype=torch.float64)
    y0 = torch.randn(T, sum(part_sizes), generator=g, dtype=torch.float64)
    token_slots = [s for s, q in zip(row_slots, query_lens) for _ in range(q)]
    expected = per_token_loop(y0, x, a_list, b_list, scales, token_slots, part_sizes)
    lora_a, lora_b = stacked(a_list, b_list, num_slots, rank, part_sizes, dim_in)

    y = y0.clone()
    add_lora_reference(y, x, lora_a, lora_b, torch.tensor(token_slots, dtype=torch.long), scales)
    torch.testing.assert_close(y, expected)

    for padded in (None, num_slots):  # a loop over segments; one padded bmm (short segments)
        y = y0.clone()
        segments = SGMVSegments.from_token_slots(token_slots, x.device, padded)
        sgmv_add_lora(y, x, lora_a, lora_b, segments, scales)
        torch.testing.assert_close(y, expected)

    adapted = [t for t, s in enumerate(token_slots) if s >= 0]
    y = y0.clone()
    if adapted:
        bgmv_add_lora(y, x, lora_a, lora_b, torch.tensor(adapted), torch.tensor([token_slots[t] for t in adapted]), scales)
    torch.testing.assert_close(y, expected)

    kernels = _custom_ops.ops_available()  # the C++ ones (csrc/cpu/lora.cpp): float32 math
    if kernels:
        f32 = dict(atol=1e-5, rtol=1e-5)
        xf, af, bf, sf = x.float(), lora_a.float(), [b.float() for b in lora_b], scales.float()
        y = y0.float()
        segments = SGMVSegments.from_token_slots(token_slots, x.device)
        sgmv_add_lora_cpu(y, xf, af, bf, segments.table(), segments.order, sf)
        torch.testing.assert_close(y.double(), expected, **f32)
        y = y0.float()
        bgmv_add_lora_cpu(y, xf, af, bf, torch.tensor(token_slots, dtype=torch.long), sf)
        torch.testing.assert_close(y.double(), expected, **f32)
        # each slot's true rank per part (0: a part the adapter leaves alone), with garbage in
        # the padding the kernel must not read; an empty segment per slot in the table too
        true_ranks = torch.tensor([[ranks[s]] * len(part_sizes) for s in range(num_slots)])
        skipped = data.draw(st.lists(st.booleans(), min_size=num_slots, max_size=num_slots))
        dirty_a, dirty_b = af.clone(), [b.clone() for b in bf]
        for slot in range(num_slots):
            for p in range(len(part_sizes)):
                r = 0 if skipped[slot] and p == 0 else ranks[slot]
                true_ranks[slot, p] = r
                dirty_a[slot, p * rank + r:(p + 1) * rank] = 1e3  # never read
                dirty_b[p][slot, :, r:] = 1e3
        skip_expected = per_token_loop(y0, x, [[a * (not (skipped[s] and p == 0)) for p, a in enumerate(a_s)]
                                                for s, a_s in enumerate(a_list)], b_list, scales, token_slots, part_sizes)
        table = torch.cat([segments.table(), torch.tensor([[slot, 0, 0] for slot in range(num_slots)]).view(-1, 3)])
        y_sgmv = y0.float()
        sgmv_add_lora_cpu(y_sgmv, xf, dirty_a, dirty_b, table, segments.order, sf, true_ranks)
        torch.testing.assert_close(y_sgmv.double(), skip_expected, **f32)
        y_bgmv = y0.float()
        bgmv_add_lora_cpu(y_bgmv, xf, dirty_a, dirty_b, torch.tensor(token_slots, dtype=torch.long), sf, true_ranks)
        assert torch.equal(y_bgmv, y_sgmv)  # the same sums in the same order, token alone or in a block

    # the wrapper's own dispatch, with the scales folded into B as the loader does
    folded_b = [b * scales.view(-1, 1, 1) for b in lora_b]
    for decode_kernel, use_kernel in (("sgmv", False), ("bgmv", False), ("sgmv", True), ("bgmv", True)):
        if use_kernel and not kernels:
            continue
        punica = PunicaWrapper(x.device, decode_kernel, num_slots, use_kernel=use_kernel)
        punica.update_metadata(row_slots, query_lens)
        y = y0.float() if use_kernel else y0.clone()
        if use_kernel:
            punica.add_lora_linear(y, x.float(), lora_a.float(), [b.float() for b in folded_b])
            torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
            if all(s < 0 for s in token_slots):
                assert torch.equal(y, y0.float())  # an all-base batch is not touched
            continue
        else:
            punica.add_lora_linear(y, x, lora_a, folded_b)
            torch.testing.assert_close(y, expected)
        if all(s < 0 for s in token_slots):
            assert torch.equal(y, y0)  # an all-base batch is not touched


@pytest.mark.skipif(not _custom_ops.ops_available(), reason="the CPU kernels cannot be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_lora_kernels_at_layer_shapes(dtype, num_threads):
    """The C++ SGMV and BGMV against the torch reference at a real layer's shapes (qkv: three
    parts, widths not multiples of the kernel's 64-wide tiles; segments longer than its 8-row
    blocks; scattered slots that need `order`; base rows; rank-padded slots), in the engine's
    dtypes, on one and two threads. CI runs it on both ISA paths (FOLOVLLM_CPU_ISA=avx2)."""
    g = torch.Generator().manual_seed(7)
    num_slots, rank, dim_in, parts = 3, 16, 200, [136, 40, 40]
    lora_a = torch.randn(num_slots, 3 * rank, dim_in, generator=g).to(dtype)
    lora_b = [torch.randn(num_slots, out, rank, generator=g).to(dtype) for out in parts]
    lora_a[1, 8:16].zero_()  # slot 1 holds a rank-8 adapter in its q part: zero padding
    lora_b[0][1, :, 8:].zero_()
    # a 19-token prompt of slot 2, base decodes, a scattered slot 0, a chunk of slot 1
    token_slots = [2] * 19 + [-1, 0, -1, 1, 0] + [1] * 9 + [0]
    T = len(token_slots)
    x = torch.randn(T, dim_in, generator=g).to(dtype)
    y0 = torch.randn(T, sum(parts), generator=g).to(dtype)
    slots = torch.tensor(token_slots)
    expected = y0.double()
    add_lora_reference(expected, x.double(), lora_a.double(), [b.double() for b in lora_b], slots)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        segments = SGMVSegments.from_token_slots(token_slots, x.device)
        assert segments.order is not None  # slots 0 and 1 are split: the gathered layout
        y = y0.clone()
        sgmv_add_lora_cpu(y, x, lora_a, lora_b, segments.table(), segments.order)
        torch.testing.assert_close(y.double(), expected, **tol)
        assert torch.equal(y[19], y0[19])  # a base row is never written
        y = y0.clone()
        bgmv_add_lora_cpu(y, x, lora_a, lora_b, slots)
        torch.testing.assert_close(y.double(), expected, **tol)
        # one contiguous run per slot: the segments index x in place (no `order`)
        runs = SGMVSegments.from_token_slots(token_slots[:19], x.device)
        assert runs.order is None
        y = y0[:19].clone()
        sgmv_add_lora_cpu(y, x[:19], lora_a, lora_b, runs.table(), None)
        torch.testing.assert_close(y.double(), expected[:19], **tol)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="reads slot 3"):  # checked, not read out of bounds
        bgmv_add_lora_cpu(y0.clone(), x, lora_a, lora_b, torch.full((T,), 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="allowed 0..16"):
        bgmv_add_lora_cpu(y0.clone(), x, lora_a, lora_b, slots, ranks=torch.full((3, 3), 17))


@pytest.mark.skipif(not _custom_ops.ops_available(), reason="the CPU kernels cannot be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_kernels_read_true_ranks_in_layer_layout(dtype):
    """The layer's own stacks (Aᵀ rows padded to 16, Bᵀ, transposed views for torch) at
    max_lora_rank 64 holding adapters of ranks 16, 8 and 4 (one leaving k_proj alone), garbage
    in every padded rank: the kernels compute the true ranks only and equal the reference on the
    clean stacks; BGMV equals SGMV bitwise; an all-base batch is untouched."""
    from folovllm.lora.layers import LinearWithLoRA
    from folovllm.lora.lora_model import LoRALayerWeights
    from folovllm.model_executor.layers.linear import QKVParallelLinear

    g = torch.Generator().manual_seed(3)
    base = QKVParallelLinear(96, 16, 4, 2, bias=False, prefix="model.layers.0.self_attn.qkv_proj")
    layer = LinearWithLoRA(base, ["q_proj", "k_proj", "v_proj"], 3, 64, PunicaWrapper(torch.device("cpu")), dtype)
    assert layer.lora_at_stacked.shape == (3, 96, 192) and layer.lora_a_stacked.shape == (3, 192, 96)
    clean_a, clean_b = torch.zeros(3, 192, 96), [torch.zeros(3, out, 64) for out in layer.output_slices]
    for slot, r in enumerate((16, 8, 4)):
        weights = []
        for p, out in enumerate(layer.output_slices):
            if slot == 2 and p == 1:
                weights.append(None)  # this adapter does not target k_proj
                continue
            w = LoRALayerWeights(f"p{p}", r, torch.randn(r, 96, generator=g).to(dtype),
                                 torch.randn(out, r, generator=g).to(dtype))
            weights.append(w)
            clean_a[slot, p * 64:p * 64 + r], clean_b[p][slot, :, :r] = w.lora_a.float(), w.lora_b.float()
        layer.set_lora(slot, weights)
    assert layer.lora_ranks.tolist() == [[16, 16, 16], [8, 8, 8], [4, 0, 4]]
    for p, b in enumerate(layer.lora_b_stacked):  # garbage wherever a slot's rank does not reach
        for slot in range(3):
            r = int(layer.lora_ranks[slot, p])
            layer.lora_a_stacked[slot, p * 64 + r:(p + 1) * 64] = 1e4
            b[slot, :, r:] = 1e4
    token_slots = [0] * 5 + [-1, 2, 1, -1, 2, 2, 0] + [1] * 18
    T = len(token_slots)
    x = torch.randn(T, 96, generator=g).to(dtype)
    y0 = torch.randn(T, sum(layer.output_slices), generator=g).to(dtype)
    expected = y0.double()
    add_lora_reference(expected, x.double(), clean_a.double(), [b.double() for b in clean_b], torch.tensor(token_slots))
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    segments = SGMVSegments.from_token_slots(token_slots, x.device)
    y_sgmv = y0.clone()
    sgmv_add_lora_cpu(y_sgmv, x, layer.lora_a_stacked, layer.lora_b_stacked, segments.table(), segments.order,
                      ranks=layer.lora_ranks)
    torch.testing.assert_close(y_sgmv.double(), expected, **tol)
    y_bgmv = y0.clone()
    bgmv_add_lora_cpu(y_bgmv, x, layer.lora_a_stacked, layer.lora_b_stacked, torch.tensor(token_slots),
                      ranks=layer.lora_ranks)
    assert torch.equal(y_bgmv, y_sgmv)
    y = y0.clone()
    bgmv_add_lora_cpu(y, x, layer.lora_a_stacked, layer.lora_b_stacked, torch.full((T,), -1), ranks=layer.lora_ranks)
    assert torch.equal(y, y0)


# -- bad adapters: refused by name at add_request; nothing leaks; others keep running ----------

def rewrite_adapter(src: Path, dst: Path, config: Optional[dict] = None, rename: Optional[tuple[str, str]] = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
        cfg["target_modules"] = [t.replace(*rename) for t in cfg["target_modules"]]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def bad_adapters(tiny_qwen3, adapters, tmp_path_factory) -> dict[str, tuple[LoRARequest, str]]:
    """name -> (request, what the error must name)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bad_loras")
    good = adapters("qwen3")["A"].path
    other = AutoConfig.from_pretrained(tiny_qwen3)
    other.hidden_size, other.intermediate_size = 96, 160  # another base model's shapes
    other_model = get_peft_model(AutoModelForCausalLM.from_config(other), LoraConfig(r=8, target_modules=["q_proj"]))
    other_model.save_pretrained(root / "other_base")
    big = make_peft_adapter(tiny_qwen3, root / "big", "big", 1, seed=0, r=32, lora_alpha=32, target_modules=["q_proj"])
    cases = {
        "missing": (root / "nowhere", "does not exist"),
        "rank": (big.path, r"rank r=32 .*'r'.*max_lora_rank=16"),
        "unknown_target": (rewrite_adapter(good, root / "unknown", rename=("q_proj", "qq_proj")),
                           r"target_modules' names 'qq_proj'"),
        "other_base": (root / "other_base", r"q_proj has lora_A \(8, 96\).*another base model"),
        "dora": (rewrite_adapter(good, root / "dora", {"use_dora": True}), "'use_dora'"),
        "modules_to_save": (rewrite_adapter(good, root / "mts", {"modules_to_save": ["lm_head"]}), "'modules_to_save'"),
        "lm_head": (rewrite_adapter(good, root / "head", {"target_modules": ["q_proj", "lm_head"]}), "lm_head"),
    }
    return {name: (LoRARequest(name, 100 + i, str(path)), match)
            for i, (name, (path, match)) in enumerate(cases.items())}


def test_bad_adapters_are_refused_by_name(greedy_reference, hf_models, adapters, bad_adapters):
    """Good requests run; each bad adapter fails its own add_request with a message naming what
    is wrong, mid-run; the good ones still equal HF + PEFT, no bad adapter holds a slot or a CPU
    copy, and every KV block is free at the end."""
    ref, ad = greedy_reference("qwen3"), adapters("qwen3")
    expected = reference_tokens(hf_models("qwen3"), ad, ref.prompts, ref.max_tokens, NAMES)
    llm = lora_llm(ref.path, stage=6, max_num_seqs=16)
    engine = llm.llm_engine
    for i, (prompt, m, name) in enumerate(zip(ref.prompts, ref.max_tokens, NAMES)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=m),
                           lora_request=None if name is None else ad[name].request)
    done: dict[str, list[int]] = {}
    bad = list(bad_adapters.values())
    while engine.has_unfinished_requests():
        if bad:
            request, match = bad.pop()
            with pytest.raises(ValueError, match=match):
                engine.add_request(f"bad-{request.lora_name}", ref.prompts[0], SamplingParams(max_tokens=3),
                                   lora_request=request)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    assert not bad
    assert [done[str(i)] for i in range(len(NAMES))] == expected
    bad_ids = {r.lora_int_id for r, _ in bad_adapters.values()}
    worker = engine.model_runner.lora_manager
    assert not bad_ids & (set(engine.lora_manager.slot_of) | set(engine.lora_manager.known)
                          | set(worker.cpu_cache) | set(worker.slot_ids))
    kv = engine.kv_cache_manager
    assert kv.num_used_blocks == 0


# -- configuration and API errors --------------------------------------------------------------

def test_lora_settings_are_checked(tiny_qwen3, adapters):
    A = adapters("qwen3")["A"].request
    with pytest.raises(ValueError, match="max_cpu_loras .* must be >= max_loras"):
        EngineConfig.for_stage(4, enable_lora=True, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        EngineConfig.for_stage(4, enable_lora=True, max_lora_rank=0)
    with pytest.raises(ValueError, match="enable_lora=True needs enable_continuous_batching"):
        EngineConfig.for_stage(1, enable_lora=True)
    with pytest.raises(ValueError, match="speculative_config is not supported"):
        EngineConfig.for_stage(4, enable_lora=True,
                               speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="stage 11 .* enable_lora=True"):
        EngineConfig.for_stage(11)

    base = LLM(str(tiny_qwen3), stage=4, dtype="float32", max_model_len=128)
    with pytest.raises(ValueError, match="lora_request needs an engine started with enable_lora=True"):
        base.generate([[1, 2, 3]], lora_request=A, use_tqdm=False)
    assert "LoRA" not in base.llm_engine.description["summary"]
    assert not any("LoRA" in type(m).__name__ for m in base.llm_engine.model_runner.model.modules())

    llm = lora_llm(tiny_qwen3, max_model_len=128)
    assert "+ LoRA (max_loras=2)" in llm.llm_engine.description["summary"]
    with pytest.raises(ValueError, match="got 1 lora_request for 2 prompts"):
        llm.generate([[1, 2], [3]], lora_request=[A], use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request must be a LoRARequest"):
        llm.generate([[1, 2]], lora_request="A", use_tqdm=False)
    llm.llm_engine.lora_manager.add_lora(A)
    with pytest.raises(ValueError, match="lora_int_id 1 is already the adapter 'A'"):
        llm.generate([[1, 2]], lora_request=LoRARequest("other", 1, A.lora_path + "x"), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("x", 0, A.lora_path)
