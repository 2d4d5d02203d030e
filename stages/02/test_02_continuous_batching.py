"""Stage 02: continuous batching. `pytest stages/02` reproduces the stage.

The oracle for tokens is HF transformers (greedy `generate`, one prompt at a time); the scheduling
claims are checked on deterministic traces of which request computes what in each step.
"""

from __future__ import annotations

import pytest

from folovllm import EngineConfig, LLM, LLMEngine, RequestOutputKind, SamplingParams
from folovllm.core.scheduler_output import SchedulerOutput
from tests.helpers import hf_greedy, mixed_prompts


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def record_schedule(engine: LLMEngine) -> list[SchedulerOutput]:
    """Spy on the scheduler: every SchedulerOutput, with a copy of each row's request id."""
    trace: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def spy() -> SchedulerOutput:
        out = schedule()
        trace.append(out)
        return out

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return trace


def is_prompt_step(out: SchedulerOutput) -> bool:
    """Stages 02-04 never mix: a step computes prompts only, or decodes only."""
    return out.num_prefill_tokens > 0 and out.num_decode_tokens == 0


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


def make_engine(path, **kw) -> LLMEngine:
    return LLMEngine(str(path), EngineConfig.for_stage(2, dtype="float32", **kw))


def test_greedy_matches_hf_and_stage_01(tiny_qwen3, hf_qwen3):
    prompts, max_tokens = mixed_prompts(hf_qwen3.config.vocab_size, seed=2)
    params = [greedy(m) for m in max_tokens]
    stage2 = LLM(str(tiny_qwen3), stage=2, dtype="float32", max_num_seqs=4)
    out2 = [o.outputs[0].token_ids for o in stage2.generate(prompts, params, use_tqdm=False)]
    stage1 = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=4)
    out1 = [o.outputs[0].token_ids for o in stage1.generate(prompts, params, use_tqdm=False)]
    reference = [hf_greedy(hf_qwen3, p, m) for p, m in zip(prompts, max_tokens)]
    assert out2 == reference
    assert out2 == out1
    # The gain, as counts: stage 02 computes no row for a finished request and no padding.
    assert stage2.stats.num_wasted_row_steps == 0
    assert stage1.stats.num_wasted_row_steps > 0
    assert stage2.stats.num_prompt_tokens_computed == sum(map(len, prompts))
    assert stage1.stats.num_prompt_tokens_computed > sum(map(len, prompts))
    assert stage2.stats.num_decode_row_steps == sum(len(o) - 1 for o in out2)


def test_third_request_starts_right_after_the_first_finishes(tiny_qwen3):
    """max_num_seqs=2; outputs of 2, 10 and 3 tokens: C joins as soon as A leaves, not after B."""
    engine = make_engine(tiny_qwen3, max_num_seqs=2)
    trace = record_schedule(engine)
    for rid, n in (("A", 2), ("B", 10), ("C", 3)):
        engine.add_request(rid, [5, 6, 7, 8 + len(rid)], greedy(n, ignore_eos=True))
    finished_at = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
    rows = [[r.request_id for r in out.requests] for out in trace]
    # step 1 prefills A and B; step 2 decodes both and A finishes with its 2nd token
    assert rows[0] == ["A", "B"] and is_prompt_step(trace[0])
    assert finished_at["A"] == 2
    # step 3 prefills C, in A's slot, while B (8 tokens to go) keeps running
    assert rows[2] == ["C"] and is_prompt_step(trace[2])
    assert finished_at["B"] > finished_at["A"] + 1
    assert all("A" not in r for r in rows[2:])
    assert engine.stats.num_wasted_row_steps == 0
    # 2 prefill steps + 9 decode steps for B (C's 2 decodes ride along)
    assert engine.stats.num_forward_passes == 11
    assert engine.kv_cache_manager.num_free_slots == 2


def test_fcfs_order(tiny_qwen3):
    engine = make_engine(tiny_qwen3, max_num_seqs=1)
    trace = record_schedule(engine)
    ids = ["r3", "r1", "r2", "r0"]
    for rid in ids:
        engine.add_request(rid, [9, 10, 11], greedy(2, ignore_eos=True))
    run_to_end(engine)
    admitted = [out.requests[0].request_id for out in trace if is_prompt_step(out)]
    assert admitted == ids


def test_token_budget_respected_every_step(tiny_qwen3):
    budget = 64
    engine = make_engine(tiny_qwen3, max_num_seqs=8, max_num_batched_tokens=budget)
    trace = record_schedule(engine)
    for i, n in enumerate((30, 30, 30, 5, 60, 2)):
        engine.add_request(str(i), list(range(3, 3 + n)), greedy(4, ignore_eos=True))
    run_to_end(engine)
    assert all(out.total_num_scheduled_tokens <= budget for out in trace)
    prefills = [[r.request_id for r in out.requests] for out in trace if is_prompt_step(out)]
    # 30+30 fit, the third 30 would not; FCFS: "3" (5 tokens) may not overtake "2"
    assert prefills[0] == ["0", "1"]
    assert prefills[1][0] == "2"


def test_abort_mid_run_frees_slot_and_others_unchanged(tiny_qwen3):
    prompts = {"a": [3, 4, 5, 6], "b": [7, 8, 9], "c": [10, 11, 12, 13, 14]}
    reference = make_engine(tiny_qwen3, max_num_seqs=3)
    for rid, p in prompts.items():
        reference.add_request(rid, p, greedy(12, ignore_eos=True))
    expected = run_to_end(reference)

    engine = make_engine(tiny_qwen3, max_num_seqs=3)
    for rid, p in prompts.items():
        engine.add_request(rid, p, greedy(12, ignore_eos=True))
    for _ in range(4):
        engine.step()
    free_before = engine.kv_cache_manager.num_free_slots
    aborted = engine.abort_request("b")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.kv_cache_manager.num_free_slots == free_before + 1  # freed at once
    got = run_to_end(engine)
    assert got == {"a": expected["a"], "c": expected["c"]}
    assert engine.kv_cache_manager.num_free_slots == 3


def test_requests_added_while_others_run(tiny_qwen3, hf_qwen3):
    engine = make_engine(tiny_qwen3, max_num_seqs=4)
    late_prompt = [21, 22, 23, 24, 25, 26]
    engine.add_request("early", [3, 4, 5], greedy(20))
    results = {}
    for step in range(30):
        if step == 5:
            engine.add_request("late", late_prompt, greedy(15))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert results["early"] == hf_greedy(hf_qwen3, [3, 4, 5], 20)
    assert results["late"] == hf_greedy(hf_qwen3, late_prompt, 15)


def test_streaming_deltas_add_up_to_the_final_text(tiny_qwen3):
    engine = make_engine(tiny_qwen3)
    engine.add_request("cum", "the engine schedules", greedy(25))
    engine.add_request("delta", "the engine schedules",
                       greedy(25, output_kind=RequestOutputKind.DELTA))
    text, tokens, final = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "delta":
                text += out.outputs[0].text
                tokens += out.outputs[0].token_ids
            elif out.finished:
                final = out.outputs[0]
    assert final is not None
    assert tokens == final.token_ids
    assert text == final.text


def test_bad_input_is_refused_and_disturbs_nothing(tiny_qwen3):
    engine = make_engine(tiny_qwen3, max_num_seqs=2, max_num_batched_tokens=32)
    engine.add_request("x", [3, 4, 5], greedy(6, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [3, 4, 5], greedy(6))
    with pytest.raises(ValueError, match="cannot abort 'nope'"):
        engine.abort_request("nope")
    with pytest.raises(ValueError, match="max_num_batched_tokens=32"):
        engine.add_request("long", list(range(3, 3 + 40)), greedy(2))
    assert run_to_end(engine)["x"] == run_to_end_fresh(tiny_qwen3, [3, 4, 5], 6)
    assert engine.kv_cache_manager.num_free_slots == 2
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig.for_stage(2, max_num_seqs=8, max_num_batched_tokens=4)


def run_to_end_fresh(path, prompt: list[int], n: int) -> list[int]:
    engine = make_engine(path)
    engine.add_request("only", prompt, greedy(n, ignore_eos=True))
    return run_to_end(engine)["only"]
