"""Our compiled CPU kernels (`folovllm/csrc/cpu`) against the torch code they replace.

Each `CustomOp` layer has `forward_native` (torch, the reference) and `forward_cpu` (the
kernel); `EngineConfig.custom_ops` chooses. Here each kernel is run beside its reference on
random inputs of the shapes the engine gives it (strided views into the qkv projection, odd
sizes, GQA, blocks in random order, float32 and bfloat16, one and two threads), and the
end-to-end choice is checked: both settings give HF's greedy tokens (tests/test_every_stage.py
runs the default, this file the torch path), and "auto" really switches the layers.
"""

from __future__ import annotations

import logging

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm import _custom_ops
from folovllm.config import EngineConfig
from folovllm.model_executor.custom_op import CustomOp, set_custom_ops
from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm.model_executor.layers.attention import naive_attention
from folovllm.model_executor.layers.layernorm import RMSNorm
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from tests.attention_utils import Batch, random_paged_batch
from tests.helpers import ARCHS

# Where the kernels cannot be built (no gcc or ninja, not Linux x86-64) there is nothing to test
# here; CI builds them (.ci/run installs ninja with the package and the machine has gcc).
pytestmark = pytest.mark.skipif(not _custom_ops.ops_available(), reason="the CPU kernels cannot be built here")

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16"])


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def both(layer: CustomOp, *args):
    """(kernel result, torch result) of one layer on the same inputs (cloned: kernels work in place)."""
    native = layer.forward_native(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    kernel = layer.forward_cpu(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    return kernel, native


@DTYPES
@pytest.mark.parametrize("tokens,hidden", [(1, 512), (7, 1024), (33, 100)])
def test_rms_norm_and_fused_add(dtype, tokens, hidden, threads):
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden) + 0.5)
    x, residual = torch.randn(tokens, hidden, dtype=dtype), torch.randn(tokens, hidden, dtype=dtype)
    kernel, native = both(norm, x)
    torch.testing.assert_close(kernel, native, **TOL[dtype])
    (k_out, k_res), (n_out, n_res) = both(norm, x, residual)
    torch.testing.assert_close(k_res, n_res, atol=0, rtol=0)  # the add is exact
    torch.testing.assert_close(k_out, n_out, **TOL[dtype])


@DTYPES
def test_rms_norm_on_heads_of_a_strided_view(dtype):
    """Qwen3's q/k norm: per-head rows of a view into the qkv output (not contiguous)."""
    T, hq, hkv, d = 5, 4, 2, 64
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(T, hq, d)
    assert not q.is_contiguous()
    norm = RMSNorm(d).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) + 0.5)
    kernel, native = both(norm, q)
    torch.testing.assert_close(kernel, native, **TOL[dtype])


@DTYPES
def test_rotary_embedding_in_place_on_views(dtype, threads):
    T, hq, hkv, d = 9, 4, 2, 64
    rope = RotaryEmbedding(d, max_position=512, rope_theta=1e6)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    positions = torch.tensor([0, 1, 2, 100, 101, 7, 511, 3, 4])
    (kq, kk), (nq, nk) = both(rope, positions, q, k)
    torch.testing.assert_close(kq, nq, **TOL[dtype])
    torch.testing.assert_close(kk, nk, **TOL[dtype])
    before = qkv.clone()
    rope.forward_cpu(positions, q, k)  # in place: the qkv buffer's q and k columns change
    assert not torch.equal(qkv[:, : (hq + hkv) * d], before[:, : (hq + hkv) * d])
    assert torch.equal(qkv[:, (hq + hkv) * d :], before[:, (hq + hkv) * d :])  # v untouched


@DTYPES
@pytest.mark.parametrize("tokens,inter", [(1, 1536), (16, 3072), (3, 77)])
def test_silu_and_mul(dtype, tokens, inter, threads):
    x = torch.randn(tokens, 2 * inter, dtype=dtype) * 4
    kernel, native = both(SiluAndMul(), x)
    torch.testing.assert_close(kernel, native, **TOL[dtype])


# (heads, kv_heads, head_dim, block_size); context lengths around block edges, 1 and long
@pytest.mark.parametrize("shape", [(4, 4, 64, 16), (8, 2, 64, 32), (16, 8, 128, 16), (4, 1, 96, 8)],
                         ids=lambda s: "H{}-{}_D{}_bs{}".format(*s))
@DTYPES
def test_paged_decode_attention_equals_naive(shape, dtype, threads):
    heads, kv_heads, head_dim, block_size = shape
    seq_lens = (1, 15, 16, 17, 33, 200, 64, 5)
    batch = Batch((1,) * len(seq_lens), seq_lens, heads, kv_heads, head_dim, block_size)
    q, key_cache, value_cache, md = random_paged_batch(batch, dtype, seed=sum(shape))
    rows = torch.arange(len(seq_lens))
    out = torch.zeros_like(q)
    _custom_ops.load_ops().paged_attention_decode(
        out, q, key_cache, value_cache, rows, md.block_tables.long(), md.seq_lens.long(), head_dim**-0.5
    )
    ref = naive_attention(q.float(), key_cache.float(), value_cache.float(), md, head_dim**-0.5)
    # the unowned slots hold 100.0: reading past a sequence's length would show
    torch.testing.assert_close(out.float(), ref, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else TOL[dtype]))


# (query_len, seq_len): a whole prompt, a chunk over cached context (stages 05/06), one query,
# lengths off the 32-key tiles, the 16-row panels (8 on AVX2 for a last panel of one vector) and
# the 192-row work items. O += P.V takes 4 or 8 head dims per micro-kernel call: 64/128/96/80
# are whole calls, 70 ends with dims one at a time.
@pytest.mark.parametrize("lens", [(200, 200), (37, 300), (1, 40), (130, 131)], ids=str)
@pytest.mark.parametrize("shape", [(8, 2, 64, 16), (4, 4, 128, 32), (6, 3, 96, 16), (4, 2, 80, 16),
                                   (4, 2, 70, 16)],
                         ids=lambda s: "H{}-{}_D{}_bs{}".format(*s))
@DTYPES
def test_paged_prefill_attention_equals_naive(lens, shape, dtype, threads):
    heads, kv_heads, head_dim, block_size = shape
    batch = Batch((lens[0],), (lens[1],), heads, kv_heads, head_dim, block_size)
    q, key_cache, value_cache, md = random_paged_batch(batch, dtype, seed=lens[1])
    out = torch.zeros_like(q)
    _custom_ops.load_ops().paged_attention_prefill(
        out, q, key_cache, value_cache, md.block_tables[0].long(), lens[1], head_dim**-0.5
    )
    ref = naive_attention(q.float(), key_cache.float(), value_cache.float(), md, head_dim**-0.5)
    torch.testing.assert_close(out.float(), ref, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else TOL[dtype]))


def test_paged_prefill_attention_with_peaked_scores_equals_naive():
    """Queries 30x larger: each row's softmax is nearly one-hot, its running max jumps by tens
    from tile to tile (O and l rescaled by factors near 0) and most exp arguments fall below
    -87, where the kernel's exp stops at e^-87 instead of 0."""
    batch = Batch((300,), (300,), 16, 8, 128, 16)
    q, key_cache, value_cache, md = random_paged_batch(batch, torch.float32, seed=3)
    q = q * 30
    out = torch.zeros_like(q)
    _custom_ops.load_ops().paged_attention_prefill(
        out, q, key_cache, value_cache, md.block_tables[0].long(), 300, 128**-0.5
    )
    ref = naive_attention(q, key_cache, value_cache, md, 128**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_refuses_a_length_past_its_table():
    batch = Batch((1, 1), (10, 20), 4, 2, 64, 16)
    q, key_cache, value_cache, md = random_paged_batch(batch)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        _custom_ops.load_ops().paged_attention_decode(
            torch.empty_like(q), q, key_cache, value_cache, torch.arange(2),
            md.block_tables.long(), torch.tensor([10, 10_000]), 0.125,
        )


# -- the switch ---------------------------------------------------------------------------------

def test_auto_resolves_to_the_kernels_on_cpu_and_switches_every_layer(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), stage=6, dtype="float32")
    assert llm.llm_engine.config.custom_ops == "all"
    model = llm.llm_engine.model_executor.worker.model
    ops = [m for m in model.modules() if isinstance(m, CustomOp)]
    # 2 norms + q/k norms per layer, the final norm, one activation per layer, the shared rope
    layers = len(model.model.layers)
    assert len(ops) == 5 * layers + 2
    assert all(op._forward_method == op.forward_cpu for op in ops)
    assert set_custom_ops(model, "none") == 0
    assert all(op._forward_method == op.forward_native for op in ops)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_path_still_equals_hf(arch, greedy_reference):
    """custom_ops='none' (the readable path) gives HF's tokens too; tests/test_every_stage.py
    checks the default (the kernels) at every stage."""
    ref = greedy_reference(arch)
    llm = LLM(str(ref.path), stage=6, dtype="float32", max_num_seqs=3, max_model_len=256,
              custom_ops="none")
    assert llm.llm_engine.config.attention_backend == "sdpa"
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref.max_tokens]
    outputs = llm.generate(ref.prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == ref.outputs


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_kernels_refuse_a_block_id_outside_the_cache(kernel):
    batch = Batch((1,) if kernel == "decode" else (20,), (20,), 4, 2, 64, 16)
    q, key_cache, value_cache, md = random_paged_batch(batch)
    tables = md.block_tables.long().clone()
    tables[0, 1] = key_cache.shape[0]  # one past the last block
    ops = _custom_ops.load_ops()
    with pytest.raises(RuntimeError, match="is not in the cache"):
        if kernel == "decode":
            ops.paged_attention_decode(torch.empty_like(q), q, key_cache, value_cache,
                                       torch.arange(1), tables, md.seq_lens.long(), 0.125)
        else:
            ops.paged_attention_prefill(torch.empty_like(q), q, key_cache, value_cache, tables[0], 20, 0.125)


def test_bad_values_and_a_failed_build_are_explained(monkeypatch, caplog):
    with pytest.raises(ValueError, match="custom_ops must be 'auto', 'all' or 'none'"):
        EngineConfig.for_stage(4, custom_ops="fast")
    # A machine where the kernels cannot be built: "auto" falls back to torch and says so,
    # "all" (or asking for cpu_attn) refuses, giving the reason.
    monkeypatch.setattr(_custom_ops, "_ops", None)
    monkeypatch.setattr(_custom_ops, "_build_error", "folovllm's CPU kernels could not be built: no gcc")
    with caplog.at_level(logging.WARNING):
        config = EngineConfig.for_stage(4).resolve(1024)
    assert (config.custom_ops, config.attention_backend) == ("none", "sdpa")
    assert "no gcc" in caplog.text
    for kwargs in ({"custom_ops": "all"}, {"attention_backend": "cpu_attn"}):
        with pytest.raises(ValueError, match="no gcc"):
            EngineConfig.for_stage(4, **kwargs).resolve(1024)
