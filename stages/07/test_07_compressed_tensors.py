"""Stage 07: compressed-tensors W4A16 checkpoints (llm-compressor's `pack-quantized` format,
`layers/quantization/compressed_tensors.py`), read into GPTQ's layout at load.

The checkpoints are written here from the format's spec (compressed-tensors'
`pack_to_int32`: signed codes + 2^(bits-1), `P = 32 / bits` of them per int32 word, value j of a
word at bits [j*bits, (j+1)*bits); weights packed along the inputs, zero points along the
outputs), with packing code of the test's own, not the loader's. Guards: the loaded layers
dequantize to exactly the weights the test chose (symmetric and asymmetric, groups and
channel-wise, with and without act-order `weight_g_idx`, 4 and 8 bits); float32 logits equal
the dequantized float model's; the same checkpoint at TP=2, built rank by rank, gives each rank
its slice; whatever else the format can say is refused naming the field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from folovllm.model_executor.layers.linear import LinearBase
from folovllm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig
from folovllm.model_executor.layers.quantization.gptq import KERNEL_ENV, dequantize_gptq
from folovllm.model_executor.model_loader import load_model
from folovllm.tools.gptq_quantizer import forward_sequences
from tests.helpers import mixed_prompts

# name: (bits, group size or -1 for channel-wise, symmetric, actorder)
VARIANTS = {
    "sym-group": (4, 32, True, None),
    "sym-group-gidx": (4, 32, True, "group"),
    "asym-group-gidx": (4, 32, False, "group"),
    "asym-channel": (4, -1, False, None),
    "w8-asym-group": (8, 32, False, "weight"),  # actorder "weight": groups stay contiguous, no g_idx
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_along_last(u: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' packing, from its spec: unsigned values [R, C] -> int32 [R, C / P],
    word c holding values c*P .. c*P + P - 1, value j at bits [j*bits, (j+1)*bits)."""
    P = 32 // bits
    words = torch.zeros(u.shape[0], u.shape[1] // P, dtype=torch.int64)
    for j in range(P):
        words |= u[:, j::P].to(torch.int64) << (bits * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits


def quantize_ct(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor):
    """Round-to-nearest of one [N, K] weight on compressed-tensors' signed grid: -> (codes q,
    zeros z (signed, [N, groups]), scales [N, groups] float16, dequantized [N, K] float32)."""
    N, K = w.shape
    groups = K // group
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.stack([w[:, g_idx == g].min(1).values for g in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == g].max(1).values for g in range(groups)], 1).clamp(min=0)
    if sym:
        scales = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=1e-6).half()
        zeros = torch.zeros(N, groups, dtype=torch.int64)
    else:
        scales = ((hi - lo) / (qmax - qmin)).clamp(min=1e-6).half()
        zeros = (qmin - torch.round(lo / scales.float())).clamp(qmin, qmax).long()
    s, z = scales.float()[:, g_idx.long()], zeros[:, g_idx.long()]  # [N, K]
    codes = (torch.round(w / s) + z).clamp(qmin, qmax).long()
    return codes, zeros, scales, (codes - z).float() * s


def write_ct_checkpoint(src: Path, dst: Path, bits: int, group: int, sym: bool, actorder, seed: int = 0):
    """-> (checkpoint, its dequantized float checkpoint, {layer module name: dequantized [N, K]})."""
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    offset = 2 ** (bits - 1)
    out, float_out, dequantized, perms = {}, {}, {}, {}
    for name, w in tensors.items():
        module, key = name.rsplit(".", 1)
        if key != "weight" or module.rsplit(".", 1)[-1] not in LINEARS:
            out[name] = float_out[name] = w
            continue
        N, K = w.shape
        G = K if group == -1 else group
        if actorder == "group":  # one permutation per input: q/k/v (and gate/up) share it
            key_in = (module.rsplit(".", 2)[0], K)
            if key_in not in perms:
                perms[key_in] = torch.randperm(K, generator=gen)
            g_idx = (perms[key_in] // G).to(torch.int32)
        else:
            g_idx = (torch.arange(K) // G).to(torch.int32)
        codes, zeros, scales, deq = quantize_ct(w.float(), bits, G, sym, g_idx)
        out[f"{module}.weight_packed"] = pack_along_last(codes + offset, bits)  # [N, K / P]
        out[f"{module}.weight_scale"] = scales  # [N, groups]
        out[f"{module}.weight_shape"] = torch.tensor([N, K])
        if not sym:
            out[f"{module}.weight_zero_point"] = pack_along_last((zeros + offset).t(), bits).t().contiguous()
        if actorder == "group":
            out[f"{module}.weight_g_idx"] = g_idx
        dequantized[module] = deq
        float_out[name] = deq
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group,
               "actorder": actorder, "dynamic": False, "observer": "minmax", "observer_kwargs": {},
               "block_structure": None}
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                           "output_activations": None, "format": "pack-quantized"}},
             "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
             "global_compression_ratio": None, "version": "0.12.2"}
    paths = []
    for path, state, qc in ((dst, out, quant), (dst.with_name(dst.name + "-deq"), float_out, None)):
        shutil.copytree(src, path)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
        cfg = dict(config, **({"quantization_config": qc} if qc else {}))
        (path / "config.json").write_text(json.dumps(cfg))
        paths.append(path)
    return paths[0], paths[1], dequantized


@pytest.fixture(scope="module")
def ct_checkpoints(tiny_qwen3, tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {name: write_ct_checkpoint(tiny_qwen3, root / name, *spec) for name, spec in VARIANTS.items()}


def test_spec_packing_matches_a_worked_word():
    """The test's own packer, on the example of compressed-tensors' docstring (8 bits: [1, 2]
    -> unsigned [129, 130] -> 0x00008281 = 33409) and a 4-bit word."""
    assert pack_along_last(torch.tensor([[129, 130, 128, 128]]), 8).tolist() == [[0x80808281 - 2**32]]
    assert pack_along_last(torch.tensor([[129, 130, 0, 0]]), 8).tolist() == [[33409]]
    assert pack_along_last(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4).tolist() == [[0xF7654321 - 2**32]]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loaded_layers_dequantize_exactly_and_logits_equal_the_float_model(ct_checkpoints, name, monkeypatch):
    """Every linear layer, turned into GPTQ's layout, dequantizes to exactly the weights the
    test chose (fused q/k/v and gate/up side by side); the model's float32 logits equal those of
    the same weights loaded as a float checkpoint."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, deq, dequantized = ct_checkpoints[name]
    bits, group, sym, actorder = VARIANTS[name]
    model = load_model(str(path), torch.float32)[0]
    assert model.quant_config == CompressedTensorsConfig(bits=bits, group_size=group, sym=sym,
                                                         actorder=actorder == "group")
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearBase)]
    assert len(layers) == 4 * model.config.num_hidden_layers
    for module_name, layer in layers:
        parent, own = module_name.rsplit(".", 1)
        want = torch.cat([dequantized[f"{parent}.{part}"] for part in fused.get(own, (own,))])  # [N, K]
        got = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits)  # [K, N]
        assert torch.equal(got.t(), want), module_name
        assert not hasattr(layer, "weight_packed")  # the checkpoint layout is gone
    plain = load_model(str(deq), torch.float32)[0]
    prompts, _ = mixed_prompts(model.config.vocab_size)
    seqs = [p for p in prompts if len(p) <= 64][:4]
    a = model.compute_logits(forward_sequences(model, seqs))
    b = plain.compute_logits(forward_sequences(plain, seqs))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sym-group", "asym-group-gidx"])
def test_tensor_parallel_ranks_hold_their_slices(ct_checkpoints, name, monkeypatch):
    """The checkpoint loaded as each rank of 2 in turn: rank r's qkv_proj is rank r's heads of
    the whole layer, and its down_proj the columns of rank r's inputs (grouped: scale rows cut
    per rank; act-order: every group kept). Exact."""
    from folovllm.distributed import parallel_state

    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, _, _ = ct_checkpoints[name]
    bits = VARIANTS[name][0]
    whole = load_model(str(path), torch.float32)[0].model.layers[0]
    w = {n: dequantize_gptq(m.qweight, m.qzeros, m.scales, m.g_idx, bits)
         for n, m in (("qkv", whole.self_attn.qkv_proj), ("down", whole.mlp.down_proj))}
    q, k, v = w["qkv"].split(whole.self_attn.qkv_proj.output_sizes, dim=1)
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "_WORLD_SIZE", 2)
        monkeypatch.setattr(parallel_state, "_RANK", rank)
        layer = load_model(str(path), torch.float32)[0].model.layers[0]
        qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
        half = lambda t, dim: t.chunk(2, dim)[rank]  # noqa: E731
        want_qkv = torch.cat([half(q, 1), half(k, 1), half(v, 1)], 1)
        assert torch.equal(dequantize_gptq(qkv.qweight, qkv.qzeros, qkv.scales, qkv.g_idx, bits), want_qkv)
        got_down = dequantize_gptq(down.qweight, down.qzeros, down.scales, down.g_idx, bits)  # [K / 2, N]
        assert torch.equal(got_down, half(w["down"], 0))
        groups = down.input_size // VARIANTS[name][1]
        assert down.scales.shape[0] == (groups if VARIANTS[name][3] == "group" else groups // 2)


def _group(**weights):
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


@pytest.mark.parametrize("change,match", [
    ({"format": "float-quantized"}, r"compressed-tensors format='float-quantized' .* only 'pack-quantized'"),
    ({"quantization_status": "frozen"}, r"quantization_status='frozen' .* must be stored compressed"),
    ({"kv_cache_scheme": {"num_bits": 8}}, r"kv_cache_scheme=.* not supported"),
    ({"sparsity_config": {"format": "sparse-24"}}, r"sparsity_config=.* not supported"),
    ({"ignore": ["lm_head", "re:.*mlp.down_proj"]}, r"ignore='re:.\*mlp.down_proj' .* only the LM head"),
    ({"config_groups": {"a": {}, "b": {}}}, r"config_groups=\['a', 'b'\] .* exactly one config group"),
    ({"config_groups": {"group_0": {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 4}}}},
     r"config_groups.group_0.targets=\['re:.\*self_attn.\*'\] .* only \['Linear'\]"),
    ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32},
                                    "input_activations": {"num_bits": 8}}}},
     r"group_0.input_activations=.* activation quantization is not supported"),
    ({"config_groups": _group(num_bits=3, group_size=32)}, r"weights.num_bits=3 .* must be 4 or 8"),
    ({"config_groups": _group(num_bits=8, type="float", strategy="channel")}, r"weights.type='float' .* integer"),
    ({"config_groups": _group(num_bits=4, strategy="tensor")}, r"weights.strategy='tensor' .* 'group' and 'channel'"),
    ({"config_groups": _group(num_bits=4, strategy="group")}, r"weights.group_size=None .* positive integer"),
    ({"config_groups": _group(num_bits=4, group_size=32, dynamic=True)}, r"weights.dynamic=True .* not supported"),
    ({"config_groups": _group(num_bits=4, group_size=32, actorder="sometimes")}, r"weights.actorder='sometimes'"),
    ({"config_groups": _group(num_bits=4, group_size=32, symmetric="yes")},
     r"weights.symmetric='yes' .* true or false"),
    ({"config_groups": _group(num_bits=4, group_size=32, zp_dtype="torch.float8_e4m3fn")},
     r"weights.zp_dtype='torch.float8_e4m3fn' .* int8"),
    ({"config_groups": _group(num_bits=4, group_size=4)}, r"group_size=4 must be a multiple of 8"),
    ({"config_groups": _group(num_bits=4, group_size=48)},
     r"compressed-tensors group_size=48 does not divide the 64 inputs of model.layers.0.self_attn.qkv_proj"),
])
def test_anything_else_is_refused_naming_the_field(ct_checkpoints, tmp_path, change, match):
    path, _, _ = ct_checkpoints["sym-group"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(str(bad), torch.float32)


def test_weight_shape_is_checked_against_the_config(ct_checkpoints, tmp_path):
    path, _, _ = ct_checkpoints["sym-group"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight_shape"] = torch.tensor([64, 64])
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"weight_shape of model.layers.1.self_attn.qkv_proj \(shard 'k'\) is "
                                         r"\[64, 64\], but config.json gives \[32, 64\]"):
        load_model(str(bad), torch.float32)


def test_quantization_name_insists_on_the_format(ct_checkpoints, tiny_qwen3):
    path, _, _ = ct_checkpoints["sym-group"]
    assert load_model(str(path), torch.float32, quantization="compressed-tensors")[0].quant_config is not None
    with pytest.raises(ValueError, match=r"quantization='gptq' but .* says quant_method='compressed-tensors'"):
        load_model(str(path), torch.float32, quantization="gptq")


def test_engine_greedy_tokens_equal_the_dequantized_model(ct_checkpoints, monkeypatch):
    """Through the whole engine (the worker reads the checkpoint's quantization_config); and in
    bfloat16, where the layers take torch's int4 CPU kernel like any GPTQ layer, it runs and
    the start-up line names the format."""
    from folovllm import LLM, SamplingParams
    from folovllm.model_executor.layers.quantization.gptq import cpu_int4_available

    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, deq, _ = ct_checkpoints["asym-group-gidx"]
    prompts = [p for p in mixed_prompts(512)[0] if len(p) <= 64][:3]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = [[o.outputs[0].token_ids for o in LLM(str(p), dtype="float32", max_num_seqs=3, max_model_len=128)
             .generate(prompts, params, use_tqdm=False)] for p in (path, deq)]
    assert outs[0] == outs[1] and len({t for o in outs[0] for t in o}) > 6
    if cpu_int4_available():
        monkeypatch.delenv(KERNEL_ENV)
        llm = LLM(str(path), dtype="bfloat16", max_num_seqs=3, max_model_len=128)
        assert "+ COMPRESSED-TENSORS 4-bit" in llm.llm_engine.description["summary"]
        [res] = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)
        assert len(res.outputs[0].token_ids) == 4
