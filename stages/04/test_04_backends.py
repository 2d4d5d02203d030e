"""Stage 04: every attention backend equals `naive_attention`, and the fast ones never allocate
the [N x N] score matrix.

Inputs are built the way the engine builds them: each sequence's blocks scattered over the pool
in random order, the slots nobody owns filled with 100.0 (a backend that reads a key it must not
see gets a visibly wrong answer), and a packed varlen batch that mixes prefills, prefills over
cached context (stages 05/06) and decodes.

`record_allocations` / `largest_allocation` (tests/attention_utils.py) are the deterministic
memory proxy; `benchmarks/attention_cpu.py` reuses them to report the largest attention
intermediate next to its timings.
"""

from __future__ import annotations

import os
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm._custom_ops import ops_available
from folovllm.model_executor.attention_backends import ATTENTION_BACKENDS, get_attn_backend
from folovllm.model_executor.layers.attention import naive_attention
from tests.attention_utils import Batch, random_paged_batch, record_allocations, run_backend
TOLERANCES = {  # atol, rtol against naive in float32 on the same (rounded) inputs
    torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2),
}


def _triton_skip_reason() -> str | None:
    """`triton` joins these tests once its backend exists and can run here."""
    path = Path(__file__).resolve().parents[2] / "folovllm/model_executor/attention_backends/triton_attn.py"
    if not path.exists():
        return "folovllm/model_executor/attention_backends/triton_attn.py does not exist yet"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("triton on CPU needs TRITON_INTERPRET=1 set before triton is imported "
                "(test_04_triton.py runs it in a subprocess)")
    return None


CPU_BACKENDS = [  # cpu_attn needs our compiled kernels (folovllm/_custom_ops.py)
    b for b in ATTENTION_BACKENDS if b in ("naive", "torch_flash", "sdpa", "triton")
    or (b == "cpu_attn" and ops_available())
]
BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skip(reason=_triton_skip_reason()))
    if b == "triton" and _triton_skip_reason() else b
    for b in CPU_BACKENDS
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Correctness against naive_attention
# ---------------------------------------------------------------------------------------------

# Lengths 1, a block +- 1 (16, 32), a 64-token tile +- 1; decodes over contexts of every kind.
BATCHES = {
    "prefill": ((1, 5, 16, 17, 33, 65), (1, 5, 16, 17, 33, 65)),
    "decode": ((1, 1, 1, 1, 1, 1), (1, 15, 16, 17, 33, 70)),
    "context": ((17, 2, 40, 1, 31), (50, 100, 41, 37, 64)),  # prefill over cached tokens
    "mixed": ((1, 20, 1, 35, 3, 1), (17, 20, 1, 80, 48, 129)),
}
# (heads, kv_heads, head_dim, block_size): GQA ratios 1, 2, 4; head_dim 64, 128; blocks 16, 32
SHAPES = [(4, 4, 64, 16), (4, 2, 128, 32), (8, 2, 64, 32), (4, 1, 128, 16)]


def assert_matches_naive(out: torch.Tensor, q, key_cache, value_cache, md, scale) -> None:
    ref = naive_attention(q.float(), key_cache.float(), value_cache.float(), md, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.float().cpu(), ref.cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-{}_D{}_bs{}".format(*s))
@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backend_equals_naive(backend, kind, shape, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bf16 tl.dot is wrong in Triton's CPU interpreter; bf16 triton is GPU-only")
    heads, kv_heads, head_dim, block_size = shape
    batch = Batch(*BATCHES[kind], heads, kv_heads, head_dim, block_size)
    seed = 10 * list(BATCHES).index(kind) + SHAPES.index(shape)
    q, key_cache, value_cache, md = random_paged_batch(batch, dtype, seed, DEVICE)
    scale = head_dim**-0.5
    out = run_backend(get_attn_backend(backend), q, key_cache, value_cache, md, scale)
    assert_matches_naive(out, q, key_cache, value_cache, md, scale)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backend_on_contiguous_cache(backend):
    """Stages 01-02 keep one block per sequence, as long as the sequence's capacity."""
    batch = Batch((1, 20, 1, 35, 3), (17, 20, 1, 80, 48), heads=4, kv_heads=2)
    q, key_cache, value_cache, md = random_paged_batch(batch, seed=3, contiguous=True)
    assert md.block_tables.shape[1] == 1 and key_cache.shape[1] == 80
    out = run_backend(get_attn_backend(backend), q, key_cache, value_cache, md, 0.125)
    assert_matches_naive(out, q, key_cache, value_cache, md, 0.125)


@pytest.mark.parametrize("block_m,block_n", [(1, 1), (8, 16), (16, 48), (128, 128)])
def test_torch_flash_any_tile_size(block_m, block_n):
    """Tiles smaller than, equal to and spanning several cache blocks give the same answer."""
    from folovllm.model_executor.attention_backends.torch_flash import TorchFlashAttentionBackend

    q, key_cache, value_cache, md = random_paged_batch(Batch(*BATCHES["mixed"]), seed=block_n)
    out = run_backend(TorchFlashAttentionBackend(block_m, block_n), q, key_cache, value_cache, md, 0.125)
    assert_matches_naive(out, q, key_cache, value_cache, md, 0.125)


@pytest.mark.parametrize("chunk_bytes", [1, 40_000, 1 << 30])
def test_sdpa_decode_chunking(chunk_bytes):
    """Decodes batched one per SDPA call, a few per call, or all in one give the same answer."""
    from folovllm.model_executor.attention_backends.sdpa import SDPAAttentionBackend

    q, key_cache, value_cache, md = random_paged_batch(Batch(*BATCHES["mixed"]), seed=7)
    out = run_backend(SDPAAttentionBackend(chunk_bytes), q, key_cache, value_cache, md, 0.125)
    assert_matches_naive(out, q, key_cache, value_cache, md, 0.125)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_forward_reads_only_the_metadata_it_is_given(backend, monkeypatch):
    """What a backend needs beyond the common metadata is derived once, by `build_metadata`:
    `forward` reads no tensor back to the host (no `.tolist()`, no `.item()`: the lists were
    carried from the runner), changes nothing in the metadata, and gives every layer of the step
    the same answer from the same metadata."""
    q, key_cache, value_cache, common = random_paged_batch(Batch(*BATCHES["mixed"]), seed=3)
    be = get_attn_backend(backend)
    md = be.build_metadata(common, key_cache)
    assert all(getattr(md, k) is v for k, v in common.common_fields().items())  # carried as is
    before = snapshot(md)

    def host_read(*args, **kwargs):
        raise AssertionError("forward read a tensor back to the host")
    monkeypatch.setattr(torch.Tensor, "tolist", host_read)
    monkeypatch.setattr(torch.Tensor, "item", host_read)
    layers = [be.forward(q, key_cache, value_cache, md, 0.125) for _ in range(3)]
    monkeypatch.undo()
    assert same(snapshot(md), before)
    assert all(torch.equal(out, layers[0]) for out in layers)
    assert_matches_naive(layers[0], q, key_cache, value_cache, common, 0.125)


def snapshot(x):
    """A deep copy of metadata (tensors cloned, dataclasses and lists walked), for `same`."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if is_dataclass(x):
        return {f.name: snapshot(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, (list, tuple)):
        return [snapshot(v) for v in x]
    return x


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("contiguous", [False, True])
def test_sdpa_block_gather_equals_reference_gather(contiguous):
    """`gather_blocks` (index_select of whole blocks) copies what `gather_kv` (per-token
    slots, the reference) does, for every sequence up to its length."""
    from folovllm.model_executor.attention_backends.sdpa import gather_blocks
    from folovllm.model_executor.layers.attention import gather_kv

    batch = Batch((1, 1, 1), (37, 5, 16), heads=4, kv_heads=2, head_dim=8, block_size=4)
    _, key_cache, _, md = random_paged_batch(batch, seed=5, contiguous=contiguous)
    block_size, longest = key_cache.shape[1], max(batch.seq_lens)
    nb = -(-longest // block_size)
    got = gather_blocks(key_cache, md.block_tables[:, :nb].reshape(-1), nb, longest)
    want = gather_kv(key_cache, md.block_tables, longest)
    for b, n in enumerate(batch.seq_lens):
        assert torch.equal(got[b, :n], want[b, :n])


@st.composite
def batches(draw) -> tuple[Batch, int]:
    num_seqs = draw(st.integers(1, 4))
    seq_lens = tuple(draw(st.integers(1, 90)) for _ in range(num_seqs))
    query_lens = tuple(draw(st.sampled_from([1, n, draw(st.integers(1, n))])) for n in seq_lens)
    heads, kv_heads, head_dim, block_size = draw(st.sampled_from(SHAPES))
    batch = Batch(query_lens, seq_lens, heads, kv_heads, head_dim // 4, block_size)
    return batch, draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(case=batches())
def test_fast_backends_equal_naive_on_random_batches(case):
    batch, seed = case
    q, key_cache, value_cache, md = random_paged_batch(batch, seed=seed)
    scale = batch.head_dim**-0.5
    for backend in [b for b in CPU_BACKENDS if b not in ("naive", "triton")]:
        out = run_backend(get_attn_backend(backend), q, key_cache, value_cache, md, scale)
        assert_matches_naive(out, q, key_cache, value_cache, md, scale)


# ---------------------------------------------------------------------------------------------
# The deterministic gain: no [N x N] scores
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,allocates_scores", [
    ("naive", True), ("torch_flash", False), ("sdpa", False),
    *([("cpu_attn", False)] if ops_available() else []),
])
def test_prefill_never_allocates_the_score_matrix(backend, allocates_scores):
    """A prefill of N tokens: naive materialises [.., N, N] scores; FlashAttention never does.

    Heads x head_dim < N, so that q, K/V and the output ([N, H, D]) stay below N * N elements and
    only a score-sized tensor can cross the line.
    """
    n = 512
    batch = Batch((n,), (n,), heads=4, kv_heads=2, head_dim=64, block_size=16)
    q, key_cache, value_cache, md = random_paged_batch(batch)
    be = get_attn_backend(backend)
    out, allocations = record_allocations(lambda: run_backend(be, q, key_cache, value_cache, md, 0.125))
    assert_matches_naive(out, q, key_cache, value_cache, md, 0.125)
    largest = max(allocations, key=lambda a: a.numel)
    assert (largest.numel >= n * n) == allocates_scores, largest
    if backend == "sdpa":  # the fused flash kernel ran, with no mask (is_causal)
        ops = [a.op for a in allocations]
        assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops, ops
        assert largest.numel <= n * batch.heads * batch.head_dim, largest
    if backend == "torch_flash":  # apart from the output, nothing beyond one tile per head
        tile = batch.heads * 64 * max(64, batch.head_dim)  # [Hkv, group * BLOCK_M, BLOCK_N or D]
        inner = [a for a in allocations if a.shape != tuple(q.shape)]
        assert max(a.numel for a in inner) == tile, max(inner, key=lambda a: a.numel)
