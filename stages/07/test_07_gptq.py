"""Stage 07: GPTQ checkpoints (`layers/quantization/gptq.py`), their kernels and our quantizer
(`tools/gptq_quantizer.py`).

Guards: packing and the v1/v2 zero conventions; every fast kernel (cpu_int4, our cpu_int4_panel,
Triton) against the
plain-torch / float64 reference on random shapes, group sizes and act-order permutations; our quantizer
beats round-to-nearest on the layer's output error; its checkpoints load, and the quantized
model equals the same model run on its dequantized float weights (logits and greedy tokens, on
all three architectures); weight bytes; the loader's refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig
from folovllm.model_executor.layers.linear import LinearBase, RowParallelLinear
from folovllm.model_executor.layers.quantization.gptq import (
    KERNEL_ENV,
    CpuInt4Weight,
    GPTQConfig,
    Int4PanelWeight,
    cpu_int4_available,
    dequantize_gptq,
    gptq_matmul_reference,
    int4_panel_supported,
    pack_int32,
    qzeros_v1_to_v2,
    unpack_int32,
)
from folovllm.model_executor.model_loader import load_model
from folovllm.tools.gptq_quantizer import (
    GPTQ,
    dequantize_checkpoint,
    forward_sequences,
    perplexity,
    quantize_checkpoint,
    rtn_quantize,
    rtn_quantize_weight,
    to_checkpoint_tensors,
)
from tests.helpers import ARCHS, mixed_prompts

ROOT = Path(__file__).resolve().parents[2]
GROUP = 32  # divides the tiny models' 64 hidden and 128 intermediate features


def _random_gptq(K: int, N: int, group: int, act_order: bool, bits: int = 4, seed: int = 0):
    """Random codes, zeros, scales; g_idx in order or an act-order permutation of the groups."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (K, N), generator=g)
    zeros = torch.randint(0, maxq + 1, (K // group, N), generator=g)
    order = torch.randperm(K, generator=g) if act_order else torch.arange(K)
    g_idx = (order // group).to(torch.int32)
    scales = torch.rand(K // group, N, generator=g) * 0.1 + 0.01
    return codes, zeros, scales, g_idx


# -- format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip_and_bit_layout(bits):
    codes = torch.randint(0, 2**bits, (64, 16))
    qweight = pack_int32(codes, bits, dim=0)  # [64 * bits / 32, 16]
    assert qweight.dtype == torch.int32 and qweight.shape == (64 * bits // 32, 16)
    assert torch.equal(unpack_int32(qweight, bits, dim=0), codes)
    assert torch.equal(unpack_int32(pack_int32(codes, bits, dim=1), bits, dim=1), codes)
    # Code j of a word sits at bits [j*bits, (j+1)*bits): input 1 of column 0 is bits 4..7.
    if bits == 4:
        word = int(qweight[0, 0]) & 0xFFFFFFFF
        assert [(word >> (4 * j)) & 0xF for j in range(8)] == codes[:8, 0].tolist()


def test_dequantize_follows_the_formula_with_act_order():
    K, N = 64, 16
    codes, zeros, scales, g_idx = _random_gptq(K, N, 16, act_order=True)
    got = dequantize_gptq(pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1), scales, g_idx, 4)
    for k in range(K):
        g = int(g_idx[k])
        torch.testing.assert_close(got[k], (codes[k] - zeros[g]).float() * scales[g], rtol=0, atol=0)


def as_v1(qzeros_v2: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """What GPTQModel and AutoGPTQ write for v1: the packed zeros minus 1 in every field, as ONE
    int32 subtraction (wrapping), so a zero of 0 borrows from its neighbour."""
    ones = sum(1 << (bits * j) for j in range(32 // bits))
    return qzeros_v2 - torch.tensor(ones - 2**32 if ones >= 2**31 else ones, dtype=torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_v1_zeros_read_word_level_even_where_a_zero_is_0(bits):
    """v1 ("gptq") subtracts 1 from every packed zero as one 32-bit subtraction. Where a real
    zero is 0 the field borrows from its neighbour: reading it back field by field (what folovllm
    did) is wrong there; the word-level addition GPTQModel does on load gives every zero back."""
    codes, zeros, scales, g_idx = _random_gptq(64, 32, 16, act_order=False, bits=bits)
    zeros[:, ::3] = 0  # zero points of 0 in every word, beside non-zero neighbours
    v2 = pack_int32(zeros, bits, 1)
    v1 = as_v1(v2, bits)
    assert torch.equal(qzeros_v1_to_v2(v1, bits), v2)
    qweight = pack_int32(codes, bits, 0)
    plain = (codes - zeros[g_idx.long()]).float() * scales[g_idx.long()]  # the formula, no packing
    assert torch.equal(dequantize_gptq(qweight, qzeros_v1_to_v2(v1, bits), scales, g_idx, bits), plain)
    field_by_field = unpack_int32(v1, bits, 1) + 1  # the old reading
    assert not torch.equal(field_by_field, zeros)
    # Where no zero is 0 (every symmetric checkpoint) the two readings agree, which is why only
    # asymmetric v1 files with a zero point of 0 came out wrong.
    nonzero = zeros.clamp(min=1)
    assert torch.equal(unpack_int32(as_v1(pack_int32(nonzero, bits, 1), bits), bits, 1) + 1, nonzero)


def test_an_asymmetric_v1_checkpoint_with_zero_points_of_0_loads_exactly(gptq_checkpoints, tmp_path, monkeypatch):
    """The same asymmetric checkpoint written as v2 and as v1 (GPTQModel's default format), some
    zero points forced to 0: the two load to identical layers and identical logits."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, _ = gptq_checkpoints["qwen3", "act"]  # asymmetric, v2
    tensors = load_file(str(path / "model.safetensors"))
    forced = 0
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        zeros = unpack_int32(tensors[name], 4, 1)
        zeros[:, ::5] = 0
        forced += int((zeros == 0).sum())
        tensors[name] = pack_int32(zeros, 4, 1)
    assert forced > 0
    loaded = {}
    for fmt in ("gptq_v2", "gptq"):
        dst = tmp_path / fmt
        shutil.copytree(path, dst)
        save_file({n: as_v1(t) if fmt == "gptq" and n.endswith(".qzeros") else t for n, t in tensors.items()},
                  str(dst / "model.safetensors"))
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"]["checkpoint_format"] = fmt
        (dst / "config.json").write_text(json.dumps(config))
        loaded[fmt] = load_model(str(dst), torch.float32)[0]
    v2, v1 = loaded["gptq_v2"], loaded["gptq"]
    for (name, a), (_, b) in zip(v2.named_buffers(), v1.named_buffers()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(v2.named_parameters(), v1.named_parameters()):
        assert torch.equal(a, b), name
    seqs = [list(range(3, 40))]
    assert torch.equal(v2.compute_logits(forward_sequences(v2, seqs)), v1.compute_logits(forward_sequences(v1, seqs)))


# -- fast paths against the reference --------------------------------------------------------


@pytest.mark.skipif(not cpu_int4_available(), reason="torch has no int4 CPU matmul")
@pytest.mark.parametrize("K,N,group,act_order,v1", [
    (64, 32, 32, False, True), (128, 48, 64, True, False), (256, 64, 128, True, True),
    (96, 16, -1, False, False), (256, 32, 256, False, False),
])
def test_cpu_int4_matches_reference(K, N, group, act_order, v1):
    """torch's int4 kernel computes in bfloat16: compared with the float32 reference on the same
    weights, within bfloat16's rounding of activations and (scale, zero) pairs."""
    codes, zeros, scales, g_idx = _random_gptq(K, N, K if group == -1 else group, act_order, seed=K + N)
    qweight, qzeros = pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1)
    if v1:  # as a v1 checkpoint is read: converted to v2 once, at load
        qzeros = qzeros_v1_to_v2(as_v1(qzeros), 4)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    want = gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, 4)
    w = CpuInt4Weight.from_gptq(qweight, qzeros, scales, g_idx)
    assert (w.perm is not None) == act_order
    got = w.matmul(x)
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"


_panel_ok = int4_panel_supported(GPTQConfig(), 64, torch.float32) is None


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
@pytest.mark.parametrize("K,N,group,act_order", [
    (128, 40, 32, False), (256, 72, 64, True), (256, 104, 128, False), (384, 96, 128, True),
    (96, 8, -1, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int4_panel_matches_float64_reference(K, N, group, act_order, dtype):
    """Our int4 decode kernel (csrc/cpu/int4_gemm.cpp) against the dequantize-matmul reference in
    float64, for every decode row count 1-16 and a tile remainder past them (23), output counts
    that are not a multiple of the 32-output panel, act-order on and off, group sizes 32-128 and
    one group. Float32 activations: within float32 rounding; bfloat16: within the one rounding of
    the output to bfloat16 (the sum is float32). On both ISA paths (CI runs FOLOVLLM_CPU_ISA=avx2)."""
    codes, zeros, scales, g_idx = _random_gptq(K, N, K if group == -1 else group, act_order, seed=K + N)
    qweight, qzeros = pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1)
    w = Int4PanelWeight.from_gptq(qweight, qzeros, scales, g_idx)
    assert (w.perm is not None) == act_order
    W = dequantize_gptq(qweight, qzeros, scales.double(), g_idx, 4)  # [K, N] float64
    g = torch.Generator().manual_seed(1)
    for rows in (*range(1, 17), 23):
        x = torch.randn(rows, K, generator=g).to(dtype)
        got = w.matmul(x)
        want = x.double() @ W
        assert got.dtype == dtype and got.shape == (rows, N)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5 * K**0.5)
        else:
            torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-3)


def _q8_rounded(x: torch.Tensor, perm) -> torch.Tensor:
    """llama.cpp's Q8_0 rounding of x [M, K] as cpu_int4_panel_q8 does it: in the kernel's
    (group-sorted) input order, per block of 32 inputs d = max |x| * (1 / 127), q = round(x / d)
    taken as round(x * (127 / max |x|)) in float32 (half to even), x^ = q d. Returns x^ in that
    order and each input's d. (The float32 steps matter: 1 / d rounds differently from
    127 / max |x|, and bfloat16 inputs land on ties of x / d often enough to show it.)"""
    xs = x.float()[:, perm] if perm is not None else x.float()
    blocks = xs.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax * (torch.tensor(1.0) / 127)
    # (a tensor 127, not the number: torch takes `127 / t` as 127 * (1 / t), another rounding)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * d).view(x.shape), d.expand_as(blocks).reshape(x.shape)


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
@pytest.mark.parametrize("K,N,group,act_order", [
    (128, 40, 32, False), (256, 72, 64, True), (384, 96, 128, True), (96, 8, -1, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int4_panel_q8_is_the_exact_product_of_q8_rounded_activations(K, N, group, act_order, dtype):
    """The opt-in int8-activation kernel (cpu_int4_panel_q8) computes W x^ for x^ = the Q8_0
    rounding of x (`_q8_rounded`) within float32 rounding, so its distance from the exact W x is
    the rounding's alone: at most sum_k |W[n, k]| d(k) / 2, half a step of each input's block
    (the bound is asserted; it is also not the exact kernel's result)."""
    codes, zeros, scales, g_idx = _random_gptq(K, N, K if group == -1 else group, act_order, seed=K + N)
    qweight, qzeros = pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1)
    w = Int4PanelWeight.from_gptq(qweight, qzeros, scales, g_idx, int8_activations=True)
    W = dequantize_gptq(qweight, qzeros, scales.double(), g_idx, 4)  # [K, N] float64
    Ws = W[w.perm] if w.perm is not None else W  # the kernel's input order
    g = torch.Generator().manual_seed(1)
    for rows in (*range(1, 17), 23):
        x = torch.randn(rows, K, generator=g).to(dtype)
        got = w.matmul(x)
        assert got.dtype == dtype and got.shape == (rows, N)
        xhat, d = _q8_rounded(x, w.perm)
        want = xhat.double() @ Ws
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5 * K**0.5)
        else:
            torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-3)
        exact = x.double() @ W
        bound = (d.double() / 2) @ Ws.abs()  # [rows, N]
        slack = 1e-5 * exact.abs() + 1e-5 if dtype == torch.float32 else 8e-3 * exact.abs() + 1e-3
        assert torch.all((got.double() - exact).abs() <= bound + slack)
        assert not torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-6)  # it did round x


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
def test_cpu_int4_panel_q8_refuses_groups_that_are_not_whole_activation_blocks():
    from folovllm._custom_ops import load_ops
    from folovllm.model_executor.layers.quantization.gptq import int4_panel_q8_supported

    assert int4_panel_q8_supported(GPTQConfig(group_size=128), 1024, torch.float32) is None
    assert "multiples of 32" in int4_panel_q8_supported(GPTQConfig(group_size=16), 64, torch.float32)
    codes, zeros, scales, g_idx = _random_gptq(64, 32, 16, False)
    w = Int4PanelWeight.from_gptq(pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1), scales, g_idx)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        load_ops().int4_decode_linear_q8(torch.randn(2, 64), w.packed, None, 16, 32)


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
@pytest.mark.parametrize("int8", [False, True], ids=["exact", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int4_panel_row_is_bitwise_the_same_in_any_batch(dtype, int8):
    """Each output's sum is taken in one order whatever the rows around it (batch invariance);
    the int8 way rounds each row on its own, so it keeps that too."""
    codes, zeros, scales, g_idx = _random_gptq(256, 96, 64, True, seed=3)
    w = Int4PanelWeight.from_gptq(pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1), scales, g_idx,
                                  int8_activations=int8)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    alone = torch.cat([w.matmul(x[i:i + 1]) for i in range(len(x))])
    for m in (2, 3, 8, 9, 16, 20):
        assert torch.equal(w.matmul(x[:m]), alone[:m]), m


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
def test_cpu_int4_panel_refuses_bad_input_with_a_reason():
    from folovllm._custom_ops import load_ops

    codes, zeros, scales, g_idx = _random_gptq(64, 32, 32, False)
    w = Int4PanelWeight.from_gptq(pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1), scales, g_idx)
    ops = load_ops()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.int4_decode_linear(torch.randn(2, 64, dtype=torch.float64), w.packed, None, 32, 32)
    with pytest.raises(RuntimeError, match="packed weight must be"):
        ops.int4_decode_linear(torch.randn(2, 64), w.packed, None, 32, 40)  # 40 outputs: 2 panels
    with pytest.raises(RuntimeError, match="perm holds"):
        ops.int4_decode_linear(torch.randn(2, 64), w.packed, torch.full((64,), 64), 32, 32)
    with pytest.raises(ValueError, match="groups of one size"):  # uneven act-order groups
        Int4PanelWeight.from_gptq(pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1), scales,
                                  torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32))


def test_triton_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gptq_triton_cases.py"))],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines and all(line.startswith("ok") for line in lines), (
        f"{proc.stdout}\n{proc.stderr[-3000:]}")


# -- the quantizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("desc_act", [False, True], ids=["in_order", "act_order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gptq_beats_round_to_nearest_on_layer_output_error(sym, desc_act):
    """||W X - W_hat X||^2 on the calibration inputs: GPTQ moves each rounding error onto the
    columns not yet rounded, so with correlated inputs (as real activations are) its error is
    well below RTN's on the same grid (4 bits, groups of 32)."""
    g = torch.Generator().manual_seed(0)
    K, N, T = 128, 64, 512
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    X = torch.randn(T, K, generator=g) @ mix * (torch.rand(K, generator=g) * 3)  # correlated, uneven scales
    W = torch.randn(N, K, generator=g)
    state = GPTQ(W)
    state.add_batch(X[: T // 2])
    state.add_batch(X[T // 2 :])  # the running mean over two batches
    q = state.quantize(bits=4, group_size=32, sym=sym, desc_act=desc_act)

    def err(w_hat: torch.Tensor) -> float:
        return ((X @ W.t() - X @ w_hat.t()) ** 2).sum().item()

    gptq, rtn = err(q.dequantized), err(rtn_quantize(W, 4, 32, sym))
    assert gptq < 0.7 * rtn, f"GPTQ {gptq:.4g} vs RTN {rtn:.4g}"
    # What the checkpoint tensors dequantize to is exactly the quantizer's own result.
    zeros = pack_int32(q.zeros, 4, 1)
    again = dequantize_gptq(pack_int32(q.codes, 4, 0), zeros, q.scales.float(), q.g_idx, 4)
    assert torch.equal(again.t(), q.dequantized)
    assert torch.equal(torch.sort(torch.bincount(q.g_idx.long())).values, torch.full((K // 32,), 32))


@pytest.mark.parametrize("group", [32, -1])
def test_round_to_nearest_stores_round_w_over_s_times_s(group):
    """`--method rtn`: each weight is its own nearest grid point, round(w / s) * s with the
    group's stored (float16) scale, clamped to the 4-bit range [-8, 7]; no error compensation.
    The checkpoint tensors read back (v1 zeros, as the loader reads them) to the same weights."""
    g = torch.Generator().manual_seed(2)
    K, N = 128, 48
    W = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    q = rtn_quantize_weight(W, 4, group, sym=True)
    G = K if group == -1 else group
    s = q.scales.float().repeat_interleave(G, 0).t()  # [N, K]: each weight's group scale
    expected = torch.clamp(torch.round(W / s), -8, 7) * s
    assert torch.equal(q.dequantized, expected)
    assert torch.equal(q.dequantized, rtn_quantize(W, 4, group, sym=True))
    assert torch.all(q.zeros == 8) and torch.equal(q.g_idx, (torch.arange(K) // G).to(torch.int32))
    stored = to_checkpoint_tensors(q, GPTQConfig(bits=4, group_size=group, checkpoint_format="gptq"))
    again = dequantize_gptq(stored["qweight"], qzeros_v1_to_v2(stored["qzeros"], 4), stored["scales"].float(),
                            stored["g_idx"], 4)
    assert torch.equal(again.t(), expected)
    # nearest: no weight is more than half a step from its grid point (unless clamped at +7)
    inside = (W / s) < 7.5
    assert torch.all((W - expected).abs()[inside] <= s[inside] / 2 * (1 + 1e-6))


def test_round_to_nearest_refuses_a_group_that_does_not_divide_the_inputs():
    """A group size that leaves a ragged last group is refused by name, not reshaped into garbage."""
    with pytest.raises(ValueError, match="group_size=48 must divide the weight's 128 inputs"):
        rtn_quantize_weight(torch.randn(8, 128), 4, 48, sym=True)


def test_quantize_checkpoint_rtn_writes_the_rounded_float_model(tiny_qwen3, tmp_path, monkeypatch):
    """`folovllm quantize --method rtn`: no calibration, every decoder linear rounded to
    nearest, the GPTQ format the engine loads; its layers hold exactly `rtn_quantize` of the
    float weights."""
    from folovllm.entrypoints.cli import main

    monkeypatch.setenv(KERNEL_ENV, "reference")
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_qwen3), str(out), "--group-size", str(GROUP), "--method", "rtn"]) == 0
    deq = dequantize_checkpoint(str(out), str(tmp_path / "rtn-deq"))
    floats = load_model(str(tiny_qwen3), torch.float32)[0]
    rounded = load_model(str(deq), torch.float32)[0]
    layers = [n for n, m in floats.named_modules() if isinstance(m, LinearBase) and ".layers." in n]
    assert layers
    for name in layers:
        layer = floats.get_submodule(name)
        parts = [rtn_quantize(p, 4, GROUP, sym=True) for p in layer.weight.split(layer.output_sizes)]  # q, k, v apart
        assert torch.equal(rounded.get_submodule(name).weight, torch.cat(parts)), name
    llm = LLM(str(out), dtype="float32", max_num_seqs=2, max_model_len=128)
    [res] = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(res.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="no Hessian"):
        quantize_checkpoint(str(tiny_qwen3), str(tmp_path / "x"), group_size=GROUP, desc_act=True, method="rtn")


def test_quantizer_writes_asymmetric_v1_with_zero_points_of_0_as_gptqmodel_does():
    """Our quantizer writes v1 the way GPTQModel does: the packed real zeros minus 0x11111111 as
    one 32-bit subtraction, so a group whose asymmetric zero is 0 (every weight of the group >= 0)
    is stored, borrowing from its neighbour, and reads back exactly. (It used to refuse such a
    group, or clamp its zero to 1 and lose a grid step.)"""
    g = torch.Generator().manual_seed(1)
    K, N = 64, 32
    W = torch.randn(N, K, generator=g)
    W[::3] = W[::3].abs() + 0.05  # rows that never go below 0: min-max puts their zero at 0
    state = GPTQ(W)
    state.add_batch(torch.randn(256, K, generator=g))
    q = state.quantize(bits=4, group_size=32, sym=False, desc_act=False)
    assert int((q.zeros == 0).sum()) > 0
    config = GPTQConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq")
    stored = to_checkpoint_tensors(q, config)
    # GPTQModel's rule, written here as plain int32 arithmetic: word - 0x11111111, wrapping.
    assert torch.equal(stored["qzeros"], as_v1(pack_int32(q.zeros, 4, 1)))
    # Read back at word level (what the loader does), the weights are the quantizer's own.
    again = dequantize_gptq(stored["qweight"], qzeros_v1_to_v2(stored["qzeros"], 4), stored["scales"].float(),
                            stored["g_idx"], 4)
    assert torch.equal(again.t(), q.dequantized)


def test_quantize_checkpoint_v1_asymmetric_round_trip(tiny_qwen3, tmp_path, monkeypatch):
    """End to end: `quantize_checkpoint(..., sym=False, checkpoint_format="gptq")` on a model
    whose q_proj rows are all positive (so zero points of 0 occur) loads to exactly the layers
    of the same quantization written as v2."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv(KERNEL_ENV, "reference")
    src = tmp_path / "float"
    shutil.copytree(tiny_qwen3, src)
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("q_proj.weight")]:
        tensors[name][::2] = tensors[name][::2].abs() + 0.05
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    loaded = {}
    for fmt in ("gptq_v2", "gptq"):
        out = quantize_checkpoint(str(src), str(tmp_path / fmt), group_size=GROUP, sym=False,
                                  checkpoint_format=fmt, num_samples=4, seq_len=32, progress=False)
        loaded[fmt] = load_model(str(out), torch.float32)[0]
    stored = load_file(str(tmp_path / "gptq_v2" / "model.safetensors"))
    zeros = unpack_int32(stored["model.layers.0.self_attn.q_proj.qzeros"], 4, 1)
    assert int((zeros == 0).sum()) > 0
    for (name, a), (_, b) in zip(loaded["gptq_v2"].named_buffers(), loaded["gptq"].named_buffers()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(loaded["gptq_v2"].named_parameters(), loaded["gptq"].named_parameters()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def gptq_checkpoints(tiny_checkpoints, tmp_path_factory):
    """{(arch, name): (gptq path, dequantized float path)} quantized by our quantizer on random
    calibration tokens: "sym" = v1 format, groups of 32; "act" = act-order, asymmetric, v2,
    groups of 32; "g-1" = one group per column (group_size -1)."""
    root = tmp_path_factory.mktemp("gptq")
    made = {}
    settings = {"sym": dict(group_size=GROUP), "act": dict(group_size=GROUP, desc_act=True, sym=False),
                "g-1": dict(group_size=-1)}
    for arch in ARCHS:
        for name, kw in settings.items():
            if arch != "qwen3" and name != "sym":
                continue
            out = quantize_checkpoint(str(tiny_checkpoints[arch]), str(root / f"{arch}-{name}"),
                                      num_samples=8, seq_len=64, progress=False, **kw)
            made[arch, name] = out, dequantize_checkpoint(str(out), str(root / f"{arch}-{name}-deq"))
    return made


def test_checkpoint_has_gptqmodel_layout(gptq_checkpoints, tiny_qwen3):
    path, _ = gptq_checkpoints["qwen3", "sym"]
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
                   "lm_head": False, "checkpoint_format": "gptq", "pack_dtype": "int32"}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qweight = f.get_tensor("model.layers.0.self_attn.k_proj.qweight")
        qzeros = f.get_tensor("model.layers.0.self_attn.k_proj.qzeros")
        scales = f.get_tensor("model.layers.0.self_attn.k_proj.scales")
        g_idx = f.get_tensor("model.layers.0.self_attn.k_proj.g_idx")
    assert "model.layers.0.self_attn.k_proj.weight" not in keys  # no float copy left
    assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (64 // 8, 32))  # [K / 8, N]
    assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (64 // GROUP, 32 // 8))
    assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (64 // GROUP, 32))
    assert torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // GROUP)
    # symmetric v1: every real zero is 8, stored as 7 in each nibble
    assert torch.all(qzeros == 0x77777777)


@pytest.mark.parametrize("name", ["sym", "act", "g-1"])
def test_quantized_model_equals_its_dequantized_float_model(gptq_checkpoints, name, monkeypatch):
    """Same weights, two paths: our GPTQ layers (reference kernel, float32) and plain float layers
    loaded from the dequantized checkpoint. Only float32 summation order may differ."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, deq = gptq_checkpoints["qwen3", name]
    quant = load_model(str(path), torch.float32)[0]
    plain = load_model(str(deq), torch.float32)[0]
    assert quant.quant_config is not None and plain.quant_config is None
    prompts, _ = mixed_prompts(quant.config.vocab_size)
    seqs = [p for p in prompts if len(p) <= 64][:4]
    a = quant.compute_logits(forward_sequences(quant, seqs))
    b = plain.compute_logits(forward_sequences(plain, seqs))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_greedy_tokens_equal_the_dequantized_model(arch, gptq_checkpoints, monkeypatch):
    """Generation through the whole engine (paged KV, chunked prefill: stage 5's flags; stage 07
    itself is the checkpoint's quantization_config) on every architecture."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, deq = gptq_checkpoints[arch, "sym"]
    prompts, _ = mixed_prompts(512)
    prompts = prompts[:4]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for p in (path, deq):
        llm = LLM(str(p), dtype="float32", max_num_seqs=4, max_model_len=256)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outs[0] == outs[1]
    assert len({t for o in outs[0] for t in o}) > 8  # not a degenerate repetition


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
@pytest.mark.parametrize("name", ["sym", "act", "g-1"])
def test_engine_greedy_tokens_on_cpu_int4_panel_equal_the_dequantized_model(name, gptq_checkpoints, monkeypatch):
    """The stage-07 oracle with every GPTQ layer forced onto our int4 kernel (float32, so the
    float model on the dequantized weights is the exact answer up to summation order)."""
    monkeypatch.setenv(KERNEL_ENV, "cpu_int4_panel")
    path, deq = gptq_checkpoints["qwen3", name]
    prompts = mixed_prompts(512)[0][:4]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for p in (path, deq):
        llm = LLM(str(p), dtype="float32", max_num_seqs=4, max_model_len=256)
        if p == path:
            layer = llm.llm_engine.model_runner.model.model.layers[0].self_attn.qkv_proj
            assert layer.quant_method.kernel == "cpu_int4_panel" and hasattr(layer, "int4_panels")
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outs[0] == outs[1]
    assert len({t for o in outs[0] for t in o}) > 8  # not a degenerate repetition


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
def test_engine_picks_cpu_int4_panel_in_both_dtypes_only_with_our_kernels_on(gptq_checkpoints, monkeypatch):
    """custom_ops="all" (the CPU default) loads the model with our kernels on: cpu_int4_panel for
    float32 and bfloat16; custom_ops="none" keeps torch's paths (reference / cpu_int4)."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    path, _ = gptq_checkpoints["qwen3", "act"]
    for dtype, custom_ops, want in (("float32", "all", "cpu_int4_panel"), ("bfloat16", "all", "cpu_int4_panel"),
                                    ("float32", "none", "reference")):
        llm = LLM(str(path), dtype=dtype, max_num_seqs=2, max_model_len=128, custom_ops=custom_ops)
        layer = llm.llm_engine.model_runner.model.model.layers[0].mlp.down_proj
        assert layer.quant_method.kernel == want, (dtype, custom_ops)
        out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(not _panel_ok, reason="folovllm's CPU kernels cannot be built here")
def test_cpu_int4_panel_q8_is_opt_in_and_close_to_the_dequantized_model(gptq_checkpoints, monkeypatch):
    """FOLOVLLM_GPTQ_KERNEL=cpu_int4_panel_q8 puts every GPTQ layer on the int8-activation way
    (never chosen by default: the default is the exact cpu_int4_panel); the model's logits then
    sit within the activations' 8-bit rounding of the dequantized float model (a relative error
    of about 1/254 per layer input), not on it."""
    monkeypatch.setenv(KERNEL_ENV, "cpu_int4_panel_q8")
    path, deq = gptq_checkpoints["qwen3", "sym"]
    fast = load_model(str(path), torch.float32)[0]
    layer = fast.model.layers[0].mlp.down_proj
    assert layer.quant_method.kernel == "cpu_int4_panel_q8" and layer.quant_method.cpu_weight.int8_activations
    plain = load_model(str(deq), torch.float32)[0]
    seqs = [list(range(3, 40))]
    a = fast.compute_logits(forward_sequences(fast, seqs))
    b = plain.compute_logits(forward_sequences(plain, seqs))
    rel = ((a - b).norm() / b.norm()).item()
    assert 1e-6 < rel < 0.05, rel


@pytest.mark.skipif(not cpu_int4_available(), reason="torch has no int4 CPU matmul")
def test_bfloat16_model_uses_cpu_int4_and_stays_close(gptq_checkpoints, monkeypatch):
    """In bfloat16 the layers pick torch's int4 kernel (the checkpoint tensors are replaced by
    its layout); logits stay close to the float32 reference model's."""
    path, deq = gptq_checkpoints["qwen3", "sym"]
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    fast = load_model(str(path), torch.bfloat16)[0]
    layer = fast.model.layers[0].mlp.down_proj
    assert layer.quant_method.kernel == "cpu_int4" and not hasattr(layer, "qweight")
    plain = load_model(str(deq), torch.float32)[0]
    seqs = [list(range(3, 40))]
    a = fast.compute_logits(forward_sequences(fast, seqs))
    b = plain.compute_logits(forward_sequences(plain, seqs))
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 0.05, rel


def test_quantization_error_against_the_float_model(gptq_checkpoints, tiny_qwen3, monkeypatch):
    """The price of 4 bits, measured against the float model: finite, nonzero logit error and
    a perplexity change on held-out tokens (the numbers are in the docs; the random tiny model
    is too chaotic for a quality bound, which the benchmark measures on a trained model)."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, _ = gptq_checkpoints["qwen3", "sym"]
    quant = load_model(str(path), torch.float32)[0]
    plain = load_model(str(tiny_qwen3), torch.float32)[0]
    prompts, _ = mixed_prompts(quant.config.vocab_size, seed=1)
    seqs = [p for p in prompts if len(p) >= 8][:4]
    a = quant.compute_logits(forward_sequences(quant, seqs))
    b = plain.compute_logits(forward_sequences(plain, seqs))
    err = ((a - b).norm() / b.norm()).item()
    assert 0 < err < 1.0, err
    ppl_q, ppl_f = perplexity(quant, seqs), perplexity(plain, seqs)
    assert ppl_q != ppl_f and all(map(torch.isfinite, torch.tensor([ppl_q, ppl_f])))


# -- bytes -----------------------------------------------------------------------------------


def test_weight_bytes_are_about_4x_smaller_than_float16():
    """A Qwen3-0.6B-sized down_proj (3072 -> 1024), groups of 128: 4 bits per weight, plus per
    group and output a float16 scale and a 4-bit zero, plus g_idx: exactly counted."""
    K, N, group = 3072, 1024, 128
    quant = RowParallelLinear(K, N, quant_config=GPTQConfig(group_size=group), params_dtype=torch.float16)
    plain = RowParallelLinear(K, N, params_dtype=torch.float16)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))  # noqa: E731
    groups = K // group
    assert nbytes(quant) == K * N // 2 + groups * N * 2 + groups * N // 2 + K * 4
    assert nbytes(plain) == K * N * 2
    assert nbytes(plain) / nbytes(quant) > 3.5


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("change,match", [
    ({"bits": 3}, r"GPTQ bits=3 is not supported"),
    ({"lm_head": True}, r"GPTQ lm_head=True .*quantized lm_head is not supported"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not supported"),
    ({"desc_act": "false"}, r"GPTQ desc_act='false' .*must be true or false"),  # bool() would say True
    ({"sym": None}, r"GPTQ sym=None .*must be true or false"),
    ({"group_size": "128"}, r"GPTQ group_size='128' .*must be an integer"),
    ({"group_size": 48}, r"GPTQ group_size=48 does not divide the 64 inputs of model.layers.0.self_attn.qkv_proj"),
    ({"group_size": 0}, r"group_size must be -1 or a positive integer"),
    ({"dynamic": {"-:.*mlp.*": {}}}, r"GPTQ dynamic=.* per-module overrides"),
    ({"quant_method": "awq"}, r"quant_method='awq' .* is not supported; supported: \('gptq', 'compressed-tensors'\)"),
])
def test_loader_refuses_unsupported_settings_naming_the_field(gptq_checkpoints, tmp_path, change, match):
    path, _ = gptq_checkpoints["qwen3", "sym"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_model(str(bad), torch.float32)


def test_quantize_config_json_alone_is_read(gptq_checkpoints, tmp_path, monkeypatch):
    """Older AutoGPTQ exports keep the settings in quantize_config.json only (no quant_method)."""
    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, _ = gptq_checkpoints["qwen3", "sym"]
    old = tmp_path / "old"
    shutil.copytree(path, old)
    cfg = json.loads((old / "config.json").read_text())
    settings = cfg.pop("quantization_config")
    settings.pop("quant_method")
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "quantize_config.json").write_text(json.dumps(settings))
    model = load_model(str(old), torch.float32)[0]
    assert model.quant_config == GPTQConfig(group_size=GROUP)


def test_mismatched_act_order_across_fused_parts_is_refused(gptq_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = gptq_checkpoints["qwen3", "sym"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.self_attn.v_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="g_idx of shard .* differs"):
        load_model(str(bad), torch.float32)


def test_quantization_gptq_insists_on_a_gptq_checkpoint(tiny_qwen3):
    with pytest.raises(ValueError, match=r"quantization='gptq' but .* is not a quantized checkpoint"):
        load_model(str(tiny_qwen3), torch.float32, quantization="gptq")
    with pytest.raises(ValueError, match=r"quantization must be None .*, 'gptq' or 'compressed-tensors', got 'awq'"):
        EngineConfig.for_stage(1, quantization="awq")
    assert EngineConfig.for_stage(1, quantization="gptq").quantization == "gptq"


def test_quantizer_refuses_group_size_that_does_not_divide(tiny_qwen3, tmp_path):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the 64 inputs of"):
        quantize_checkpoint(str(tiny_qwen3), str(tmp_path / "x"), group_size=48, num_samples=1, seq_len=8,
                            progress=False)


def test_linear_layers_all_quantized(gptq_checkpoints, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "reference")
    model = load_model(str(gptq_checkpoints["qwen3", "act"][0]), torch.float32)[0]
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 4 * model.config.num_hidden_layers
    assert all(type(m.quant_method).__name__ == "GPTQLinearMethod" for m in linears)
    g = linears[0].g_idx.long()
    assert not torch.equal(g, torch.sort(g).values), "act-order g_idx should not be in order"
    assert torch.equal(torch.bincount(g), torch.full((64 // GROUP,), GROUP))
    cfg = json.loads((gptq_checkpoints["qwen3", "act"][0] / "config.json").read_text())["quantization_config"]
    assert (cfg["desc_act"], cfg["sym"], cfg["checkpoint_format"]) == (True, False, "gptq_v2")


def test_cli_quantize_writes_a_checkpoint_the_engine_runs(tiny_qwen3, tmp_path, capsys):
    """`folovllm quantize` with a calibration text file, then generation from the result in
    bfloat16 (the cpu_int4 kernel) through the whole engine."""
    from folovllm.entrypoints.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("the engine schedules requests every step and the cache keeps keys and values " * 40)
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_qwen3), str(out), "--group-size", "32", "--desc-act",
               "--calibration", str(text), "--num-samples", "4", "--seq-len", "32"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    cfg = json.loads((out / "quantize_config.json").read_text())
    assert (cfg["group_size"], cfg["desc_act"]) == (32, True)
    llm = LLM(str(out), dtype="bfloat16", max_num_seqs=2, max_model_len=128)
    [res] = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(res.outputs[0].token_ids) == 8
    assert main(["quantize", str(tiny_qwen3), str(tmp_path / "x"), "--calibration", str(tmp_path / "none.txt")]) == 2



def test_all_zero_bias_of_autogptq_exports_is_skipped(gptq_checkpoints, tmp_path, monkeypatch):
    """AutoGPTQ writes a `bias` for every quantized layer, all zeros where the model has none
    (Qwen3 has none): the loader skips it, as vLLM does; a float checkpoint still refuses it."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv(KERNEL_ENV, "reference")
    path, deq = gptq_checkpoints["qwen3", "sym"]
    for src, quantized in ((path, True), (deq, False)):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        save_file(tensors, str(dst / "model.safetensors"))
        if quantized:
            a = load_model(str(dst), torch.float32)[0]
            b = load_model(str(path), torch.float32)[0]
            seqs = [list(range(3, 20))]
            assert torch.equal(a.compute_logits(forward_sequences(a, seqs)), b.compute_logits(forward_sequences(b, seqs)))
        else:
            with pytest.raises(ValueError, match="has no matching parameter"):
                load_model(str(dst), torch.float32)


def test_engine_quantization_gptq_refuses_a_float_checkpoint(tiny_qwen3):
    """`LLM(..., quantization="gptq")` reaches the loader: a float checkpoint is refused."""
    import pytest as _pytest

    from folovllm import LLM

    with _pytest.raises(ValueError, match="gptq"):
        LLM(str(tiny_qwen3), stage=3, dtype="float32", max_model_len=64, quantization="gptq")
