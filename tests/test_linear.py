"""The linear layers of `layers/linear.py` and the quantization seam they open.

Guards: each layer computes `F.linear` with the weights its loader placed; fused loaders put each
checkpoint shard at its own output rows (q/k/v, gate/up), along whatever dimension and packing a
parameter declares; a quant method that stores weights differently plugs in without touching the
model file and still gives HF's greedy tokens.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from folovllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    QuantizationConfig,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    WeightLoader,
    set_weight_attrs,
)
from folovllm.model_executor.layers.cpu_gemm import dense_linear, onednn_takes, weight_packing
from folovllm.model_executor.model_loader import load_model
from folovllm.platforms.cpu import onednn_bf16_supported
from tests.helpers import ARCHS, our_decode_logits

IN = 8


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("cls", [ReplicatedLinear, ColumnParallelLinear, RowParallelLinear])
def test_unfused_layer_is_f_linear(cls, bias):
    layer = cls(IN, 5, bias=bias)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    w, b = _rand(5, IN, seed=1), _rand(5, seed=2)
    layer.weight.weight_loader(layer.weight, w)
    if bias:
        layer.bias.weight_loader(layer.bias, b)
    x = _rand(3, IN, seed=3)  # [T, in]
    assert torch.equal(layer(x), F.linear(x, w, b if bias else None))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_dense_linear_equals_f_linear(rows, bias, dtype, tol):
    """The oneDNN path (taken under inference mode on CPU) is `F.linear` up to rounding, and the
    reference path (grad enabled) is `F.linear` exactly."""
    w, b = _rand(96, 80, seed=1).to(dtype), _rand(96, seed=2).to(dtype)
    x = _rand(rows, 80, seed=3).to(dtype)
    ref = F.linear(x, w, b if bias else None)
    with torch.inference_mode():
        fast = dense_linear(x, w, b if bias else None)
    assert fast.dtype == dtype and fast.shape == ref.shape
    torch.testing.assert_close(fast.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(dense_linear(x, w, b if bias else None), ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_weights_give_f_linear_at_every_batch(dtype, tol, monkeypatch):
    """`pack_linear_weight` (run by `process_weights_after_loading` under `weight_packing`) swaps the plain weight for oneDNN's blocked copy of it (exactly the
    same numbers, `to_dense`), and the layer still computes `F.linear` at 1-2 rows (padded to
    MIN_ROWS) and beyond. bfloat16 on a CPU without oneDNN's bf16 kernels (AVX2 only, or
    FOLOVLLM_CPU_ISA=avx2) is left plain and takes `F.linear`: packing it would fail there."""
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "onednn")  # float32's other layout: test_decode_gemm.py
    layer = MergedColumnParallelLinear(80, [48, 48], bias=True, params_dtype=dtype)
    w, b = _rand(96, 80, seed=1).to(dtype), _rand(96, seed=2).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    packs = onednn_takes(dtype)
    assert packs == (dtype == torch.float32 or onednn_bf16_supported())
    layer.quant_method.process_weights_after_loading(layer)  # packing is off by default
    assert not layer.weight.is_mkldnn
    with weight_packing(True):
        layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.is_mkldnn == packs and torch.equal(layer.weight.to_dense(), w)
    for rows in (1, 2, 3, 16, 100):
        x = _rand(rows, 80, seed=rows).to(dtype)
        with torch.inference_mode():
            y = layer(x)
        assert y.shape == (rows, 96)
        torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol)


def test_a_tied_lm_head_gets_a_packed_copy_and_the_embedding_stays_plain(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "onednn")  # the kernel's panels: test_decode_gemm.py
    plain = load_model(str(tiny_qwen3), torch.float32)[0]
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # tied, as in Qwen3-0.6B
    with weight_packing(True):
        model = load_model(str(tiny_qwen3), torch.float32)[0]
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight.is_mkldnn for m in linears)
    embedding = model.model.embed_tokens.weight
    assert not embedding.is_mkldnn and torch.equal(embedding, plain.model.embed_tokens.weight)
    assert model.lm_head.weight.is_mkldnn and torch.equal(model.lm_head.weight.to_dense(), embedding)


def _load_shards(layer: LinearBase, shards: dict, bias: bool) -> dict:
    """Load random, all-different tensors into each shard, in reverse order (the loader must not
    depend on arrival order). Returns {shard id: (weight, bias)}."""
    tensors = {}
    for i, (shard_id, rows) in enumerate(reversed(shards.items())):
        w, b = _rand(rows, IN, seed=10 + i), _rand(rows, seed=20 + i)
        layer.weight.weight_loader(layer.weight, w, shard_id)
        if bias:
            layer.bias.weight_loader(layer.bias, b, shard_id)
        tensors[shard_id] = (w, b)
    return tensors


def _assert_rows(layer: LinearBase, shards: dict, tensors: dict, bias: bool) -> None:
    """Shard i owns output rows [sum of earlier sizes, + its size), and the forward is the
    concatenation of each shard's own `F.linear`."""
    offset = 0
    for shard_id, rows in shards.items():
        w, b = tensors[shard_id]
        assert torch.equal(layer.weight[offset : offset + rows], w), f"shard {shard_id!r} misplaced"
        if bias:
            assert torch.equal(layer.bias[offset : offset + rows], b), f"bias shard {shard_id!r} misplaced"
        offset += rows
    assert offset == layer.weight.shape[0]
    x = _rand(4, IN, seed=5)  # [T, in]
    want = torch.cat([F.linear(x, tensors[s][0], tensors[s][1] if bias else None) for s in shards], -1)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)  # [T, sum of shard rows]


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_qkv_loader_places_q_k_v_at_their_rows(bias):
    # 4 query heads, 2 kv heads of size 3: q rows [0, 12), k [12, 18), v [18, 24). k and v have
    # the same shape, so only their values can tell a swap.
    layer = QKVParallelLinear(IN, head_size=3, total_num_heads=4, total_num_kv_heads=2, bias=bias)
    shards = {"q": 12, "k": 6, "v": 6}
    _assert_rows(layer, shards, _load_shards(layer, shards, bias), bias)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_merged_loader_places_gate_then_up(bias):
    layer = MergedColumnParallelLinear(IN, [5, 5], bias=bias)  # same sizes: a swap shows in values only
    shards = {0: 5, 1: 5}
    _assert_rows(layer, shards, _load_shards(layer, shards, bias), bias)


def test_loader_errors_are_clear():
    layer = QKVParallelLinear(IN, head_size=3, total_num_heads=4, total_num_kv_heads=2)
    with pytest.raises(ValueError, match=r"shape \(12, 8\) loaded into a slot of shape \(6, 8\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(12, IN), "k")
    with pytest.raises(ValueError, match=r"has shards \('q', 'k', 'v'\), not 'o'"):
        layer.weight.weight_loader(layer.weight, torch.zeros(6, IN), "o")
    row = RowParallelLinear(IN, 4)
    with pytest.raises(ValueError, match="has no fused shards"):
        row.weight.weight_loader(row.weight, torch.zeros(4, IN), 0)


class GPTQShapedMethod(LinearMethodBase):
    """The parameter layout of a GPTQ layer (4-bit, group size 4, 2 values per "int" here so the
    numbers stay small), to test the loader's dimension bookkeeping; `apply` is not needed."""

    PACK = 2

    def create_weights(self, layer, input_size, output_partition_sizes, params_dtype, weight_loader):
        out = sum(output_partition_sizes)
        qweight = torch.nn.Parameter(torch.zeros(input_size // self.PACK, out), requires_grad=False)
        set_weight_attrs(qweight, input_dim=0, output_dim=1, packed_dim=0, pack_factor=self.PACK)
        qzeros = torch.nn.Parameter(torch.zeros(input_size // 4, out // self.PACK), requires_grad=False)
        set_weight_attrs(qzeros, input_dim=0, output_dim=1, packed_dim=1, pack_factor=self.PACK)
        g_idx = torch.nn.Parameter(torch.zeros(input_size), requires_grad=False)
        set_weight_attrs(g_idx, input_dim=0)
        for name, p in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
            set_weight_attrs(p, weight_loader=weight_loader)
            layer.register_parameter(name, p)

    def apply(self, layer, x, bias):
        raise NotImplementedError


class _Config(QuantizationConfig):
    def __init__(self, method_cls: type) -> None:
        self.method_cls = method_cls

    def get_quant_method(self, layer: LinearBase) -> Optional[LinearMethodBase]:
        return self.method_cls()


def test_packed_parameters_take_shards_along_their_declared_dims():
    """GPTQ's qweight is packed along the input and split along the output (dim 1); its qzeros
    is packed along the output, so a shard's offset and size shrink by the pack factor; g_idx
    has no output dim, so every shard carries all of it."""
    layer = MergedColumnParallelLinear(IN, [4, 6], quant_config=_Config(GPTQShapedMethod))
    assert not hasattr(layer, "weight")
    up_qweight, up_qzeros = _rand(IN // 2, 6, seed=1), _rand(IN // 4, 3, seed=2)
    g_idx = torch.arange(IN, dtype=torch.float32) // 4
    layer.qweight.weight_loader(layer.qweight, up_qweight, 1)
    layer.qzeros.weight_loader(layer.qzeros, up_qzeros, 1)
    layer.g_idx.weight_loader(layer.g_idx, g_idx, 1)
    assert torch.equal(layer.qweight[:, 4:], up_qweight) and not layer.qweight[:, :4].any()
    assert torch.equal(layer.qzeros[:, 2:], up_qzeros) and not layer.qzeros[:, :2].any()
    assert torch.equal(layer.g_idx, g_idx)


class TransposedLinearMethod(LinearMethodBase):
    """A stand-in for a quantized format: the weight is stored as [in, out] (the orientation of
    GPTQ's qweight, so shards land along dim 1) and `apply` turns it back."""

    def create_weights(self, layer, input_size, output_partition_sizes, params_dtype, weight_loader):
        weight = torch.nn.Parameter(
            torch.empty(input_size, sum(output_partition_sizes), dtype=params_dtype),  # [in, out]
            requires_grad=False,
        )

        def load_transposed(param, loaded_weight, shard_id=None):
            # The checkpoint holds [out_shard, in]; the layer's loader places [in, out_shard].
            args = () if shard_id is None else (shard_id,)
            weight_loader(param, loaded_weight.t(), *args)

        set_weight_attrs(weight, input_dim=0, output_dim=1, weight_loader=load_transposed)
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight.t(), bias)  # "dequantize": [in, out] -> [out, in] view


@pytest.mark.parametrize("arch", ARCHS)
def test_quant_method_seam_gives_hf_greedy_tokens(arch, greedy_reference, tiny_checkpoints):
    """The model file is unchanged; only the quant method differs. If the fused loaders ignored
    `output_dim`, or the layers multiplied by the stored tensor instead of calling `apply`, the
    [in, out] weights would not fit (and the square o_proj would give other tokens)."""
    ref = greedy_reference(arch)
    plain = load_model(str(ref.path), torch.float32)[0]
    model = load_model(str(ref.path), torch.float32, quant_config=_Config(TransposedLinearMethod))[0]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}
    assert len(linears) == 4 * model.config.num_hidden_layers
    plain_params = dict(plain.named_parameters())
    for name, layer in linears.items():
        assert isinstance(layer.quant_method, TransposedLinearMethod)
        assert layer.weight.shape == (layer.input_size, layer.output_size)
        assert torch.equal(layer.weight.t(), plain_params[f"{name}.weight"]), name

    # Greedy by teacher forcing: feed prompt + HF's output through the KV cache, one decoded
    # token per step; greedy decoding reproduces HF iff every next token is the argmax.
    picks = [i for i, p in enumerate(ref.prompts) if len(p) <= 64 and len(ref.outputs[i]) > 1]
    seqs = [ref.prompts[i] + ref.outputs[i] for i in picks]
    logits = our_decode_logits(model, seqs, num_prefill=[len(ref.prompts[i]) for i in picks])
    for i, seq_logits in zip(picks, logits):
        n = len(ref.prompts[i])
        got = seq_logits[n - 1 : -1].argmax(-1).tolist()  # [len(output)]
        assert got == ref.outputs[i], f"prompt {i}: ours {got} != HF {ref.outputs[i]}"
