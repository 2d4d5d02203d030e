"""The persistent input batch (worker/persistent_batch.py) against the whole-batch reference.

A real engine runs random workloads (requests arrive, grow, are computed in chunks beside
decodes, hit the prefix cache, are preempted when the KV cache is full and resumed, finish, are
aborted, their ids reused, rows reorder; with drafts; stage 01's padded static batches). At
every step the runner's inputs gathered from its persistent table are compared with the plain
row-by-row preparation of the step's whole `InputBatch` (`ModelRunner.prepare_inputs` +
`AttentionMetadata.from_lists`), and the tokens with an engine that sends the whole batch.
Then the safety rules: a worker holding another generation refuses a diff, and the engine
answers a failed step by sending everything again; and the message shrinks (the pickled bytes
a tensor-parallel rank receives, the deterministic proxy of its cost).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.core.request import Request
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.engine.llm_engine import LLMEngine
from folovllm.executor.multiproc_executor import dumps
from folovllm.model_executor.layers.attention import AttentionMetadata
from folovllm.worker.input_batch import InputBatch
from folovllm.worker.model_runner import ModelRunner
from folovllm.worker.persistent_batch import (
    InputBatchDiff,
    InputBatchSender,
    PersistentInputBatch,
    StaleInputBatchError,
)

BYTES_PER_TOKEN = 512  # the tiny Qwen3's K/V per token (stages/03)


def reference_inputs(batch: InputBatch, block_size: int) -> tuple[torch.Tensor, ...]:
    """The plain row-by-row preparation of the whole batch."""
    input_ids, positions, logits_indices = ModelRunner(torch.nn.Identity(), "cpu").prepare_inputs(batch)
    seq_lens = [s + q for s, q in zip(batch.num_computed_tokens, batch.query_lens)]
    md = AttentionMetadata.from_lists(batch.query_lens, seq_lens, batch.block_tables, positions, block_size)
    return input_ids, positions, logits_indices, md


class Checker:
    """Wraps an engine's sender and its runner's table gather: every step's gathered inputs
    must equal the reference's; counts what the steps exercised."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seen: Counter[str] = Counter()
        self.batch: InputBatch | None = None
        self.failures: list[str] = []
        sender, buffers = engine.input_batch_sender, engine.model_runner.input_buffers
        assert isinstance(sender, InputBatchSender) and buffers is not None
        make_message, gather = sender.make_message, buffers.prepare_inputs_from_table

        def checked_make_message(batch: InputBatch, requests: list[Request]) -> InputBatchDiff:
            diff = make_message(batch, requests)
            self.batch = batch
            self.seen["bytes_whole"] += len(dumps(("execute_model", (batch,))))
            self.seen["bytes_diff"] += len(dumps(("execute_model", (diff,))))
            self.seen["new"] += len(diff.scheduled_new_reqs)
            self.seen["resets"] += diff.base_generation < 0
            self.seen["prefix_hit"] += sum(1 for n, r in zip(diff.num_computed_tokens, diff.req_ids)
                                           if n > 0 and r in {d.req_id for d in diff.scheduled_new_reqs})
            self.seen["resumed"] += sum(diff.scheduled_cached_reqs.resumed_from_preemption)
            self.seen["finished"] += len(diff.finished_req_ids)
            self.seen["chunk"] += sum(1 for q in diff.query_lens if q > 1) and len(diff.query_lens) > 1
            self.seen["drafts"] += len(diff.spec_token_ids)
            self.seen["padded"] += len(diff.unpadded_lens)
            return diff

        def checked_gather(table: PersistentInputBatch, diff: InputBatchDiff) -> Any:
            got = gather(table, diff)
            try:
                compare(table, diff, got)
            except AssertionError as e:  # kept: the engine's fault guard would swallow it
                self.failures.append(f"step {self.seen['steps']}: {e!r}")
                raise
            return got

        def compare(table: PersistentInputBatch, diff: InputBatchDiff, got: Any) -> None:
            assert self.batch is not None and self.batch.req_ids == diff.req_ids
            rows = table.row_indices(diff.req_ids).tolist()
            self.seen["reordered"] += rows != sorted(rows)
            self.seen["steps"] += 1
            input_ids, positions, logits_indices, md = reference_inputs(self.batch, buffers.block_size)
            assert torch.equal(got.input_ids, input_ids)
            assert torch.equal(got.positions, positions)
            assert torch.equal(got.logits_indices, logits_indices)
            ours = got.attn_metadata
            for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
                assert torch.equal(getattr(ours, name), getattr(md, name)), name
            assert (ours.max_query_len, ours.max_seq_len) == (md.max_query_len, md.max_seq_len)
            assert (ours.query_start_loc_cpu, ours.seq_lens_cpu) == (md.query_start_loc_cpu, md.seq_lens_cpu)
            assert [ours.block_tables_cpu[b][: len(t)] for b, t in enumerate(md.block_tables_cpu)] == md.block_tables_cpu

        sender.make_message = checked_make_message  # type: ignore[method-assign]
        buffers.prepare_inputs_from_table = checked_gather  # type: ignore[method-assign]


def drive(llm: LLM, seed: int, num_requests: int, vocab: int = 200) -> dict[str, list[int]]:
    """A random workload: arrivals, shared prefixes, aborts (and an aborted id reused) ->
    each request's generated tokens."""
    engine, rng = llm.llm_engine, random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randrange(16, 40))] for _ in range(2)]
    outputs: dict[str, list[int]] = {}
    added = 0
    while added < num_requests or engine.has_unfinished_requests():
        reuse = None  # an aborted request's id, given at once to a new request
        live = list(engine.output_processor.parents)
        if live and rng.random() < 0.05:
            reuse = rng.choice(live)
            engine.abort_request(reuse)
            outputs[reuse + f"@{added}"] = ["aborted"]  # type: ignore[list-item]
        if added < num_requests and (reuse or rng.random() < 0.5):
            prompt = (rng.choice(prefixes) if rng.random() < 0.5 else []) + [
                rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
            engine.add_request(reuse or f"r{added}", prompt, SamplingParams(
                temperature=0, max_tokens=rng.randrange(1, 24), ignore_eos=True))
            added += 1
        for out in engine.step():
            if out.finished:
                outputs[out.request_id + f"@{added}"] = out.outputs[0].token_ids
    return outputs


CASES = {
    # chunked prefill + prefix caching, a KV cache small enough to preempt
    "chunks_prefix_preempt": dict(stage=6, max_num_seqs=8, max_num_batched_tokens=24,
                                  kv_cache_memory=10 * 16 * BYTES_PER_TOKEN),
    # drafts to verify (stage 09's n-gram drafter) beside prompts
    "drafts": dict(stage=6, max_num_seqs=6, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}),
    # stage 01's static batch: padded prompts, idle finished rows
    "static_padded": dict(stage=1, max_num_seqs=4),
}
MUST_SEE = {"chunks_prefix_preempt": ("resumed", "prefix_hit", "chunk", "finished", "reordered"),
            "drafts": ("drafts", "finished"), "static_padded": ("padded", "finished")}


@pytest.mark.parametrize("case", list(CASES))
def test_gathered_inputs_equal_the_whole_batch_reference_over_random_runs(tiny_qwen3, case):
    kw = dict(dtype="float32", max_model_len=128, **CASES[case])
    llm = LLM(str(tiny_qwen3), **kw)
    checker = Checker(llm.llm_engine)
    ours = drive(llm, seed=len(case), num_requests=24)
    whole = drive(LLM(str(tiny_qwen3), persistent_input_batch=False, **kw), seed=len(case), num_requests=24)
    assert ours == whole  # the same tokens as an engine sending the whole batch every step
    seen = checker.seen
    assert checker.failures == [] and seen["resets"] == 1  # no step failed (and was healed)
    assert seen["steps"] > 30 and all(seen[k] > 0 for k in MUST_SEE[case]), seen
    assert seen["bytes_diff"] < seen["bytes_whole"], seen
    # the table holds the running requests and the preempted ones waiting, no finished one
    table = llm.llm_engine.model_runner.persistent_batch
    assert table.num_reqs <= CASES[case]["max_num_seqs"] + seen["resumed"]
    assert sorted(table.req_id_to_index.values()) == list(range(table.num_reqs))  # condensed


def test_a_worker_that_missed_a_step_refuses_it_and_is_sent_everything_again(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=128)
    engine = llm.llm_engine
    table = engine.model_runner.persistent_batch
    sent: list[InputBatchDiff] = []
    make_message = engine.input_batch_sender.make_message
    engine.input_batch_sender.make_message = lambda b, r: sent.append(make_message(b, r)) or sent[-1]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 9, 11 + i, 40, 7] for i in range(3)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    for _ in range(4):
        engine.step()
    assert sent[0].base_generation == -1 and all(d.base_generation == d.generation - 1 for d in sent[1:])
    # a diff applied twice: the second finds the table a generation ahead and is refused
    with pytest.raises(StaleInputBatchError, match="generation"):
        table.apply(sent[-1])
    # a rank that missed a step: the engine's step fails there, the fault guard reruns the rows
    # one by one, and the first of those messages starts from an empty table
    table.generation -= 1
    n = len(sent)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.outputs[0].finish_reason in (None, "length")  # no request failed
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    assert sent[n].base_generation == sent[n - 1].generation  # the step this worker refused
    assert sent[n + 1].base_generation == -1 and len(sent[n + 1].scheduled_new_reqs) == 1  # row 0 alone
    assert sent[n + 2].base_generation == sent[n + 1].generation
    expected = LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=128, persistent_input_batch=False
                   ).generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [tokens[str(i)] for i in range(3)] == [out.outputs[0].token_ids for out in expected]


def test_the_step_message_shrinks_to_the_diff():
    """16 decode rows of 4,096 tokens (block size 16: 256 block ids a row): the bytes pickled to
    each tensor-parallel rank per step, whole batch against the diff."""
    block_size, context, rows = 16, 4096, 16
    requests = [Request(str(i), list(range(3, 3 + context)), SamplingParams(max_tokens=100), arrival_time=0.0)
                for i in range(rows)]
    tables = [list(range(i * 300, i * 300 + context // block_size)) for i in range(rows)]
    sender = InputBatchSender()
    sizes = []
    for step in range(3):
        output = SchedulerOutput()
        for r, t in zip(requests, tables):
            r.num_computed_tokens = r.num_tokens - 1
            output.add_row(r, 1, list(t))
        batch = LLMEngine.make_input_batch(output)
        diff = sender.make_message(batch, output.requests)
        sizes.append((len(dumps(("execute_model", (batch,)))), len(dumps(("execute_model", (diff,))))))
        for r, t in zip(requests, tables):
            r.append_output_token(7)
            if r.num_tokens % block_size == 1:
                t.append(t[-1] + 1)
    whole, diff = sizes[-1]
    # the first message sends each request in full, its tokens too (in a real run that is its
    # prompt step, whose whole batch carries the same tokens); then ~0.5 KB against ~12.7 KB
    assert sizes[0][1] > whole
    assert whole > 10_000 and diff * 20 < whole, sizes
