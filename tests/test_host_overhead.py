"""The Python floor of a decode step (docs/performance.md): the shortcuts taken on the host side
keep every number and every token.

- The runner's preallocated buffers (worker/input_buffers.py) through the whole engine, started
  tiny so they grow mid-run, under preemption and chunked prefill mixed with decodes: HF's
  greedy tokens, and a bounded number of allocations over many steps.
- The block-id cache of `KVCacheManager.get_block_table`: a snapshot per step, right after a
  table grows, after a request is preempted and admitted again.
- `PrefixCacheStats` added up field by field, `RequestStatus.finished` by value.
"""

from __future__ import annotations

import dataclasses
import functools

from folovllm import LLM, SamplingParams
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.prefix_cache import PrefixCacheStats
from folovllm.core.request import _FINISHED, Request, RequestStatus
from folovllm.kv_cache_interface import KVCacheConfig
from folovllm.worker import model_runner
from folovllm.worker.input_buffers import InputBuffers
from tests.helpers import hf_greedy_ignore_eos, mixed_prompts

BYTES_PER_TOKEN = 512  # the tiny Qwen3: 2 (K,V) * 2 layers * 2 KV heads * 16 dims * 4 bytes


def test_buffers_through_the_engine_under_preemption_and_chunked_prefill(tiny_qwen3, hf_qwen3, monkeypatch):
    # buffers far too small for the first step: they grow (by doubling) while the engine runs
    monkeypatch.setattr(model_runner, "InputBuffers", functools.partial(
        InputBuffers, max_num_tokens=2, max_num_reqs=1, max_blocks_per_req=1))
    prompts, _ = mixed_prompts(hf_qwen3.config.vocab_size, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in prompts]
    # 16 blocks of 16 tokens for 10 requests: preemption; a 48-token budget: prompts in chunks
    # beside the decodes
    llm = LLM(str(tiny_qwen3), dtype="float32", max_num_seqs=10, max_model_len=256,
              max_num_batched_tokens=48, kv_cache_memory=16 * 16 * BYTES_PER_TOKEN)
    engine = llm.llm_engine
    kinds = []
    engine.stat_loggers.append(lambda step: kinds.append({r.kind for r in step.rows}))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy_ignore_eos(hf_qwen3, p, 40) for p in prompts]
    assert engine.stats.num_preemptions > 0
    assert any({"chunk", "decode"} <= k for k in kinds)  # a chunk and decodes in one step
    buffers = engine.model_runner.input_buffers
    grown = sum(b.grow_count for b in buffers.buffers.values())
    # every buffer outgrew its first size, but a few doublings served every one of the steps
    assert all(b.grow_count > 0 for b in buffers.buffers.values())
    assert len(kinds) > 60 and grown <= 40
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.block_pool.num_blocks


def test_block_tables_are_per_step_snapshots():
    manager = KVCacheManager(KVCacheConfig(num_blocks=8, block_size=4), watermark=0.0)
    request = Request("r", list(range(6)), SamplingParams(), arrival_time=0.0)

    def blocks() -> list[int]:
        return [b.block_id for b in manager.req_to_blocks["r"]]

    assert manager.allocate_slots(request, 6)
    first = manager.get_block_table(request)
    assert first == blocks() and len(first) == 2
    request.num_computed_tokens = 6
    assert manager.allocate_slots(request, 1)  # 7 tokens: still two blocks, nothing rebuilt
    cached = manager.block_ids_cache["r"][1]
    assert manager.get_block_table(request) == first and manager.block_ids_cache["r"][1] is cached
    request.num_computed_tokens = 8
    assert manager.allocate_slots(request, 1)  # a third block
    grown = manager.get_block_table(request)
    assert grown == blocks() and len(grown) == 3
    assert len(first) == 2  # the earlier step's table was a copy: it did not grow
    manager.free(request)  # preempted: everything back, then admitted again
    request.num_computed_tokens = 0
    assert manager.allocate_slots(request, 9)
    assert manager.get_block_table(request) == blocks() and len(blocks()) == 3
    # a table extended in place (as a lab's allocate_slots may do) is read again, not cached
    manager.req_to_blocks["r"].extend(manager.block_pool.get_new_blocks(1))
    assert manager.get_block_table(request) == blocks() and len(blocks()) == 4


def test_prefix_cache_stats_add_and_subtract_every_field():
    names = [f.name for f in dataclasses.fields(PrefixCacheStats)]
    a = PrefixCacheStats(*range(1, len(names) + 1))
    b = PrefixCacheStats(*range(10, 10 * len(names) + 1, 10))
    assert dataclasses.astuple(a + b) == tuple(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))
    assert dataclasses.astuple(b - a) == tuple(y - x for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


def test_finished_statuses():
    assert {s for s in RequestStatus if s.finished} == _FINISHED
