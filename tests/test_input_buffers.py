"""The model runner's bulk inputs (`InputBuffers.prepare_inputs`, worker/input_buffers.py) equal
the plain row-by-row reference (`ModelRunner.prepare_inputs` + `AttentionMetadata.from_lists`)
on random steps, and reuse their buffers from step to step.

One `InputBuffers` runs a sequence of random steps, as a runner does: rows come and go and
change order, prompts are computed in chunks beside decodes, rows verify drafts (stage 09), ask
for prompt logits, are padded (stage 01), and block tables grow past the buffers' first width.
"""

from __future__ import annotations

import random

import pytest
import torch

from folovllm.model_executor.layers.attention import AttentionMetadata
from folovllm.worker.input_batch import InputBatch
from folovllm.worker.input_buffers import InputBuffers, ragged_arange
from folovllm.worker.model_runner import ModelRunner

BLOCK_SIZE = 4


def random_batch(rng: random.Random, num_rows: int, max_context: int, kinds: tuple[str, ...]) -> InputBatch:
    """A step of `num_rows` rows, each a decode, a chunk, a whole prompt, a decode with drafts,
    or a padded prompt (the kinds allowed); random block ids."""
    token_ids, starts, query_lens, tables, sampling_rows = [], [], [], [], []
    prompt_logits, drafts = {}, {}
    for row in range(num_rows):
        kind = rng.choice(kinds)
        start = 0 if kind in ("prompt", "padded") else rng.randrange(1, max_context)
        n = {"decode": 1, "drafts": 1 + rng.randrange(1, 4)}.get(kind, rng.randrange(1, 20))
        real = n - rng.randrange(0, n) if kind == "padded" else n  # stage 01: fewer real tokens
        token_ids.append([rng.randrange(1, 500) for _ in range(real)])
        starts.append(start)
        query_lens.append(n)
        num_blocks = -(-(start + n) // BLOCK_SIZE) + rng.randrange(0, 2)  # sometimes one spare
        tables.append(rng.sample(range(1000), num_blocks))
        if kind != "chunk":
            sampling_rows.append(row)
        if kind == "drafts":
            drafts[row] = n - 1
        if kind in ("chunk", "prompt") and rng.random() < 0.3:
            prompt_logits[row] = rng.randrange(1, real + 1) if kind == "chunk" else max(real - 1, 0) or 1
    return InputBatch(req_ids=[str(i) for i in range(num_rows)], token_ids=token_ids,
                      num_computed_tokens=starts, query_lens=query_lens, block_tables=tables,
                      sampling_rows=sampling_rows, prompt_logits=prompt_logits, num_draft_tokens=drafts)


def reference(batch: InputBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    runner = ModelRunner(torch.nn.Identity(), "cpu")  # prepare_inputs reads no model
    input_ids, positions, logits_indices = runner.prepare_inputs(batch)
    seq_lens = [s + q for s, q in zip(batch.num_computed_tokens, batch.query_lens)]
    md = AttentionMetadata.from_lists(batch.query_lens, seq_lens, batch.block_tables, positions, BLOCK_SIZE)
    return input_ids, positions, logits_indices, md


def assert_same(buffers: InputBuffers, batch: InputBatch) -> bool:
    """-> whether the step's logits were every token (the runner's gather skipped)."""
    got = buffers.prepare_inputs(batch)
    input_ids, positions, logits_indices, md = reference(batch)
    assert torch.equal(got.input_ids, input_ids)
    assert torch.equal(got.positions, positions)
    assert torch.equal(got.logits_indices, logits_indices)
    if got.logits_of_every_token:  # the runner skips the gather: it must be the identity
        assert logits_indices.tolist() == list(range(input_ids.shape[0]))
    ours = got.attn_metadata
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        assert torch.equal(getattr(ours, name), getattr(md, name)), name
        assert getattr(ours, name).dtype == torch.long and getattr(ours, name).is_contiguous()
    assert (ours.max_query_len, ours.max_seq_len) == (md.max_query_len, md.max_seq_len)
    assert ours.query_start_loc_cpu == md.query_start_loc_cpu
    assert ours.seq_lens_cpu == md.seq_lens_cpu
    assert ours.block_tables_cpu == md.block_tables_cpu
    return got.logits_of_every_token


@pytest.mark.parametrize("kinds", [
    ("decode",),  # the fast path: one token a row
    ("decode", "chunk"),  # chunked prefill beside decodes (stage 05)
    ("decode", "chunk", "prompt", "drafts"),  # + whole prompts, drafts (stage 09), prompt logits
    ("decode", "drafts"),  # stage 09: every token scored, as a plain decode step (no gather)
    ("prompt", "padded"),  # stage 01's padded prompts
])
def test_bulk_inputs_equal_the_reference_over_random_steps(kinds):
    rng = random.Random(len(kinds))
    # small buffers: the first steps already outgrow them (tokens, rows and block-table width)
    buffers = InputBuffers(BLOCK_SIZE, "cpu", max_num_tokens=4, max_num_reqs=2, max_blocks_per_req=2)
    every_token = 0
    for step in range(40):
        # rows come and go and change order between steps: nothing of the last step is kept
        every_token += assert_same(buffers, random_batch(rng, rng.randrange(1, 12), 8 + 6 * step, kinds))
    assert buffers.block_tables.grow_count > 0 and buffers.input_ids.grow_count > 0
    if "prompt" not in kinds and "chunk" not in kinds:  # decodes (with drafts): no gather, ever
        assert every_token == 40


def test_a_steady_decode_reuses_its_buffers():
    """The deterministic proxy of "no allocation per step": after the first step, decode steps
    of as many rows fill the same memory and hand out the same tensors (nothing regrows), while
    the numbers change with every step."""
    rng = random.Random(0)
    buffers = InputBuffers(BLOCK_SIZE, "cpu")
    batch = random_batch(rng, 16, 40, ("decode",))
    first = buffers.prepare_inputs(batch)
    grown = {name: b.grow_count for name, b in buffers.buffers.items()}
    for _ in range(5):
        batch.num_computed_tokens = [n + 1 for n in batch.num_computed_tokens]
        batch.token_ids = [[rng.randrange(1, 500)] for _ in batch.token_ids]
        got = buffers.prepare_inputs(batch)
        for a, b in [(got.input_ids, first.input_ids), (got.positions, first.positions),
                     (got.logits_indices, first.logits_indices),
                     (got.attn_metadata.slot_mapping, first.attn_metadata.slot_mapping),
                     (got.attn_metadata.block_tables, first.attn_metadata.block_tables)]:
            assert a is b and a.data_ptr() == b.data_ptr()
        assert_same(buffers, batch)
    assert {name: b.grow_count for name, b in buffers.buffers.items()} == grown
    assert got.positions.tolist() == [n for n in batch.num_computed_tokens]


def test_ragged_arange():
    import numpy as np

    starts, counts = np.array([4, 9, 0]), np.array([2, 3, 0])
    assert ragged_arange(starts, counts, np.arange(10)).tolist() == [4, 5, 9, 10, 11]
