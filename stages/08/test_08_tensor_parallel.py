"""Stage 08: tensor parallelism, two ranks on CPU over gloo.

Guards: TP=2 gives the greedy tokens of TP=1 and of HF transformers on all three architectures
with stages 03-05 on; every rank holds the shard shapes the docs give and calls the collectives
the docs count (2 all-reduces per decoder layer + 1 for the embedding, 1 gather for the LM head,
per step); at the same KV memory per rank TP=2 holds twice the tokens; a worker killed mid-run
makes the engine raise a clear error and leaves no process behind; the layer splits themselves
(column, row, QKV with replicated kv heads, vocab) reproduce the unsplit layer, checked in one
process by building every rank's shard in turn.

Worker processes cost ~10-20 s each to start on a loaded 2-core machine (importing torch), so
one TP=2 engine per architecture is shared by the tests of this module, and stopped at its end.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig, verify_tensor_parallel
from folovllm.distributed import parallel_state
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.executor.multiproc_executor import MultiprocExecutor, WorkerDiedError, dumps
from folovllm.model_executor.layers import linear, vocab_parallel_embedding
from folovllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    WeightShapeError,
)
from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from tests.helpers import ARCHS

TP = 2
# Per rank. The tiny models' KV is 2 layers * 2 kv heads * 16 dims * 2 (K, V) * 4 bytes = 512 B a
# token on one rank, 256 B on each of two: 1024 tokens at TP=1, 2048 at TP=2.
KV_CACHE_MEMORY = 512 * 1024
ENGINE_ARGS = dict(stage=5, dtype="float32", max_num_seqs=3, max_model_len=256, kv_cache_memory=KV_CACHE_MEMORY)


@pytest.fixture(scope="module")
def tp_llm(tiny_checkpoints) -> Iterator[Callable[[str], LLM]]:
    """tp_llm(arch) -> an LLM with tensor_parallel_size=2, one per architecture, shared by the
    module and stopped at its end. The three are started together: start-up is mostly worker
    processes importing torch, which on a loaded machine goes faster side by side."""
    cache: dict[str, LLM] = {}
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        futures = {
            arch: pool.submit(LLM, str(tiny_checkpoints[arch]), tensor_parallel_size=TP, **ENGINE_ARGS)
            for arch in ARCHS
        }
        errors = []
        for arch, future in futures.items():
            try:
                cache[arch] = future.result()
            except Exception as e:  # stop the others before failing
                errors.append(e)

    def get(arch: str) -> LLM:
        if arch not in cache:  # taken out by a test that stopped it
            cache[arch] = LLM(str(tiny_checkpoints[arch]), tensor_parallel_size=TP, **ENGINE_ARGS)
        return cache[arch]

    get.cache = cache  # the kill test takes its engine out of the cache
    try:
        if errors:
            raise errors[0]
        yield get
    finally:
        for llm in cache.values():
            llm.llm_engine.shutdown()


def _executor(llm: LLM) -> MultiprocExecutor:
    executor = llm.llm_engine.model_executor
    assert isinstance(executor, MultiprocExecutor)
    return executor


# -- the tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_greedy_tokens_equal_tp1_and_hf(arch, greedy_reference, tp_llm):
    ref = greedy_reference(arch)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref.max_tokens]
    tp1 = LLM(str(ref.path), **ENGINE_ARGS).generate(ref.prompts, params, use_tqdm=False)
    tp2 = tp_llm(arch).generate(ref.prompts, params, use_tqdm=False)
    for i, want in enumerate(ref.outputs):
        assert tp1[i].outputs[0].token_ids == want, f"{arch} TP=1 prompt {i} != HF"
        assert tp2[i].outputs[0].token_ids == want, f"{arch} TP=2 prompt {i} != HF (and TP=1)"


def test_tp2_seeded_sampling_equals_tp1(tiny_qwen3, tp_llm):
    """The driver samples with the requests' own generators, so seeded sampling is unchanged."""
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    tp1 = LLM(str(tiny_qwen3), **ENGINE_ARGS).generate(prompts, params, use_tqdm=False)
    tp2 = tp_llm("qwen3").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tp2] == [o.outputs[0].token_ids for o in tp1]


# -- what each rank holds and does --------------------------------------------------------------


def test_shard_shapes_per_rank(tp_llm):
    llm = tp_llm("qwen3")
    c = llm.llm_engine.hf_config
    H, D, I, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    Hq, Hkv, L = c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    # The table of docs/stages/08-tensor-parallel.md, for tp = 2 (Hkv >= tp: kv heads split).
    expected = {
        "model.embed_tokens.weight": (-(-V // TP), H),
        "model.layers.0.self_attn.qkv_proj.weight": ((Hq + 2 * Hkv) // TP * D, H),
        "model.layers.0.self_attn.o_proj.weight": (H, Hq * D // TP),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * I // TP, H),
        "model.layers.0.mlp.down_proj.weight": (H, I // TP),
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.self_attn.q_norm.weight": (D,),
    }
    for rank, shapes in enumerate(_executor(llm).collective_rpc("param_shapes")):
        for name, shape in expected.items():
            assert shapes[name] == shape, f"rank {rank} {name}: {shapes[name]} != {shape}"
        assert sum(1 for n in shapes if n.endswith("qkv_proj.weight")) == L
    full = LLM(str(llm.llm_engine.model_executor.model_path), **ENGINE_ARGS).llm_engine
    full_bytes = full.model_executor.collective_rpc("weight_bytes")[0]
    rank_bytes = _executor(llm).collective_rpc("weight_bytes")
    # Everything but the norms is split: each rank holds a little over half.
    assert all(full_bytes / 2 <= b < full_bytes * 0.55 for b in rank_bytes), (full_bytes, rank_bytes)


def test_collectives_per_step_are_the_documented_count(tp_llm):
    llm = tp_llm("qwen3")
    engine, executor = llm.llm_engine, _executor(llm)
    c = engine.hf_config
    L, H, V = c.num_hidden_layers, c.hidden_size, c.vocab_size
    prompt = list(range(3, 3 + 7))  # T = 7 tokens in one step (budget 2048), one row samples
    engine.add_request("count", prompt, SamplingParams(temperature=0.0, max_tokens=2))
    executor.collective_rpc("comm_stats", True)  # reset
    engine.step()  # the prompt: 7 tokens
    prefill = executor.collective_rpc("comm_stats", True)
    engine.step()  # one decode token
    decode = executor.collective_rpc("comm_stats", True)
    for stats, T in ((prefill, 7), (decode, 1)):
        for s in stats:  # every rank calls every collective
            assert s.all_reduce_calls == 2 * L + 1  # o_proj, down_proj per layer + embedding
            assert s.all_reduce_bytes == (2 * L + 1) * T * H * 4  # [T, hidden] float32
            assert s.gather_calls == 1  # LM head, one sampling row
            assert s.gather_bytes == 1 * (-(-V // TP)) * 4  # [1, V / tp] float32
    assert not engine.has_unfinished_requests()


def test_same_kv_memory_per_rank_holds_twice_the_tokens(tiny_qwen3, tp_llm):
    tp1 = LLM(str(tiny_qwen3), **ENGINE_ARGS).llm_engine
    tp2 = tp_llm("qwen3").llm_engine
    assert tp1.kv_cache_capacity_tokens == KV_CACHE_MEMORY // 512
    assert tp2.kv_cache_capacity_tokens == 2 * tp1.kv_cache_capacity_tokens
    spec = _executor(tp_llm("qwen3")).kv_cache_spec()
    assert spec.num_kv_heads == tp1.hf_config.num_key_value_heads // TP


# -- the message each rank receives per step -----------------------------------------------------


class _ClassRecorder(pickle.Unpickler):
    """Unpickles, noting every class the message names (a `Request` would be one)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.classes: set[str] = set()

    def find_class(self, module: str, name: str):  # noqa: ANN201
        self.classes.add(f"{module}.{name}")
        return super().find_class(module, name)


def _decode_step_message(tiny_qwen3, prompt_len: int, num_rows: int = 8,
                         persistent_input_batch: bool = False) -> tuple[bytes, bytes, list[int]]:
    """For the first step in which `num_rows` requests with `prompt_len`-token prompts all
    decode: (the bytes `collective_rpc` pipes to every rank, the bytes it piped before the
    workers got an `InputBatch`, the token each row computes). The message is built by the
    engine and is the same at every TP size, so a TP=1 engine (whose `collective_rpc` is a direct
    call) shows what MultiprocExecutor sends, without starting worker processes."""
    args = dict(ENGINE_ARGS, max_num_seqs=num_rows, kv_cache_memory=4 * KV_CACHE_MEMORY,
                persistent_input_batch=persistent_input_batch)  # False: the whole InputBatch
    engine = LLM(str(tiny_qwen3), **args).llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(num_rows):
        engine.add_request(f"r{i}", [3 + (7 * j + i) % 500 for j in range(prompt_len)], params)
    steps: list[list] = []  # [message, old message, all rows decode, token of each row]
    real_execute, real_rpc = engine._execute_model, engine.model_executor.collective_rpc

    def execute(output: SchedulerOutput) -> tuple:
        decode = output.num_rows == num_rows and all(output.is_decode(i) for i in range(num_rows))
        steps.append([None, _old_message(output), decode, [r.all_token_ids[-1] for r in output.requests]])
        return real_execute(output)

    def rpc(method: str, *args: object) -> list:
        if method == "execute_model":
            steps[-1][0] = dumps((method, args))
        return real_rpc(method, *args)

    engine._execute_model, engine.model_executor.collective_rpc = execute, rpc
    while not (steps and steps[-1][2]):
        engine.step()
    message, old, _, tokens = steps[-1]
    return message, old, tokens


def test_step_message_is_a_compact_batch_that_does_not_grow_with_context(tiny_qwen3):
    """What each rank receives per step is an `InputBatch` of plain lists: no `Request` (whose
    token lists, block hashes, metrics and text grow with the context), and a decode row's share
    of it grows only with its block table. Run with -s to see the bytes, and the bytes of the
    `SchedulerOutput` that was sent before (docs/stages/08-tensor-parallel.md quotes both)."""
    sizes = {}
    for prompt_len in (20, 200):
        message, old, tokens = _decode_step_message(tiny_qwen3, prompt_len)
        unpickler = _ClassRecorder(message)
        method, (batch,) = unpickler.load()
        assert method == "execute_model" and unpickler.classes == {"folovllm.worker.input_batch.InputBatch"}
        assert batch.token_ids == [[t] for t in tokens]  # one token a row, not the context
        assert batch.sampling_rows == list(range(8))
        sizes[prompt_len] = (len(message), len(dumps(batch.block_tables)), len(old))
    (short, short_tables, short_old), (long, long_tables, long_old) = sizes[20], sizes[200]
    assert long_tables > short_tables  # the context grew: 2 -> 13 blocks a row
    # Beside the block tables, 1 byte a row at most: an int past 255 pickles in 2 bytes.
    assert long - long_tables <= short - short_tables + 8
    print(f"\nstep message, 8 decode rows: {short} B (20-token prompts), {long} B (200-token prompts); "
          f"the SchedulerOutput sent before: {short_old} B, {long_old} B")


def test_with_the_persistent_batch_the_step_message_does_not_grow_at_all(tiny_qwen3):
    """The default (`persistent_input_batch`): each rank keeps the block tables, and a decode
    step's message carries each row's one new token, no block id unless one was just allocated
    (docs/performance.md, "The persistent input batch")."""
    sizes = {}
    for prompt_len in (20, 200):
        message, _, tokens = _decode_step_message(tiny_qwen3, prompt_len, persistent_input_batch=True)
        method, (diff,) = pickle.loads(message)
        assert method == "execute_model" and diff.scheduled_cached_reqs.new_token_ids == [[t] for t in tokens]
        whole, _, _ = _decode_step_message(tiny_qwen3, prompt_len)
        sizes[prompt_len] = (len(message), len(whole))
    (short, short_whole), (long, long_whole) = sizes[20], sizes[200]
    assert long <= short + 8 and long < long_whole - 8 * 10  # 13 block ids a row, gone


def _old_message(output: SchedulerOutput) -> bytes:
    """What collective_rpc sent before the workers got an `InputBatch`: the whole
    `SchedulerOutput`, its requests' seeded generators left out."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            return (type(None), ()) if isinstance(obj, torch.Generator) else NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(("compute_logits", (output,)))
    return buffer.getvalue()


# -- faults -------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """Reaped (no /proc entry) or at least not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_killed_worker_raises_clear_error_and_leaves_no_process(tp_llm, tiny_checkpoints):
    llm = tp_llm.cache.pop("llama", None) or LLM(str(tiny_checkpoints["llama"]), tensor_parallel_size=TP, **ENGINE_ARGS)
    engine, executor = llm.llm_engine, _executor(llm)
    executor.step_timeout_s = 60.0  # a regression that hangs fails here instead of in 10 min
    pids = executor.worker_pids
    try:
        engine.add_request("victim", [4, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=50))
        engine.step()
        engine.step()
        os.kill(pids[1], signal.SIGKILL)
        executor.processes[1].join(30)
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) died with exit code -9"):
            for _ in range(10):
                engine.step()
        with pytest.raises(WorkerDiedError, match="cannot continue"):
            engine.step()  # stays failed, does not hang
    finally:
        engine.shutdown()
    assert all(_gone(pid) for pid in pids), [open(f"/proc/{p}/stat").read() for p in pids if not _gone(p)]
    assert not any(p.is_alive() for p in executor.processes)


def test_stopped_worker_is_named_not_rank_0(tp_llm, tiny_checkpoints):
    """A worker hung by SIGSTOP: rank 0 waits for it in the first collective and never answers,
    so the timeout blamed rank 0 (issue 28, item 11). The stopped rank is named, and shutdown
    still stops it (SIGTERM waits for a stopped process to continue)."""
    llm = tp_llm.cache.pop("qwen2", None) or LLM(str(tiny_checkpoints["qwen2"]), tensor_parallel_size=TP, **ENGINE_ARGS)
    engine, executor = llm.llm_engine, _executor(llm)
    executor.step_timeout_s = 2.0
    pids = executor.worker_pids
    try:
        engine.add_request("victim", [4, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=50))
        engine.step()
        os.kill(pids[1], signal.SIGSTOP)
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) is stopped \(SIGSTOP"):
            engine.step()
    finally:
        engine.shutdown()
    assert all(_gone(pid) for pid in pids)


def test_shutdown_stops_workers(tp_llm):
    llm = tp_llm("qwen3")
    executor = _executor(llm)
    pids = executor.worker_pids
    llm.llm_engine.shutdown()
    tp_llm.cache.pop("qwen3")
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(WorkerDiedError):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_tensor_parallel_size_is_validated(hf_qwen3):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)
    config = hf_qwen3.config  # 4 heads, 2 kv heads, intermediate 128
    with pytest.raises(ValueError, match="must divide the model's 4 attention heads"):
        verify_tensor_parallel(config, 3)
    verify_tensor_parallel(config, 4)  # 2 kv heads replicated on 2 ranks each
    for tp in (1, 2):
        verify_tensor_parallel(config, tp)


# -- the splits, in one process -----------------------------------------------------------------


def _on_rank(monkeypatch, rank: int, size: int) -> None:
    """Build the next layers as `rank` of `size` (the layers read parallel_state when built)."""
    monkeypatch.setattr(parallel_state, "_WORLD_SIZE", size)
    monkeypatch.setattr(parallel_state, "_RANK", rank)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_split_with_split_or_replicated_kv_heads(monkeypatch, tp):
    """Hq=4, Hkv=2: tp=2 splits the kv heads, tp=4 replicates each on two ranks. Each rank's
    output must be its own heads' q | k | v of the unsplit layer."""
    Hq, Hkv, D, hidden = 4, 2, 3, 5
    q, k, v = _rand(Hq * D, hidden, seed=1), _rand(Hkv * D, hidden, seed=2), _rand(Hkv * D, hidden, seed=3)
    x = _rand(2, hidden, seed=4)
    yq, yk, yv = (x @ w.T for w in (q, k, v))  # [T, heads * D]
    for rank in range(tp):
        _on_rank(monkeypatch, rank, tp)
        layer = QKVParallelLinear(hidden, D, Hq, Hkv)
        for shard_id, w in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, w, shard_id)
        kv_head = rank * Hkv // tp  # tp=2: rank r has kv head r; tp=4: ranks 0,1 -> 0; 2,3 -> 1
        n_kv = max(1, Hkv // tp)
        assert (layer.num_heads, layer.num_kv_heads) == (Hq // tp, n_kv)
        want = torch.cat([
            yq[:, rank * (Hq // tp) * D:(rank + 1) * (Hq // tp) * D],
            yk[:, kv_head * D:(kv_head + n_kv) * D],
            yv[:, kv_head * D:(kv_head + n_kv) * D],
        ], dim=-1)
        torch.testing.assert_close(layer(x), want)


def _no_collectives(monkeypatch) -> None:
    """Each rank's layer returns its local part: the test adds or concatenates the parts itself,
    as the all-reduce and the gather would."""
    monkeypatch.setattr(linear, "tensor_model_parallel_all_reduce", lambda x: x)
    monkeypatch.setattr(vocab_parallel_embedding, "tensor_model_parallel_all_reduce", lambda x: x)
    monkeypatch.setattr(vocab_parallel_embedding, "tensor_model_parallel_gather", lambda x, dim=-1: x)


def test_merged_column_then_row_parallel_sums_to_the_unsplit_mlp(monkeypatch):
    """gate_up (column, per part) -> silu*mul -> down (row): the ranks' partial sums add up to
    the unsplit MLP, with the row bias added once."""
    _no_collectives(monkeypatch)
    tp, hidden, inter = 2, 6, 8
    gate, up, down = _rand(inter, hidden, seed=1), _rand(inter, hidden, seed=2), _rand(hidden, inter, seed=3)
    bias = _rand(hidden, seed=4)
    x = _rand(3, hidden, seed=5)
    want = F.linear(F.silu(x @ gate.T) * (x @ up.T), down, bias)
    total = torch.zeros_like(want)
    for rank in range(tp):
        _on_rank(monkeypatch, rank, tp)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter])
        gate_up.weight.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight.weight_loader(gate_up.weight, up, 1)
        row = RowParallelLinear(inter, hidden, bias=True)
        row.weight.weight_loader(row.weight, down)
        row.bias.weight_loader(row.bias, bias)
        assert row.weight.shape == (hidden, inter // tp)
        g, u = gate_up(x).chunk(2, dim=-1)  # [T, inter / tp] each: this rank's slice of each part
        total += row(F.silu(g) * u)  # a partial sum
    torch.testing.assert_close(total, want)


def test_vocab_parallel_embedding_and_head_with_padding(monkeypatch):
    """V = 7 over tp = 2: rank 0 holds tokens 0..3, rank 1 tokens 4..6 and one zero row."""
    _no_collectives(monkeypatch)
    tp, V, hidden = 2, 7, 4
    table = _rand(V, hidden, seed=1)
    ids = torch.tensor([0, 3, 4, 6, 2])
    h = _rand(2, hidden, seed=2)
    embedded, logits = torch.zeros(len(ids), hidden), []
    for rank in range(tp):
        _on_rank(monkeypatch, rank, tp)
        emb = VocabParallelEmbedding(V, hidden)
        emb.weight.weight_loader(emb.weight, table)
        head = ParallelLMHead(V, hidden)
        head.tie_weights(emb)
        assert emb.weight.shape == (4, hidden)
        embedded += emb(ids)  # zeros for the ids of the other rank
        logits.append(head(h))  # [2, 4]: this rank's tokens
    torch.testing.assert_close(embedded, F.embedding(ids, table))
    torch.testing.assert_close(torch.cat(logits, -1)[:, :V], h @ table.T)
    assert torch.equal(logits[1][:, -1], torch.zeros(2))  # the padding row


def test_column_parallel_loads_whole_and_fused_tensors_and_checks_shapes(monkeypatch):
    """A plain column layer and a fused tensor saved whole (no shard id) are cut per rank the
    same way as shard-by-shard loading; a checkpoint tensor of the wrong size is refused with
    the shapes, not narrowed into a wrong slice."""
    tp, hidden, inter = 2, 4, 6
    gate, up = _rand(inter, hidden, seed=1), _rand(inter, hidden, seed=2)
    x = _rand(3, hidden, seed=3)
    for rank in range(tp):
        _on_rank(monkeypatch, rank, tp)
        half = slice(rank * inter // tp, (rank + 1) * inter // tp)
        plain = ColumnParallelLinear(hidden, inter)
        plain.weight.weight_loader(plain.weight, gate)
        torch.testing.assert_close(plain(x), (x @ gate.T)[:, half])
        fused = MergedColumnParallelLinear(hidden, [inter, inter])
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))  # saved whole
        torch.testing.assert_close(fused(x), torch.cat([(x @ gate.T)[:, half], (x @ up.T)[:, half]], -1))
        with pytest.raises(WeightShapeError):
            fused.weight.weight_loader(fused.weight, gate[:4], 0)
        row = RowParallelLinear(inter, hidden)
        with pytest.raises(WeightShapeError):
            row.weight.weight_loader(row.weight, gate)  # [6, 4] where [4, 6] is expected


def test_cli_tensor_parallel_size_reaches_the_engine_config():
    from folovllm.entrypoints.cli import _engine_kwargs, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--tensor-parallel-size", "2"])
    assert _engine_kwargs(args)["tensor_parallel_size"] == 2
    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])  # the server too
    assert _engine_kwargs(args)["tensor_parallel_size"] == 2
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert "tensor_parallel_size" not in _engine_kwargs(args)  # the config's default, 1


def test_a_checkpoint_error_in_the_workers_is_a_value_error(tiny_qwen3, tmp_path):
    """A missing weight file is found by the workers (the driver loads no weights): it must
    reach the user as the same ValueError as at TP=1, and stop the workers."""
    for f in tiny_qwen3.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ValueError, match="no weights in"):
        LLM(str(tmp_path), **ENGINE_ARGS)
    before = set(multiprocessing.active_children())  # the module's shared engines
    with pytest.raises(ValueError, match="no weights in"):
        LLM(str(tmp_path), tensor_parallel_size=TP, **ENGINE_ARGS)
    assert not set(multiprocessing.active_children()) - before


# -- GPTQ checkpoints (stage 07 x stage 08) ------------------------------------------------------

GPTQ_GROUP = 32  # divides the tiny model's o_proj (64 inputs) and down_proj (128) halves


@pytest.fixture(scope="module")
def gptq_checkpoints(tiny_qwen3, tmp_path_factory) -> dict[str, Path]:
    """Our quantizer's checkpoints of the tiny Qwen3: "grouped" (symmetric, v1, groups in
    order: row-parallel ranks cut the scale rows) and "act_order" (asymmetric, v2, act-order:
    row-parallel ranks keep every group)."""
    from folovllm.tools.gptq_quantizer import quantize_checkpoint

    root = tmp_path_factory.mktemp("gptq-tp")
    kinds = {"grouped": {}, "act_order": dict(desc_act=True, sym=False)}
    return {
        name: quantize_checkpoint(str(tiny_qwen3), str(root / name), group_size=GPTQ_GROUP, num_samples=8,
                                  seq_len=64, progress=False, **kw)
        for name, kw in kinds.items()
    }


def test_gptq_tp2_greedy_tokens_equal_tp1(gptq_checkpoints, monkeypatch):
    """The two GPTQ engines at TP=2 (started side by side) give TP=1's greedy tokens; each rank
    holds the documented slices: qweight split along the outputs (column) or inputs (row), the
    row-parallel scales cut per rank in order and kept whole with act-order. On the reference
    kernel, which keeps the checkpoint's tensors (the int4 kernels replace them with their own
    layout); the spawned workers inherit the variable."""
    from tests.helpers import mixed_prompts

    monkeypatch.setenv("FOLOVLLM_GPTQ_KERNEL", "reference")

    prompts = mixed_prompts(512)[0][:4]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with ThreadPoolExecutor(len(gptq_checkpoints)) as pool:
        futures = {name: pool.submit(LLM, str(path), tensor_parallel_size=TP, **ENGINE_ARGS)
                   for name, path in gptq_checkpoints.items()}
        engines = {name: future.result() for name, future in futures.items()}
    try:
        c = engines["grouped"].llm_engine.hf_config
        H, I, K_o = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim
        for name, path in gptq_checkpoints.items():
            tp1 = LLM(str(path), **ENGINE_ARGS).generate(prompts, params, use_tqdm=False)
            tp2 = engines[name].generate(prompts, params, use_tqdm=False)
            want = [o.outputs[0].token_ids for o in tp1]
            assert [o.outputs[0].token_ids for o in tp2] == want, name
            assert len({t for o in want for t in o}) > 8  # not a degenerate repetition
            o_groups = K_o // TP // GPTQ_GROUP if name == "grouped" else K_o // GPTQ_GROUP
            expected = {
                "model.layers.0.mlp.gate_up_proj.qweight": (H // 8, 2 * I // TP),
                "model.layers.0.mlp.gate_up_proj.scales": (H // GPTQ_GROUP, 2 * I // TP),
                "model.layers.0.mlp.down_proj.qweight": (I // TP // 8, H),
                "model.layers.0.self_attn.o_proj.scales": (o_groups, H),
                "model.layers.0.self_attn.o_proj.qzeros": (o_groups, H // 8),
                "model.layers.0.self_attn.o_proj.g_idx": (K_o // TP,),
            }
            for rank, shapes in enumerate(_executor(engines[name]).collective_rpc("param_shapes")):
                for param, shape in expected.items():
                    assert shapes[param] == shape, f"{name} rank {rank} {param}: {shapes[param]} != {shape}"
    finally:
        for llm in engines.values():
            llm.llm_engine.shutdown()


def _gptq_tensors(K: int, N: int, group: int, act_order: bool, seed: int) -> dict[str, torch.Tensor]:
    from folovllm.model_executor.layers.quantization.gptq import pack_int32

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(K, generator=g) if act_order else torch.arange(K)
    return {
        "qweight": pack_int32(torch.randint(0, 16, (K, N), generator=g), 4, 0),
        "qzeros": pack_int32(torch.randint(0, 16, (K // group, N), generator=g), 4, 1),
        "scales": torch.rand(K // group, N, generator=g) * 0.1 + 0.01,
        "g_idx": (order // group).to(torch.int32),
    }


@pytest.mark.parametrize("group,act_order,inter", [(32, False, 128), (32, True, 96), (-1, False, 128)],
                         ids=["grouped", "act_order", "channel"])
def test_gptq_column_then_row_parallel_sums_to_the_unsplit_mlp(monkeypatch, group, act_order, inter):
    """gate_up (column) -> silu*mul -> down (row), GPTQ weights, built as each rank in turn:
    the partial sums add up to the unsplit MLP on the dequantized weights. Act-order keeps every
    group on every rank, so its 48 inputs per rank need not hold whole groups of 32 (refused in
    order, next test). In bfloat16 an act-order row split declines cpu_int4 (uneven groups on a
    rank) for the reference."""
    from folovllm.model_executor.layers.quantization.gptq import GPTQConfig, cpu_int4_available, dequantize_gptq

    _no_collectives(monkeypatch)
    hidden = 64
    config = GPTQConfig(group_size=group, desc_act=act_order, checkpoint_format="gptq_v2")
    gate, up = (_gptq_tensors(hidden, inter, group if group > 0 else hidden, act_order, s) for s in (1, 2))
    down = _gptq_tensors(inter, hidden, group if group > 0 else inter, act_order, 3)
    up["g_idx"] = gate["g_idx"]  # one act-order permutation per fused layer (one input)
    w = {n: dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)  # [K, N]
         for n, t in (("gate", gate), ("up", up), ("down", down))}
    x = _rand(3, hidden, seed=4)
    want = (F.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    total = torch.zeros_like(want)
    for rank in range(TP):
        _on_rank(monkeypatch, rank, TP)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], quant_config=config)
        row = RowParallelLinear(inter, hidden, quant_config=config, prefix="mlp.down_proj")
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            for shard, tensors in enumerate((gate, up)):
                getattr(gate_up, name).weight_loader(getattr(gate_up, name), tensors[name], shard)
            getattr(row, name).weight_loader(getattr(row, name), down[name])
        for layer in (gate_up, row):
            layer.quant_method.process_weights_after_loading(layer)
        groups = inter // group if group > 0 else 1
        assert row.scales.shape[0] == (groups // TP if group > 0 and not act_order else groups)
        g, u = gate_up(x).chunk(2, dim=-1)
        total += row(F.silu(g) * u)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    if cpu_int4_available() and group > 0:
        monkeypatch.delenv("FOLOVLLM_GPTQ_KERNEL", raising=False)
        row = RowParallelLinear(inter, hidden, quant_config=config, params_dtype=torch.bfloat16)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(row, name).weight_loader(getattr(row, name), down[name])
        row.quant_method.process_weights_after_loading(row)
        assert row.quant_method.kernel == ("reference" if act_order else "cpu_int4")


def test_gptq_group_straddling_two_ranks_is_refused_naming_the_layer(gptq_checkpoints, monkeypatch, tmp_path):
    """Groups of 64 over o_proj's 64 inputs at TP=2 (32 per rank), in order: a group would
    straddle the two ranks. Refused as the model is built, before any tensor is read, naming
    the layer."""
    import json

    from folovllm.model_executor.model_loader import load_model

    path = tmp_path / "g64"
    shutil.copytree(gptq_checkpoints["grouped"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    _on_rank(monkeypatch, 1, TP)
    with pytest.raises(ValueError, match=r"group_size=64 does not divide the 32 inputs each rank holds "
                                         r"of model\.layers\.0\.self_attn\.o_proj \(64 inputs over "
                                         r"tensor_parallel_size=2\)"):
        load_model(str(path), torch.float32)
