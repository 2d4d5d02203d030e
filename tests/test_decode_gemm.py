"""The streaming linear kernel (`decode_linear`, csrc/cpu/decode_gemm.cpp) and how cpu_gemm.py
picks it: against `F.linear` in float64 on random shapes (1-16 rows and the tile remainders past
them, odd in/out sizes, with and without bias; float32, and bfloat16 on bf16-rounded inputs), a
row's result independent of the number of rows and threads, the layout round trip, the measured
table's choice, greedy tokens = HF end to end with every linear on the kernel (float32), and =
the plain torch path's in bfloat16; the many-panel float32 paths (one row's lockstep panels,
2-16 rows' k-blocked groups) at 1 and 2 threads; roofline's `stream_read`.

Run on both ISA paths (CI does): `FOLOVLLM_CPU_ISA=avx2 pytest tests/test_decode_gemm.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from folovllm import LLM, SamplingParams
from folovllm._custom_ops import load_ops, ops_available
from folovllm.model_executor.layers import cpu_gemm
from folovllm.model_executor.layers.linear import LinearBase, MergedColumnParallelLinear
from folovllm.model_executor.model_loader import load_model

pytestmark = pytest.mark.skipif(not ops_available(), reason="the CPU kernels cannot be built here")

SHAPES = [(1, 1), (19, 37), (96, 200), (64, 33), (131, 65), (512, 97)]  # (in, out): odd, < and > a panel


@pytest.mark.parametrize("k_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear(k_in, n_out, bias):
    ops = load_ops()
    g = torch.Generator().manual_seed(k_in * 1000 + n_out)
    w, b = torch.randn(n_out, k_in, generator=g), torch.randn(n_out, generator=g)
    panels = ops.pack_decode_weight(w)
    assert panels.shape == ((n_out + 31) // 32, k_in, 32)
    for rows in (*range(1, 17), 23, 40):  # every decode row count, then past one tile of rows
        x = torch.randn(rows, k_in, generator=g)
        y = ops.decode_linear(x, panels, n_out, b if bias else None)
        ref = F.linear(x.double(), w.double(), b.double() if bias else None)
        assert y.shape == (rows, n_out)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * k_in**0.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_streaming_paths_on_many_panels_equal_f_linear(threads):
    """Enough panels for every path of the float32 decode loops: one row 3 (AVX2) / 6 (AVX-512)
    panels in lockstep and the rest one by one, 2-16 rows in groups of 3 panels and blocks of
    32 k (K = 200: a partial last block; N = 1,000: a partial last panel), each thread its own
    range of panels; and prefill (> 16 rows) on whole panels."""
    ops = load_ops()
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(1000, 200, generator=g), torch.randn(1000, generator=g)
    panels = ops.pack_decode_weight(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for rows in (*range(1, 18), 33):
            x = torch.randn(rows, 200, generator=g)
            ref = F.linear(x.double(), w.double(), b.double())
            torch.testing.assert_close(ops.decode_linear(x, panels, 1000, b).double(), ref, rtol=1e-5, atol=1e-4 * 200**0.5)
    finally:
        torch.set_num_threads(before)


def test_stream_read_sums_the_buffer_as_1_to_4_streams():
    """benchmarks/roofline.py's best-case read: it must read (and add) every element, whole
    spans of side-by-side streams and the tail past them alike."""
    ops = load_ops()
    x = torch.rand(3 * 32 * 1024 * 4 + 1000, generator=torch.Generator().manual_seed(0))  # 4.5 spans of 3
    for streams in (1, 2, 3, 4):
        assert ops.stream_read(x, streams) == pytest.approx(x.double().sum().item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="1-4 streams"):
        ops.stream_read(x, 5)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.stream_read(x.double(), 1)


@pytest.mark.parametrize("k_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_decode_linear_equals_f_linear_on_bf16_inputs(k_in, n_out, bias):
    """bf16 panels (pairs of k; vdpbf16ps or the widening path): float32 accumulation, one
    rounding to bf16 at the end, so within half a bf16 ulp (2^-9 relative) of the exact float64
    product of the same bf16 numbers, plus float32's summation error. A wrong pair order, a
    dropped odd k or a bf16 accumulator is off by far more."""
    ops = load_ops()
    g = torch.Generator().manual_seed(k_in * 1000 + n_out + 1)
    w, b = torch.randn(n_out, k_in, generator=g).bfloat16(), torch.randn(n_out, generator=g).bfloat16()
    panels = ops.pack_decode_weight(w)
    assert panels.shape == ((n_out + 31) // 32, (k_in + 1) // 2, 64) and panels.dtype == torch.bfloat16
    for rows in (*range(1, 17), 23, 40):
        x = torch.randn(rows, k_in, generator=g).bfloat16()
        y = ops.decode_linear(x, panels, n_out, b if bias else None)
        ref = F.linear(x.double(), w.double(), b.double() if bias else None)
        assert y.shape == (rows, n_out) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), ref, rtol=2.0**-8, atol=1e-5 * k_in**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_bitwise_the_same_in_any_batch_and_at_any_thread_count(dtype):
    """What batch-invariant mode relies on (folovllm/batch_invariant.py): each output is one
    thread's, summed in k order, whatever tile its row falls in and whichever loop runs the call
    (float32: one row's lockstep panels, 2-16 rows' k-blocked groups, prefill's whole panels)."""
    ops = load_ops()
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 201, generator=g).to(dtype), torch.randn(40, 201, generator=g).to(dtype)
    panels = ops.pack_decode_weight(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([ops.decode_linear(x[i:i + 1], panels, 300) for i in range(len(x))])
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in (*range(1, 18), 40):
                assert torch.equal(ops.decode_linear(x[:m], panels, 300), alone[:m]), (threads, m)
    finally:
        torch.set_num_threads(before)


def test_bad_input_is_refused_with_a_reason():
    ops = load_ops()
    panels = ops.pack_decode_weight(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        ops.decode_linear(torch.randn(2, 16, dtype=torch.float64), panels, 40)
    with pytest.raises(RuntimeError, match="x and weight alike"):
        ops.decode_linear(torch.randn(2, 16).bfloat16(), panels, 40)
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\]"):
        ops.decode_linear(torch.randn(2, 15), panels, 40)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.decode_linear(torch.randn(2, 16), panels, 100)


def test_pack_linear_weight_stores_panels_and_the_layer_still_computes_f_linear(monkeypatch):
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "decode")
    layer = MergedColumnParallelLinear(80, [48, 51], bias=True, params_dtype=torch.float32)
    w, b = torch.randn(99, 80), torch.randn(99)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    with cpu_gemm.weight_packing(True):
        layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.shape == (4, 80, 32) and layer.weight.out_features == 99
    assert torch.equal(cpu_gemm.unpack_weight(layer.weight), w)
    for rows in (1, 2, 5, 16, 33):
        x = torch.randn(rows, 80)
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    with torch.inference_mode():  # a 3-D input goes through as [..., in]
        assert layer(torch.randn(2, 3, 80)).shape == (2, 3, 99)


def test_bf16_layer_stores_pair_panels_and_still_computes_f_linear(monkeypatch):
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "decode")
    layer = MergedColumnParallelLinear(81, [48, 51], bias=False, params_dtype=torch.bfloat16)
    w = torch.randn(99, 81).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(w)
    with cpu_gemm.weight_packing(True):
        layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.shape == (4, 41, 64) and cpu_gemm.logical_shape(layer.weight) == (99, 81)
    assert torch.equal(cpu_gemm.unpack_weight(layer.weight), w)
    for rows in (1, 5, 16):
        x = torch.randn(rows, 81).bfloat16()
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y.double(), F.linear(x.double(), w.double()), rtol=2.0**-8, atol=1e-4)


def test_choose_gemm_reads_the_dtypes_own_rows(monkeypatch):
    table = {cpu_gemm.kernel_isa(): [dict(name="s", **{"in": 512, "out": 512}, ms={}, gemm="onednn")],
             cpu_gemm.kernel_isa() + "-bf16": [dict(name="s", **{"in": 512, "out": 512}, ms={}, gemm="decode")]}
    monkeypatch.setattr(cpu_gemm, "_table", lambda: table)
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "auto")
    assert cpu_gemm.choose_gemm(512, 512) == "onednn"
    assert cpu_gemm.choose_gemm(512, 512, dtype=torch.bfloat16) == "decode"


def test_choose_gemm_follows_the_switch_and_the_nearest_measured_shape(monkeypatch):
    rows = [dict(name="small", **{"in": 512, "out": 512}, ms={}, gemm="decode"),
            dict(name="big", **{"in": 1024, "out": 151936}, ms={}, gemm="onednn")]
    monkeypatch.setattr(cpu_gemm, "_table", lambda: {cpu_gemm.kernel_isa(): rows})
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "auto")
    assert cpu_gemm.choose_gemm(1024, 512) == "decode"  # nearer 512 x 512
    assert cpu_gemm.choose_gemm(100000, 1024) == "onednn"  # nearer the LM head
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "decode")
    assert cpu_gemm.choose_gemm(100000, 1024) == "decode"
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "onednn")
    assert cpu_gemm.choose_gemm(1024, 512) == "onednn"
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="FOLOVLLM_CPU_GEMM must be one of auto, decode, onednn"):
        cpu_gemm.choose_gemm(1024, 512)


def test_table_choice_rule():
    fast = dict(ms={"1": [1.0, 2.0], "16": [3.0, 3.0], "512": [10.5, 10.0]})
    assert cpu_gemm.table_choice(fast) == "decode"
    slower_decode = dict(ms={"1": [1.0, 2.0], "16": [3.1, 3.0], "512": [9.0, 10.0]})
    assert cpu_gemm.table_choice(slower_decode) == "onednn"
    slower_prefill = dict(ms={"1": [1.0, 2.0], "512": [10.0 * cpu_gemm.PREFILL_SLACK + 0.1, 10.0]})
    assert cpu_gemm.table_choice(slower_prefill) == "onednn"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_committed_table_has_a_row_per_measured_shape_on_this_isa(dtype):
    table = cpu_gemm._table()
    rows = table.get(cpu_gemm.table_key(dtype), [])
    assert rows, f"cpu_gemm_table.json has no rows for {cpu_gemm.table_key(dtype)}"
    assert all(r["gemm"] == cpu_gemm.table_choice(r) for r in rows)


def test_greedy_tokens_equal_hf_with_every_linear_on_the_kernel(monkeypatch, greedy_reference):
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "decode")
    ref = greedy_reference("qwen3")
    llm = LLM(str(ref.path), dtype="float32", max_model_len=256, custom_ops="all")
    model = llm.llm_engine.model_runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight.dim() == 3 for m in linears) and model.lm_head.weight.dim() == 3
    outs = llm.generate([dict(prompt_token_ids=p) for p in ref.prompts],
                        [SamplingParams(temperature=0.0, max_tokens=m) for m in ref.max_tokens])
    assert [list(o.outputs[0].token_ids) for o in outs] == ref.outputs


def test_bf16_greedy_tokens_with_every_linear_on_the_kernel_equal_the_torch_paths(monkeypatch, tiny_qwen3):
    """bf16 end to end: the panels (and our other kernels), SDPA attention, give exactly the
    plain torch path's greedy tokens (`F.linear` in bf16: float32 accumulation, one rounding).
    Both drift from HF's bf16 `generate` after the same few tokens (HF rounds RoPE and norms
    differently in bf16), which is why the oracle here is the torch path, as in
    tests/test_cpu_isa.py."""
    prompts = [dict(prompt_token_ids=p) for p in ([5, 17, 42, 9], [300, 2, 77], list(range(3, 40)))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "decode")
    llm = LLM(str(tiny_qwen3), dtype="bfloat16", max_model_len=256, custom_ops="all", attention_backend="sdpa")
    model = llm.llm_engine.model_runner.model
    assert all(m.weight.dim() == 3 and m.weight.dtype == torch.bfloat16
               for m in [*[m for m in model.modules() if isinstance(m, LinearBase)], model.lm_head])
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    plain = LLM(str(tiny_qwen3), dtype="bfloat16", max_model_len=256, custom_ops="none", attention_backend="sdpa")
    assert ours == [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params)]
    assert len({t for ids in ours for t in ids}) > 10  # not one token repeated: a real comparison


def test_a_tied_lm_head_gets_panels_and_the_embedding_stays_plain(monkeypatch, tiny_qwen3):
    monkeypatch.setenv("FOLOVLLM_CPU_GEMM", "decode")
    plain = load_model(str(tiny_qwen3), torch.float32)[0]
    with cpu_gemm.weight_packing(True):
        model = load_model(str(tiny_qwen3), torch.float32)[0]
    embedding = model.model.embed_tokens.weight
    assert embedding.dim() == 2 and torch.equal(embedding, plain.model.embed_tokens.weight)
    assert torch.equal(cpu_gemm.unpack_weight(model.lm_head.weight), embedding)
