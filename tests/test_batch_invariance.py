"""Batch-invariant mode (folovllm/batch_invariant.py, docs/logprobs.md#batch-invariance).

Two levels:

- the engine: a seeded request (temperature 0.8, logprobs=5) gives bitwise the same tokens and
  log-probabilities alone, in a batch of 15 others of other lengths, chunked at a 13-token budget
  (a one-token chunk included), with its prefix cached, at 1 and 2 threads; and prompt + output
  scored again with prompt_logprobs (the RL check) gives bitwise the sampled log-probabilities.
  Without the mode (float32, measured in docs/logprobs.md) the one-token chunk and the RL check
  differ (~3e-6): `test_default_path_varies_where_the_mode_differs` keeps that claim honest, and
  the mode's test fails, in float32 and in bfloat16, if `BatchInvariant` hands back the plain
  backend. The other situations (batch of 16, prefix cached, 2 threads) were invariant on the
  default path already.
- the kernels the mode keeps as they are, each checked for the property the mode relies on: a
  row's result does not depend on how many rows share the call or on the thread count (oneDNN's
  linears, RMSNorm, log_softmax/softmax), and the prefill attention kernel's result for a query
  does not depend on the chunk it came in.

Run on both ISA paths: `FOLOVLLM_CPU_ISA=avx2 pytest tests/test_batch_invariance.py`.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm._custom_ops import load_ops, ops_available
from folovllm.model_executor.layers import cpu_gemm

pytestmark = pytest.mark.skipif(not ops_available(), reason="the CPU kernels cannot be built here")

_rng = random.Random(3303)
TARGET = [_rng.randrange(500) for _ in range(27)]  # chunks of 13: 13 + 13 + 1 (a one-token chunk)
OTHERS = [[_rng.randrange(500) for _ in range(n)] for n in (1, 3, 5, 8, 11, 17, 23, 31, 40, 47, 55, 64, 70, 90, 120)]
TARGET_PARAMS = SamplingParams(temperature=0.8, seed=1234, max_tokens=20, ignore_eos=True, logprobs=5)
OTHER_PARAMS = [SamplingParams(temperature=0.8, seed=i, max_tokens=5 + 3 * i, ignore_eos=True) for i in range(15)]


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def logprob_tensor(dicts: list[dict], token_ids: list[int]) -> torch.Tensor:
    """[tokens, 6]: per position the scored token's log-probability, then the top 5 by rank."""
    return torch.tensor([[d[t].logprob] + [lp.logprob for lp in sorted(d.values(), key=lambda lp: lp.rank)][:5]
                         for t, d in zip(token_ids, dicts)])


def situations(path: str, dtype: str, batch_invariant: bool) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """The target alone, then in each situation; and the RL check's prompt log-probabilities of
    the generated positions ([tokens, 6], from prompt_logprobs=5)."""
    def engine(**kw: Any) -> LLM:
        return LLM(path, stage=6, dtype=dtype, max_model_len=256, batch_invariant=batch_invariant, **kw)

    def alone(llm: LLM) -> Any:
        return llm.generate([TARGET], TARGET_PARAMS, use_tqdm=False)[0].outputs[0]

    with num_threads(1):
        llm = engine()
        reference = alone(llm)
        runs = {}
        hits = llm.stats.prefix_cache.hits
        runs["prefix cached"] = alone(llm)
        assert llm.stats.prefix_cache.hits > hits
        batch = llm.generate([*OTHERS[:7], TARGET, *OTHERS[7:]], [*OTHER_PARAMS[:7], TARGET_PARAMS, *OTHER_PARAMS[7:]],
                             use_tqdm=False)
        runs["in a batch of 16"] = batch[7].outputs[0]
        runs["chunked, budget 13 (13 + 13 + 1)"] = alone(engine(max_num_batched_tokens=13, max_num_seqs=13))
        rescored = llm.generate([TARGET + reference.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=5),
                                use_tqdm=False)[0]
        rl = logprob_tensor(rescored.prompt_logprobs[len(TARGET):], reference.token_ids)
    with num_threads(2):
        runs["2 threads"] = alone(engine())
    return reference, runs, rl


# -- the engine ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_invariant_mode_is_bitwise(tiny_qwen3, dtype):
    reference, runs, rl = situations(str(tiny_qwen3), dtype, batch_invariant=True)
    expected = logprob_tensor(reference.logprobs, reference.token_ids)
    assert len(set(reference.token_ids)) > 10  # a real sampled sequence, not one token repeated
    for name, run in runs.items():
        assert run.token_ids == reference.token_ids, name
        assert torch.equal(logprob_tensor(run.logprobs, run.token_ids), expected), name
    # the RL check: the trainer's prefill gives the sampler's numbers, bitwise
    assert torch.equal(rl, expected)


def test_default_path_varies_where_the_mode_differs(tiny_qwen3):
    """Float32 without the mode: the one-token chunk and the RL check use the decode kernel in
    one run and the prefill kernel in the other, and differ by a few float32 roundings (what
    the mode removes; the numbers docs/logprobs.md quotes). If this starts failing, the default
    path became invariant: update the page."""
    reference, runs, rl = situations(str(tiny_qwen3), "float32", batch_invariant=False)
    expected = logprob_tensor(reference.logprobs, reference.token_ids)
    for name in ("prefix cached", "in a batch of 16", "2 threads"):  # invariant already
        assert torch.equal(logprob_tensor(runs[name].logprobs, runs[name].token_ids), expected), name
    chunked = runs["chunked, budget 13 (13 + 13 + 1)"]
    for got in (logprob_tensor(chunked.logprobs, chunked.token_ids), rl):
        assert not torch.equal(got, expected)
        assert (got - expected).abs().max() < 1e-4


# -- the switch -----------------------------------------------------------------------------------

def test_the_switch_from_the_environment_and_the_cli(monkeypatch):
    from folovllm.entrypoints.cli import _engine_kwargs, build_parser

    monkeypatch.setenv("FOLOVLLM_BATCH_INVARIANT", "1")
    assert EngineConfig.for_stage(6).batch_invariant
    assert not EngineConfig.for_stage(6, batch_invariant=False).batch_invariant
    monkeypatch.setenv("FOLOVLLM_BATCH_INVARIANT", "yes")
    with pytest.raises(ValueError, match="FOLOVLLM_BATCH_INVARIANT must be 0 or 1"):
        EngineConfig.for_stage(6)
    monkeypatch.delenv("FOLOVLLM_BATCH_INVARIANT")
    assert not EngineConfig.for_stage(6).batch_invariant
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--batch-invariant"])
    assert _engine_kwargs(args)["batch_invariant"] is True
    args = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert "batch_invariant" not in _engine_kwargs(args)


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_backend="sdpa"), "needs attention_backend 'auto' or 'cpu_attn'"),
    (dict(custom_ops="none"), "needs custom_ops 'auto' or 'all'"),
    (dict(stage=3), "needs attention_backend 'auto' or 'cpu_attn'"),  # stages 01-03: naive attention
    (dict(tensor_parallel_size=2), "tensor_parallel_size=1 only"),
])
def test_the_mode_refuses_kernels_it_has_not_checked(overrides, message):
    stage = overrides.pop("stage", 6)
    with pytest.raises(ValueError, match=f"batch_invariant=True .*{message}"):
        EngineConfig.for_stage(stage, batch_invariant=True, **overrides)
    EngineConfig.for_stage(stage, batch_invariant=False, **overrides)  # fine without the mode


def test_the_worker_picks_the_backend_once(tiny_qwen3):
    from folovllm.config import describe_engine
    from folovllm.model_executor.attention_backends.cpu_attn import CPUAttentionBackend
    from folovllm.model_executor.attention_backends.cpu_attn_invariant import BatchInvariantCPUAttentionBackend

    with num_threads(1):
        on = LLM(str(tiny_qwen3), dtype="float32", max_model_len=64, batch_invariant=True).llm_engine
        off = LLM(str(tiny_qwen3), dtype="float32", max_model_len=64).llm_engine
    backend = lambda engine: engine.model_executor.worker.model_runner.attn_backend  # noqa: E731
    assert type(backend(on)) is BatchInvariantCPUAttentionBackend
    assert type(backend(off)) is CPUAttentionBackend
    assert "(batch-invariant)" in describe_engine(on.config, on.hf_config, torch.float32)["summary"]


# -- the kernels the mode keeps as they are -------------------------------------------------------

ROW_COUNTS = (1, 2, 3, 4, 5, 7, 16, 17, 33, 64, 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_row_count_or_threads(dtype):
    """dense_linear as the engine runs it with our kernels: `decode_linear` on panels where the
    measured table picks it, else oneDNN on the packed weight where oneDNN takes the dtype (1-3
    rows padded to 4), else `F.linear` (bfloat16 on an AVX2-only CPU). Row i is bitwise the same whatever the number of rows in the call, at 1 and 2
    threads. (oneDNN on an unpacked float32 weight is not: 1 row and 2 rows take different
    kernels. The engine never calls it: with our kernels every plain weight is packed.)"""
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=False).to(dtype)
    with cpu_gemm.weight_packing(True):
        # our kernel's panels where the measured table picks them (bf16 too), else oneDNN's layout
        panels = cpu_gemm.choose_gemm(200, 96, dtype=dtype) == "decode"
        assert cpu_gemm.pack_linear_weight(layer) == (panels or cpu_gemm.onednn_takes(dtype))
    x = torch.randn(max(ROW_COUNTS), 96).to(dtype)
    with torch.inference_mode(), num_threads(1):
        reference = torch.cat([cpu_gemm.dense_linear(x[i:i + 1], layer.weight) for i in range(len(x))])
    for threads in (1, 2):
        with torch.inference_mode(), num_threads(threads):
            for m in ROW_COUNTS:
                assert torch.equal(cpu_gemm.dense_linear(x[:m], layer.weight), reference[:m]), (threads, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rows_do_not_depend_on_the_row_count_or_threads(dtype):
    ops = load_ops()
    torch.manual_seed(0)
    x, res = (torch.randn(64, 256).to(dtype) for _ in range(2))
    w = torch.randn(256).to(dtype)

    def norm(m: int) -> tuple[torch.Tensor, ...]:
        out = torch.empty_like(x[:m])
        ops.rms_norm(out, x[:m].clone(), w, 1e-6)
        a, r = x[:m].clone(), res[:m].clone()
        ops.fused_add_rms_norm(a, r, w, 1e-6)
        return out, a, r

    with num_threads(1):
        reference = norm(64)
    for threads in (1, 2):
        with num_threads(threads):
            for m in (1, 2, 5, 64):
                assert all(torch.equal(got, want[:m]) for got, want in zip(norm(m), reference)), (threads, m)


def test_sampler_reductions_keep_a_row_on_one_thread():
    """log_softmax and softmax over a Qwen-sized vocabulary: row i is the same in a call of 1 or
    16 rows and at 1, 2 or 4 threads (ATen's last-dim kernel never splits a row). A plain
    `.sum(-1)` does split a lone row across threads, which is why the sampler does not reduce
    floats with it."""
    torch.manual_seed(0)
    x = torch.randn(16, 151936) * 4
    with num_threads(1):
        reference = x.log_softmax(-1), x.softmax(-1)
    for threads in (1, 2, 4):
        with num_threads(threads):
            for m in (1, 3, 16):
                assert torch.equal(x[:m].log_softmax(-1), reference[0][:m]), (threads, m)
                assert torch.equal(x[:m].softmax(-1), reference[1][:m]), (threads, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_of_a_query_does_not_depend_on_its_chunk(dtype):
    """paged_attention_prefill: the queries of a 70-token prompt computed in one call, in chunks
    of 13 (the last a single query) and one by one give bitwise the same rows, at 1 and 2
    threads; the decode kernel's row for the last query differs from them in float32 (why the
    mode never calls it)."""
    ops = load_ops()
    torch.manual_seed(0)
    L, Hq, Hkv, D, bs = 70, 4, 2, 64, 16
    q = torch.randn(L, Hq, D).to(dtype)
    kc, vc = (torch.randn(8, bs, Hkv, D).to(dtype) for _ in range(2))
    blocks = torch.tensor([3, 0, 6, 1, 5], dtype=torch.long)  # a paged, non-consecutive table

    def attend(start: int, end: int) -> torch.Tensor:  # queries start..end of the prompt, context end
        out = torch.empty_like(q[start:end])
        ops.paged_attention_prefill(out, q[start:end].contiguous(), kc, vc, blocks, end, 0.125)
        return out

    with num_threads(1):
        whole = attend(0, L)
    for threads in (1, 2):
        with num_threads(threads):
            chunks = torch.cat([attend(s, min(s + 13, L)) for s in range(0, L, 13)])
            single = torch.cat([attend(i, i + 1) for i in range(L)])
            assert torch.equal(chunks, whole) and torch.equal(single, whole), threads
    if dtype == torch.float32:
        out = torch.empty_like(q[L - 1:])
        ops.paged_attention_decode(out, q[L - 1:].contiguous(), kc, vc, torch.tensor([0]), blocks[None],
                                   torch.tensor([L]), 0.125)
        assert not torch.equal(out, whole[L - 1:]) and torch.allclose(out, whole[L - 1:], atol=1e-5)
