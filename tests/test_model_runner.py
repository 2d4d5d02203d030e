"""Only rows that catch up reach the LM head and the sampler, so how a prompt is split into steps
never changes a seeded request's tokens (the property stage 05's chunked prefill relies on).

The engine's model call (`LLMEngine._execute_model`: the runner's logits, then the engine's
sampler) is driven with hand-made `SchedulerOutput`s: no scheduler splits prompts before stage 05.
"""

from __future__ import annotations

import torch

from folovllm import LLM, SamplingParams
from folovllm.core.request import Request
from folovllm.core.scheduler_output import SchedulerOutput

PROMPT = [5 + (7 * i) % 200 for i in range(37)]


def run_split(llm: LLM, chunks: list[int], num_tokens: int) -> tuple[list[int], list[dict[str, int]]]:
    """Compute PROMPT in steps of `chunks` tokens, then decode; returns the sampled tokens and
    what was sampled in each prompt step."""
    engine = llm.llm_engine
    manager, scheduler = engine.kv_cache_manager, engine.scheduler
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=num_tokens, ignore_eos=True)
    request = Request(f"split-{chunks}", PROMPT, params, arrival_time=0.0)
    prompt_steps = []

    def step(num_new: int) -> dict[str, int]:
        assert manager.allocate_slots(request, num_new)
        output = SchedulerOutput()
        output.add_row(request, num_new, manager.get_block_table(request))
        sampled, failed = engine._execute_model(output)
        assert not failed
        scheduler.update_from_output(output, sampled)
        return sampled

    for n in chunks:
        prompt_steps.append(step(n))
    while request.num_output_tokens < num_tokens:
        step(1)
    manager.free(request)
    return request.output_token_ids, prompt_steps


def test_seeded_tokens_do_not_depend_on_how_the_prompt_is_split(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), stage=3, dtype="float32", max_model_len=128)
    whole, steps_whole = run_split(llm, [37], 12)
    chunked, steps_chunked = run_split(llm, [10, 16, 1, 10], 12)
    assert steps_whole[0] and [bool(s) for s in steps_chunked] == [False, False, False, True]
    assert len(set(whole)) > 3  # really sampled, not a degenerate repeat
    assert chunked == whole
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == llm.llm_engine.kv_cache_manager.block_pool.num_blocks


def test_a_row_that_does_not_catch_up_draws_no_random_numbers(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), stage=3, dtype="float32", max_model_len=128)
    engine = llm.llm_engine
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=4)
    request = Request("chunk", PROMPT, params, arrival_time=0.0)
    global_state = engine.sampler.generator.get_state()
    own_state = request.generator.get_state()
    assert engine.kv_cache_manager.allocate_slots(request, 20)
    output = SchedulerOutput()
    output.add_row(request, 20, engine.kv_cache_manager.get_block_table(request))
    assert output.sampling_rows == []
    assert engine.model_runner.execute_model(engine.make_input_batch(output)) is None  # no LM head
    assert engine._execute_model(output) == ({}, [])
    assert torch.equal(request.generator.get_state(), own_state)
    assert torch.equal(engine.sampler.generator.get_state(), global_state)
    engine.kv_cache_manager.free(request)
