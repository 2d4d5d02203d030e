"""Stage 01 reproduction: naive generation with static batches and a contiguous KV cache.

1. Correctness: greedy tokens equal HF `generate(do_sample=False)` (one prompt at a time) for
   mixed prompts (1..200 tokens, all different max_tokens) run as static batches, for Qwen3,
   Qwen2 and Llama, with one batch and with several.
2. The deterministic cost of static batching that stage 02 removes, read from `llm.stats` and
   derived here from first principles (the batch composition and the outputs):

       a batch of rows r = 1..B runs one prefill, padded to its longest prompt P, then decodes
       until its longest output O_max; a row whose own output O_r is shorter idles for
       O_max - O_r decode steps, and its KV row is sized for the longest request it *could*
       be (prompt + max_tokens), not what it used.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from folovllm import LLM, SamplingParams
from tests.helpers import ARCHS


@dataclass
class StaticBatchCost:
    num_forward_passes: int = 0
    num_prompt_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_decode_row_steps: int = 0
    num_wasted_row_steps: int = 0
    peak_kv_tokens_reserved: int = 0


def static_batch_cost(prompts, max_tokens, outputs, max_num_seqs, max_model_len) -> StaticBatchCost:
    """What static batching must cost: requests form batches of `max_num_seqs` in arrival order;
    each batch is one padded prefill (producing every row's first token) plus
    `longest output - 1` decode steps of all its rows."""
    cost = StaticBatchCost()
    n = len(prompts)
    for start in range(0, n, max_num_seqs):
        batch = range(start, min(start + max_num_seqs, n))
        rows = len(batch)
        longest_prompt = max(len(prompts[i]) for i in batch)
        longest_output = max(len(outputs[i]) for i in batch)
        cost.num_forward_passes += 1 + (longest_output - 1)
        cost.num_prompt_tokens += sum(len(prompts[i]) for i in batch)
        cost.num_prompt_tokens_computed += rows * longest_prompt  # padding is computed too
        cost.num_generated_tokens += sum(len(outputs[i]) for i in batch)
        cost.num_decode_row_steps += rows * (longest_output - 1)
        cost.num_wasted_row_steps += sum(longest_output - len(outputs[i]) for i in batch)
        # Every row reserves room for the longest sequence any member may reach.
        capacity = max(
            longest_prompt,
            max(min(len(prompts[i]) + max_tokens[i], max_model_len) for i in batch),
        )
        cost.peak_kv_tokens_reserved = max(cost.peak_kv_tokens_reserved, rows * capacity)
    return cost


def _greedy(max_tokens):
    return [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]


@pytest.mark.parametrize("max_num_seqs", [16, 4], ids=["one_batch", "three_batches"])
@pytest.mark.parametrize("arch", ARCHS)
def test_static_batch_greedy_matches_hf(arch, max_num_seqs, greedy_reference, hf_models):
    ref = greedy_reference(arch)
    assert len(ref.prompts) >= 8 and len(set(ref.max_tokens)) == len(ref.max_tokens)
    llm = LLM(str(ref.path), stage=1, dtype="float32", max_num_seqs=max_num_seqs)
    outs = llm.generate(ref.prompts, _greedy(ref.max_tokens), use_tqdm=False)

    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, want) in enumerate(zip(got, ref.outputs)):
        assert g == want, f"prompt {i} ({len(ref.prompts[i])} tokens): ours {g} != HF {want}"
    eos = hf_models(arch).generation_config.eos_token_id
    for o, want, m in zip(outs, ref.outputs, ref.max_tokens):
        ended_on_eos = len(want) < m
        assert ended_on_eos == (want[-1] == eos)
        assert o.finished and o.outputs[0].finish_reason == ("stop" if ended_on_eos else "length")

    # The costs of static batching, from the outputs alone.
    max_model_len = llm.llm_engine.config.max_model_len
    assert max_model_len == hf_models(arch).config.max_position_embeddings  # the default
    want = static_batch_cost(ref.prompts, ref.max_tokens, got, max_num_seqs, max_model_len)
    s = llm.stats
    assert s.num_wasted_row_steps > 0  # the workload really mixes output lengths
    assert s.num_wasted_row_steps == want.num_wasted_row_steps
    assert s.num_decode_row_steps == want.num_decode_row_steps
    assert s.num_prompt_tokens == want.num_prompt_tokens
    assert s.num_prompt_tokens_computed == want.num_prompt_tokens_computed
    assert s.num_prompt_tokens_computed > s.num_prompt_tokens  # padding was computed
    assert s.num_generated_tokens == want.num_generated_tokens
    assert s.num_forward_passes == want.num_forward_passes
    assert s.peak_kv_tokens_reserved == want.peak_kv_tokens_reserved
    # K and V, every layer, every KV head, float32.
    cfg = hf_models(arch).config
    bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert s.peak_kv_bytes_reserved == want.peak_kv_tokens_reserved * bytes_per_token
    # Nothing is left queued or holding cache memory.
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.kv_cache_manager.num_reserved_tokens == 0


def test_kv_reservation_follows_max_tokens_not_output(tiny_qwen3):
    """A request that may generate 200 tokens reserves 200 slots in every row of its batch,
    even when EOS or a short max_tokens elsewhere ends the others after a few."""
    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=8, max_model_len=512)
    prompts = [[5] * 10, [7] * 30, [9] * 3]
    params = _greedy([2, 3, 200])
    params[2] = SamplingParams(temperature=0.0, max_tokens=200, stop_token_ids=list(range(512)))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3, 1]  # the third stops at once
    assert llm.stats.peak_kv_tokens_reserved == 3 * (3 + 200)
    assert llm.stats.num_wasted_row_steps == (3 - 2) + 0 + (3 - 1)


def test_oracle_catches_a_stale_kv_cache(monkeypatch, greedy_reference):
    """The reference is strong enough to catch a subtle engine bug: decode steps that forget
    to write the new token's K/V into the cache (prefill is untouched, so first tokens agree)."""
    import folovllm.model_executor.layers.attention as attention

    real_forward = attention.Attention.forward

    def forward_without_decode_writes(self, q, k, v, md):
        if md.max_query_len > 1:
            return real_forward(self, q, k, v, md)
        key_cache, value_cache = self.kv_cache  # the new token's K/V is never stored
        return self.backend.forward(q, key_cache, value_cache, md, self.scale)

    ref = greedy_reference("qwen3")
    monkeypatch.setattr(attention.Attention, "forward", forward_without_decode_writes)
    llm = LLM(str(ref.path), stage=1, dtype="float32", max_num_seqs=16)
    outs = llm.generate(ref.prompts, _greedy(ref.max_tokens), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert [g[:1] for g in got] == [w[:1] for w in ref.outputs]
    long_enough = [i for i, w in enumerate(ref.outputs) if len(w) >= 6]
    differ = [i for i in long_enough if got[i] != ref.outputs[i]]
    assert len(differ) >= len(long_enough) // 2, "a stale KV cache went unnoticed"
