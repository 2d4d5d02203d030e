"""Stage 09: speculative decoding. `pytest stages/09` reproduces the stage.

Greedy tokens are judged against HF transformers (the drafts must never change a token), the
rejection sampler's distribution against the target distribution it is handed (total variation
over many draws, and a mutation that must fail the same test), the scheduler by hypothesis
invariants over random runs with chunked prefill, prefix caching, preemption and aborts, and the
gain by the exact count of forward passes on a model whose output repeats.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm.core.request import Request
from folovllm.engine.llm_engine import LLMEngine
from folovllm.spec_decode import rejection_sampler
from folovllm.spec_decode.ngram_proposer import RequestTokens, ngram_lookup
from folovllm.spec_decode.proposer import Proposer
from folovllm.spec_decode.rejection_sampler import RejectionSampler, rejection_sample
from folovllm.worker.sampler import Sampler
from tests.helpers import ARCHS, hf_greedy, hf_logits


def ngram(k: int, lo: int = 1, hi: int = 4) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def repeating_model(tmp_path_factory):
    """A tiny Qwen3 with the default init (0.02): its greedy output falls into a loop, so the
    n-gram proposer's drafts are accepted (a random model accepting for the wrong reasons, which
    is what a count of saved steps needs), and HF's model of it as the oracle."""
    from transformers import AutoModelForCausalLM

    from folovllm.testing.tiny_model import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("repeating") / "qwen3", initializer_range=0.02)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


REPEATING_PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 6, [20, 30, 40] * 10, list(range(3, 40))]


# -- greedy: identical tokens, HF is the oracle -------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_matches_hf_at_every_k(greedy_reference, arch, k):
    """The mixed prompts (1..200 tokens) with n-gram speculation: the same tokens as HF."""
    ref = greedy_reference(arch)
    llm = LLM(str(ref.path), stage=6, dtype="float32", max_model_len=256, speculative_config=ngram(k))
    params = [SamplingParams(temperature=0, max_tokens=m) for m in ref.max_tokens]
    assert token_ids(llm.generate(ref.prompts, params, use_tqdm=False)) == ref.outputs
    assert llm.stats.spec_decoding.num_draft_tokens > 0  # drafts were really verified


@pytest.mark.parametrize("stage", [2, 3, 4, 5])
def test_greedy_matches_hf_at_every_stage(greedy_reference, stage):
    """Speculation composes with every stage from 02 on (slots, blocks, each backend, chunks)."""
    ref = greedy_reference("qwen3")
    llm = LLM(str(ref.path), stage=stage, dtype="float32", max_model_len=256, speculative_config=ngram(3, 1, 2))
    params = [SamplingParams(temperature=0, max_tokens=m) for m in ref.max_tokens]
    assert token_ids(llm.generate(ref.prompts, params, use_tqdm=False)) == ref.outputs


def test_accepted_drafts_save_forward_passes(repeating_model):
    """On output that repeats, drafts are accepted: the same tokens as HF in fewer steps. The
    count is exact: every step commits 1 + its accepted drafts per request."""
    path, hf = repeating_model
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(path), stage=6, dtype="float32", max_model_len=256)
    spec = LLM(str(path), stage=6, dtype="float32", max_model_len=256, speculative_config=ngram(4))
    expected = [hf_greedy(hf, p, 40, min_new_tokens=40) for p in REPEATING_PROMPTS]
    assert token_ids(plain.generate(REPEATING_PROMPTS, params, use_tqdm=False)) == expected
    assert token_ids(spec.generate(REPEATING_PROMPTS, params, use_tqdm=False)) == expected
    s = spec.stats.spec_decoding
    assert s.num_accepted_tokens > 0 and s.mean_accepted_length > 1
    assert spec.stats.num_generated_tokens == plain.stats.num_generated_tokens == 120
    assert spec.stats.num_forward_passes < plain.stats.num_forward_passes
    # per position: a draft counts only when every one before it was accepted
    assert s.num_accepted_tokens_per_pos == sorted(s.num_accepted_tokens_per_pos, reverse=True)
    assert sum(s.num_accepted_tokens_per_pos) == s.num_accepted_tokens


def test_n_greater_than_one(greedy_reference):
    ref = greedy_reference("qwen3")
    llm = LLM(str(ref.path), stage=6, dtype="float32", max_model_len=256, speculative_config=ngram(3))
    out = llm.generate(ref.prompts[:3], [SamplingParams(n=2, temperature=0, max_tokens=m) for m in ref.max_tokens[:3]],
                       use_tqdm=False)
    for o, expected in zip(out, ref.outputs[:3]):
        assert [list(c.token_ids) for c in o.outputs] == [expected, expected]


# -- stops inside an accepted run ---------------------------------------------------------------------

def spec_steps(llm: LLM) -> list:
    records: list = []
    llm.llm_engine.stat_loggers.append(records.append)
    return records


class OracleProposer(Proposer):
    """Drafts the true greedy continuation (HF's), so every draft is accepted: a run of accepted
    tokens long enough for a stop to land inside it."""

    def __init__(self, prompt: list[int], continuation: list[int]) -> None:
        self.prompt, self.continuation = prompt, continuation

    def propose(self, requests, max_drafts):
        out = []
        for r, m in zip(requests, max_drafts):
            done = r.num_output_tokens if r.prompt_token_ids == self.prompt else len(self.continuation)
            out.append(self.continuation[done : done + m])
        return out


@pytest.fixture(scope="module")
def oracle_case(greedy_reference):
    ref = greedy_reference("qwen3")
    i = max(range(len(ref.prompts)), key=lambda j: len(set(ref.outputs[j])) if ref.max_tokens[j] >= 30 else 0)
    return ref.path, ref.prompts[i], ref.outputs[i]


def oracle_llm(path, prompt, continuation, k=5) -> LLM:
    llm = LLM(str(path), stage=6, dtype="float32", max_model_len=256, speculative_config=ngram(k))
    llm.llm_engine.drafter.proposer = OracleProposer(prompt, continuation)
    return llm


def test_stop_token_inside_an_accepted_run_cuts_it_there(oracle_case):
    """Every draft right (k = 5): a stop token id ends the output exactly at its first
    occurrence, inside the step's accepted run (the sampler accepted more than was kept), and
    max_tokens exactly at the limit."""
    path, prompt, full = oracle_case
    llm = oracle_llm(path, prompt, full)
    records = spec_steps(llm)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=len(full)), use_tqdm=False)
    assert token_ids(out) == [full]
    assert llm.stats.spec_decoding.acceptance_rate == 1.0 and llm.stats.num_forward_passes < len(full) / 3
    cut_inside = 0
    for stop in dict.fromkeys(full):
        records.clear()
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=len(full), stop_token_ids=[stop]),
                           use_tqdm=False)
        first = full.index(stop)
        assert token_ids(out) == [full[: first + 1]]
        assert (out[0].outputs[0].finish_reason, out[0].outputs[0].stop_reason) == ("stop", stop)
        last = records[-1]
        cut_inside += last.spec_decoding_stats.num_accepted_tokens > last.rows[0].num_accepted_tokens
    assert cut_inside > 0
    for m in range(1, 12):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=m), use_tqdm=False)
        assert token_ids(out) == [full[:m]] and out[0].outputs[0].finish_reason == "length"


def test_stop_string_inside_an_accepted_run_matches_plain(oracle_case):
    """A stop string ends tokens and text as without speculation, also inside an accepted run
    (the tokens after the one that completes it are dropped)."""
    path, prompt, full = oracle_case
    plain = LLM(str(path), stage=6, dtype="float32", max_model_len=256)
    spec = oracle_llm(path, prompt, full)
    text = plain.get_tokenizer().decode(full)
    stops = sorted({text[i : i + 2] for i in range(1, len(text) - 2, 2) if text[i : i + 2].strip()})
    stops = random.Random(0).sample(stops, min(12, len(stops)))
    cut = 0
    for stop in stops:
        params = SamplingParams(temperature=0, max_tokens=len(full), stop=[stop])
        a = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        b = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (list(b.token_ids), b.text, b.finish_reason, b.stop_reason) == \
            (list(a.token_ids), a.text, a.finish_reason, a.stop_reason)
        cut += a.finish_reason == "stop"
    assert cut > 3


# -- random sampling: the rejection rule keeps the target distribution ---------------------------------

def total_variation(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=p.numel()).double()
    return 0.5 * (counts / counts.sum() - p.double()).abs().sum().item()


def first_and_second_tokens(p: torch.Tensor, drafts: list[int], num_rows: int, seed: int):
    """Run the batched rule on `num_rows` copies of one row: target p [k+1, V], one-hot drafts."""
    g = torch.Generator().manual_seed(seed)
    k, vocab = len(drafts), p.shape[-1]
    tokens, num = rejection_sample(
        p.expand(num_rows, k + 1, vocab), torch.tensor([drafts]).expand(num_rows, k),
        torch.full((num_rows,), k), torch.rand(num_rows, k, generator=g),
        torch.empty(num_rows, vocab).exponential_(generator=g))
    assert ((num >= 1) & (num <= k + 1)).all()
    return tokens, num


TARGET_LOGITS = torch.tensor([[2.0, 1.5, 0.3, 0.0, -0.5, -1.0, 0.8, 0.1],
                              [0.0, 2.5, -1.0, 1.0, 0.5, 0.0, -2.0, 1.2],
                              [1.0, 0.0, 0.5, -0.5, 2.0, 0.0, 0.3, -1.0]])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_rejection_sample_keeps_the_target_distribution(temperature):
    """200k rows: the first committed token ~ p_1 whatever the draft, and the second (after an
    accepted first draft) ~ p_2. TV below 0.01 (its sampling noise here is ~0.002)."""
    p = torch.softmax(TARGET_LOGITS / temperature, dim=-1)
    for drafts in ([1, 3], [4, 1]):  # a likely and an unlikely first draft
        tokens, num = first_and_second_tokens(p, drafts, 200_000, seed=int(temperature * 10))
        assert total_variation(tokens[:, 0], p[0]) < 0.01
        if drafts[0] == 1:  # accepted often enough to judge the second token
            second = tokens[num >= 2][:, 1]  # rows that accepted the first draft
            assert second.numel() > 5000 and total_variation(second, p[1]) < 0.015


def test_rejection_sample_without_the_residual_fails(monkeypatch):
    """The mutation: on a rejection, draw from p itself instead of p without the draft. The
    draft then comes out with probability p(d) + (1 - p(d)) p(d): the same test must fail."""
    monkeypatch.setattr(rejection_sampler, "residual", lambda probs, rejected, draft_ids: probs)
    p = torch.softmax(TARGET_LOGITS, dim=-1)
    tokens, _ = first_and_second_tokens(p, [1, 3], 200_000, seed=1)
    assert total_variation(tokens[:, 0], p[0]) > 0.1


def make_requests(count: int, params: SamplingParams, output: list[int]) -> list[Request]:
    requests = []
    for i in range(count):
        r = Request(f"r{i}", [1, 2, 3], params, arrival_time=0.0)
        for t in output:
            r.append_output_token(t)
        requests.append(r)
    return requests


@pytest.mark.parametrize("temperature", [0.7])
def test_rejection_sampler_matches_the_plain_samplers_distribution(temperature):
    """Through the engine's `RejectionSampler`: the target at each position is what the plain
    `Sampler` would draw from there (temperature, top-k, repetition penalty with the earlier
    drafts counted as output). The first token against the plain sampler's own empirical
    distribution on the same logits; TV of two 2000-sample histograms (noise ~0.03)."""
    params = SamplingParams(temperature=temperature, top_k=6, repetition_penalty=1.3)
    sampler = Sampler([], torch.Generator().manual_seed(0))
    n = 2000
    requests = make_requests(n, params, [0, 1])
    logits = TARGET_LOGITS[:2].repeat(n, 1)  # rows 2i, 2i+1: request i's two positions
    spec = RejectionSampler(sampler)(logits, requests, [[1]] * n)
    first = torch.tensor([t[0] for t in spec])
    plain = torch.tensor(sampler(TARGET_LOGITS[:1].repeat(n, 1), requests))
    p_plain = torch.bincount(plain, minlength=8).double() / n
    assert total_variation(first, p_plain) < 0.07
    # the second token, after accepting draft 1: penalties now count the draft as output
    after = make_requests(n, params, [0, 1, 1])
    plain2 = torch.tensor(sampler(TARGET_LOGITS[1:2].repeat(n, 1), after))
    second = torch.tensor([t[1] for t in spec if len(t) == 2])
    assert second.numel() > 300
    assert total_variation(second, torch.bincount(plain2, minlength=8).double() / n) < 0.1


def test_greedy_rows_take_the_processed_argmax():
    """Greedy rows with a penalty (not the fast path): accepted while draft == the argmax of
    the processed logits, the drafts before a position counted as output."""
    params = SamplingParams(temperature=0, presence_penalty=0.5)
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0], [0.0, 3.0, 2.9, 0.0], [5.0, 0.0, 0.0, 0.0]])
    sampler = RejectionSampler(Sampler([], torch.Generator()))
    # position 1: argmax 1 == d1; position 2: d1 = 1 is now output, penalised: 2 == d2; bonus 0
    assert sampler(logits, make_requests(1, params, []), [[1, 2]]) == [[1, 2, 0]]
    # 1 already output: penalised at position 1 too, so d1 = 1 is rejected and 2 taken
    assert sampler(logits, make_requests(1, params, [1]), [[1, 2]]) == [[2]]


def test_seeded_request_does_not_depend_on_its_batch(repeating_model):
    path, _ = repeating_model
    llm = LLM(str(path), stage=6, dtype="float32", max_model_len=256, speculative_config=ngram(3))
    # a low temperature on this flat-logit model: still sampled, but its loop is likely enough that
    # drafts are accepted (and so the stream of random numbers depends on them)
    seeded = SamplingParams(temperature=0.05, top_p=0.95, seed=7, max_tokens=30, ignore_eos=True)
    alone = token_ids(llm.generate([REPEATING_PROMPTS[0]], seeded, use_tqdm=False))[0]
    others = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    batch = llm.generate(REPEATING_PROMPTS + [REPEATING_PROMPTS[0]], [others, others, others, seeded],
                         use_tqdm=False)
    assert token_ids(batch)[3] == alone
    assert llm.stats.spec_decoding.num_accepted_tokens > 0


def test_seeded_n_children_equal_their_seeds_alone(repeating_model):
    path, _ = repeating_model
    llm = LLM(str(path), stage=6, dtype="float32", max_model_len=256, speculative_config=ngram(3))
    prompt = REPEATING_PROMPTS[2]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=20, ignore_eos=True)
    together = [list(c.token_ids) for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    alone = [token_ids(llm.generate([prompt], SamplingParams(temperature=1.0, seed=11 + i, max_tokens=20,
                                                               ignore_eos=True), use_tqdm=False))[0]
             for i in range(3)]
    assert together == alone


# -- the n-gram proposer ---------------------------------------------------------------------------------

def plain_ngram(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The rule written as loops: the longest n first, then its most recent earlier occurrence."""
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=40), st.integers(1, 3), st.integers(0, 3),
       st.integers(1, 5))
def test_ngram_lookup_matches_the_loop(tokens, lo, extra, k):
    assert ngram_lookup(tokens, lo, lo + extra, k) == plain_ngram(tokens, lo, lo + extra, k)


# token ids whose int32 bytes overlap when shifted (256 = 00 01 00 00, 65536 = 00 00 01 00, ...):
# a byte search that accepted a hit straddling two tokens would find n-grams that never occurred
STRADDLING = [0, 1, 256, 65536, 16777216, 16843009, 257]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(STRADDLING), min_size=1, max_size=40), st.integers(1, 3), st.integers(0, 3),
       st.integers(1, 5), st.integers(1, 6))
def test_request_tokens_lookup_matches_the_loop(tokens, lo, extra, k, grow):
    """The proposer's byte search (appended to as the request grows) against the rule."""
    request = SimpleNamespace(all_token_ids=[])
    mirror = RequestTokens(request)  # type: ignore[arg-type]
    for end in list(range(1, len(tokens), grow)) + [len(tokens)]:
        request.all_token_ids = tokens[:end]
        expected = plain_ngram(tokens[:end], lo, lo + extra, k)
        assert mirror.lookup(lo, lo + extra, k) == expected


def test_ngram_lookup_examples():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 1, 4, 3) == [7, 1, 2]  # most recent
    assert ngram_lookup([1, 2, 3, 4, 5], 1, 4, 3) == []  # nothing repeats
    assert ngram_lookup([4, 4, 4], 1, 4, 3) == [4]  # the suffix's own tail follows
    assert ngram_lookup([1, 2, 8, 2, 6, 1, 2], 2, 2, 2) == [8, 2]  # n = 1 is not looked up


# -- spec x chunked prefill x prefix caching x preemption x abort ------------------------------------------

@pytest.fixture(scope="module")
def stress_engine(repeating_model):
    """Stage 06 with chunked prefill (budget 13 tokens a step), 10 KV blocks of 16 tokens (preempts
    with three or four requests), n-gram k=3; and the greedy HF references, computed once."""
    config = EngineConfig.for_stage(
        6, dtype="float32", max_model_len=128, max_num_batched_tokens=13, max_num_seqs=4,
        kv_cache_memory=10 * 16 * 512, speculative_config=ngram(3))
    return LLMEngine(str(repeating_model[0]), config), {}


STRESS_IDS = itertools.count()
STRESS_PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 5, [5, 6, 7, 8, 9, 10, 11] * 5 + [12, 13],
                  [20, 30, 40] * 8, list(range(3, 40)), [5, 6, 7, 8, 9, 10, 11] * 3]


def test_stress_engine_preempts_hits_and_accepts(stress_engine, repeating_model):
    """The configuration the hypothesis test below draws from really exercises every part:
    all five prompts at once preempt, hit the prefix cache and accept drafts; HF tokens."""
    engine, _ = stress_engine
    _, hf = repeating_model
    before = engine.stats.num_preemptions, engine.stats.prefix_cache.hits, engine.stats.spec_decoding.num_accepted_tokens
    for i, prompt in enumerate(STRESS_PROMPTS):
        engine.add_request(f"all{i}", prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
    assert [done[f"all{i}"] for i in range(len(STRESS_PROMPTS))] == \
        [hf_greedy(hf, p, 30, min_new_tokens=30) for p in STRESS_PROMPTS]
    after = engine.stats.num_preemptions, engine.stats.prefix_cache.hits, engine.stats.spec_decoding.num_accepted_tokens
    assert all(a > b for a, b in zip(after, before))
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.block_pool.num_blocks


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(STRESS_PROMPTS) - 1), st.integers(1, 30)), min_size=1, max_size=6),
       st.lists(st.integers(0, 40), max_size=3), st.randoms(use_true_random=False))
def test_invariants_with_chunks_prefix_cache_preemption_and_abort(stress_engine, repeating_model, requests,
                                                                  abort_steps, rnd):
    engine, references = stress_engine
    _, hf = repeating_model
    ids = []
    try:
        run_stress_example(engine, references, hf, requests, abort_steps, rnd, ids)
    finally:  # a failing example must not leave requests behind for the next one
        engine.abort_requests([rid for rid, _, _ in ids])


def run_stress_example(engine, references, hf, requests, abort_steps, rnd, ids) -> None:
    for i, (p, m) in enumerate(requests):
        rid = f"s{next(STRESS_IDS)}"
        engine.add_request(rid, STRESS_PROMPTS[p], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        ids.append((rid, p, m))
    seen: dict[str, list[int]] = {}
    finished = {}
    aborted = set()
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        scheduler = engine.scheduler
        for r in [*scheduler.running, *scheduler.waiting]:
            before = seen.get(r.request_id, [])
            assert r.output_token_ids[: len(before)] == before  # committed tokens never roll back
            assert r.num_computed_tokens <= r.num_tokens
            seen[r.request_id] = list(r.output_token_ids)
        if step in abort_steps:
            live = [rid for rid, _, _ in ids if rid in engine.output_processor.parents]
            if live:
                victim = rnd.choice(live)
                engine.abort_request(victim)
                aborted.add(victim)
        assert step < 500
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.block_pool.num_blocks  # every block returned
    assert not kv.req_to_blocks and not engine.drafter.known  # nothing held for anyone
    for rid, p, m in ids:
        if rid in aborted:
            continue
        key = (p, m)
        if key not in references:
            references[key] = hf_greedy(hf, STRESS_PROMPTS[p], m, min_new_tokens=m)
        assert finished[rid] == references[key]


# -- configuration and bad input -----------------------------------------------------------------------------

# -- disable_by_batch_size: no drafts while the batch is large ----------------------------------------

def test_disable_by_batch_size_drafts_only_below_it(repeating_model):
    """With disable_by_batch_size=2, the steps that run two or three requests verify no drafts
    (the threshold was reached when they were proposed), the steps of the last request alone
    do; without it the three-row steps draft too. The tokens are HF's either way."""
    path, hf = repeating_model
    max_tokens = [8, 16, 40]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    expected = [hf_greedy(hf, p, m, min_new_tokens=m) for p, m in zip(REPEATING_PROMPTS, max_tokens)]
    drafted_rows = {}
    for threshold in (None, 2):
        spec = {**ngram(3), "disable_by_batch_size": threshold}
        llm = LLM(str(path), stage=6, dtype="float32", max_model_len=256, speculative_config=spec)
        records = spec_steps(llm)
        assert token_ids(llm.generate(REPEATING_PROMPTS, params, use_tqdm=False)) == expected
        drafted_rows[threshold] = {len(r.rows) for r in records if any(row.num_draft_tokens for row in r.rows)}
        assert llm.stats.spec_decoding.num_accepted_tokens > 0
    assert drafted_rows[None] == {1, 2, 3}
    assert drafted_rows[2] == {1}
    assert "off from batch 2" in llm.llm_engine.description["summary"]


@pytest.mark.parametrize("bad, field", [
    (dict(method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(method="ngram", num_speculative_tokens=17), "num_speculative_tokens"),
    (dict(method="ngram", num_speculative_tokens=True), "num_speculative_tokens"),
    (dict(method="ngram", num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
    (dict(method="ngram", num_speculative_tokens=2, prompt_lookup_min=0), "prompt_lookup_min"),
    (dict(method="eagle", num_speculative_tokens=2), "method"),
    (dict(method="draft_model", num_speculative_tokens=2), "model"),
    (dict(method="ngram", num_speculative_tokens=2, model="x"), "model"),
    (dict(method="ngram"), "num_speculative_tokens"),
    (dict(method="ngram", num_speculative_tokens=2, k=3), "unknown"),
    (dict(method="ngram", num_speculative_tokens=2, disable_by_batch_size=1), "disable_by_batch_size"),
    (dict(method="ngram", num_speculative_tokens=2, disable_by_batch_size=0), "disable_by_batch_size"),
    (dict(method="ngram", num_speculative_tokens=2, disable_by_batch_size="4"), "disable_by_batch_size"),
    (dict(method="ngram", num_speculative_tokens=2, disable_by_batch_size=True), "disable_by_batch_size"),
    (dict(method="ngram", num_speculative_tokens=2, draft_confidence_threshold=0.5), "draft_confidence_threshold"),
    (dict(method="draft_model", model="x", num_speculative_tokens=2, draft_confidence_threshold=1.0),
     "draft_confidence_threshold"),
    (dict(method="draft_model", model="x", num_speculative_tokens=2, draft_confidence_threshold=0),
     "draft_confidence_threshold"),
    ("ngram", "dict"),
])
def test_bad_speculative_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig.for_stage(6, speculative_config=bad)


def test_stage_01_and_for_stage_9_refused():
    with pytest.raises(ValueError, match="enable_continuous_batching"):
        EngineConfig.for_stage(1, speculative_config=ngram(2))
    with pytest.raises(ValueError, match="speculative_config"):
        EngineConfig.for_stage(9)


def test_prompt_logprobs_with_speculation(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=128, speculative_config=ngram(2))
    out = llm.generate([[1, 2, 3, 1, 2]], SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1),
                       use_tqdm=False)
    assert len(out[0].prompt_logprobs) == 5
    assert "+ speculative ngram k=2" in llm.llm_engine.description["summary"]


# -- log-probabilities with speculation: the target's, at each committed token's position ---------------

LOGPROB_PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 6, [20, 30, 40] * 10, list(range(3, 40))]


def logprobs_run(path, spec, params: SamplingParams, **engine_args) -> tuple[list, LLM]:
    llm = LLM(str(path), stage=6, dtype="float32", max_model_len=256, speculative_config=spec, **engine_args)
    return [o.outputs[0] for o in llm.generate(LOGPROB_PROMPTS, params, use_tqdm=False)], llm


def assert_same_logprobs(plain: list, spec: list, atol: float) -> None:
    """The same tokens, the same ids and ranks at every position, log-probabilities within
    `atol` (0: bitwise), the same cumulative log-probability."""
    for a, b in zip(plain, spec):
        assert list(b.token_ids) == list(a.token_ids)
        assert len(b.logprobs) == len(b.token_ids)
        for i, (x, y) in enumerate(zip(a.logprobs, b.logprobs)):
            assert list(y) == list(x) and [lp.rank for lp in y.values()] == [lp.rank for lp in x.values()], i
            for t in x:
                assert y[t].logprob == pytest.approx(x[t].logprob, abs=atol, rel=0), (i, t)
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=max(atol * len(a.logprobs), 1e-12))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_logprobs_with_speculation_equal_the_plain_run_and_hf(tiny_checkpoints, hf_qwen3, method):
    """Greedy with logprobs=3, drafts accepted and rejected in the run: every committed token's
    position holds the target's log-probabilities there, as the run without speculation returns
    them (fp32 tolerance: a verify row of 1 + k tokens is computed by another attention path than
    a one-token decode), and as HF's log_softmax of its logits."""
    spec = ngram(3) if method == "ngram" else {
        "method": "draft_model", "model": str(tiny_checkpoints["llama"]), "num_speculative_tokens": 3}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    plain, _ = logprobs_run(tiny_checkpoints["qwen3"], None, params)
    got, llm = logprobs_run(tiny_checkpoints["qwen3"], spec, params)
    s = llm.stats.spec_decoding
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # accepted and rejected drafts both
    assert_same_logprobs(plain, got, atol=1e-5)
    for prompt, out in zip(LOGPROB_PROMPTS, got):
        ref = torch.log_softmax(hf_logits(hf_qwen3, prompt + list(out.token_ids)), dim=-1)[len(prompt) - 1 : -1]
        for i, (token, position) in enumerate(zip(out.token_ids, out.logprobs)):
            top = ref[i].topk(3).indices.tolist()
            assert set(position) == {token, *top}, i
            for t, lp in position.items():
                assert lp.logprob == pytest.approx(ref[i, t].item(), abs=1e-4), (i, t)


@pytest.mark.parametrize("mode", ["processed_logprobs", "processed_logits"])
def test_processed_logprobs_count_the_drafts_before_as_output(tiny_qwen3, mode):
    """The processed modes score each committed token after the penalties of the tokens before
    it, drafts included (`SpeculatedRequest`): the same numbers as the plain run."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3, repetition_penalty=1.3,
                            frequency_penalty=0.05)
    plain, _ = logprobs_run(tiny_qwen3, None, params, logprobs_mode=mode)
    got, llm = logprobs_run(tiny_qwen3, ngram(3), params, logprobs_mode=mode)
    assert llm.stats.spec_decoding.num_accepted_tokens > 0
    assert_same_logprobs(plain, got, atol=1e-5)


def test_batch_invariant_logprobs_are_bitwise_with_speculation(tiny_qwen3):
    """In the batch-invariant mode every query goes through one attention kernel, so a verify
    row's positions are bitwise the one-token decodes': the same log-probabilities exactly."""
    from folovllm._custom_ops import ops_available

    if not ops_available():
        pytest.skip("the CPU kernels cannot be built here")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    plain, _ = logprobs_run(tiny_qwen3, None, params, batch_invariant=True)
    got, llm = logprobs_run(tiny_qwen3, ngram(3), params, batch_invariant=True)
    assert 0 < llm.stats.spec_decoding.num_accepted_tokens < llm.stats.spec_decoding.num_draft_tokens
    assert_same_logprobs(plain, got, atol=0.0)
    assert [o.logprobs for o in got] == [o.logprobs for o in plain]


def test_sampled_logprobs_with_speculation_equal_hf(tiny_qwen3, hf_qwen3):
    """Random sampling (seeded, temperature 0.8): the tokens differ from a run without drafts
    (other random numbers), but each one's raw log-probabilities are HF's at its position."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True, logprobs=2)
    got, llm = logprobs_run(tiny_qwen3, ngram(3), params)
    assert llm.stats.spec_decoding.num_accepted_tokens > 0
    for prompt, out in zip(LOGPROB_PROMPTS, got):
        ref = torch.log_softmax(hf_logits(hf_qwen3, prompt + list(out.token_ids)), dim=-1)[len(prompt) - 1 : -1]
        assert len(out.logprobs) == len(out.token_ids) == 24
        for i, (token, position) in enumerate(zip(out.token_ids, out.logprobs)):
            assert set(position) == {token, *ref[i].topk(2).indices.tolist()}
            assert position[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)),
                                                       abs=1e-4)


def test_logprobs_stop_inside_an_accepted_run(oracle_case):
    """A stop token, a stop string or max_tokens inside an accepted run: the positions scored
    after the cut are dropped, the cumulative log-probability is the plain run's."""
    path, prompt, full = oracle_case
    plain = LLM(str(path), stage=6, dtype="float32", max_model_len=256)
    spec = oracle_llm(path, prompt, full)
    text = plain.get_tokenizer().decode(full[:12])
    cases = [dict(stop_token_ids=[full[7]]), dict(max_tokens=9), dict(stop=[text[len(text) // 2 :][:2]])]
    for case in cases:
        params = SamplingParams(temperature=0, logprobs=1, **{"max_tokens": len(full), **case})
        a = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        b = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert len(a.token_ids) < len(full) and list(b.token_ids) == list(a.token_ids), case
        assert_same_logprobs([a], [b], atol=1e-5)


@pytest.mark.parametrize("draft_arch", ["qwen3", "llama"], ids=["same_model", "other_model"])
def test_draft_model_speculation_matches_hf(greedy_reference, tiny_checkpoints, draft_arch):
    """The draft-model proposer through the engine: the target's greedy tokens are HF's whatever
    the draft proposes. With the target as its own draft every draft is accepted (the drafts are
    the target's own greedy tokens), so the run commits k + 1 tokens per step; with another
    model of the same vocabulary most are rejected, and the tokens still do not change."""
    ref = greedy_reference("qwen3")
    spec = {"method": "draft_model", "model": str(tiny_checkpoints[draft_arch]), "num_speculative_tokens": 3}
    llm = LLM(str(ref.path), stage=6, dtype="float32", max_model_len=256, speculative_config=spec)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in ref.max_tokens]
    assert token_ids(llm.generate(ref.prompts, params, use_tqdm=False)) == ref.outputs
    s = llm.stats.spec_decoding
    assert s.num_draft_tokens > 0
    if draft_arch == "qwen3":
        assert s.num_accepted_tokens == s.num_draft_tokens
    else:
        assert s.num_accepted_tokens < s.num_draft_tokens
    assert llm.llm_engine.kv_cache_manager.num_used_blocks == 0


def test_draft_model_with_another_vocabulary_is_refused(tiny_qwen3, tmp_path):
    import json
    import shutil

    draft = shutil.copytree(tiny_qwen3, tmp_path / "draft")  # the same model, another vocabulary
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 128}))
    with pytest.raises(ValueError, match="speculative_config.model"):
        LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=128,
            speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2})


def test_cli_speculative_config(tiny_qwen3, capsys):
    from folovllm.entrypoints.cli import main

    rc = main(["generate", "--model", str(tiny_qwen3), "--dtype", "float32", "--prompt", "the engine",
               "--max-tokens", "4", "--temperature", "0", "--speculative-config",
               '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert rc == 0
    rc = main(["generate", "--model", str(tiny_qwen3), "--prompt", "x", "--speculative-config",
               '{"method": "ngram", "num_speculative_tokens": 99}'])
    assert rc == 2 and "num_speculative_tokens" in capsys.readouterr().err


def test_metrics_use_vllms_names():
    from folovllm.engine.metrics import PrometheusMetrics
    from folovllm.engine.stats import SchedulerStats
    from folovllm.spec_decode.metrics import SpecDecodingStats

    spec = SpecDecodingStats.new(3)
    spec.observe_draft(3, 2)
    spec.observe_draft(2, 0)
    metrics = PrometheusMetrics("m", 100)
    metrics.record(SchedulerStats(1, 0.0, 1.0, [], [], [], [], 1, 6, 0, 2, 3, 1, 16, 8, 0,
                                  spec_decoding_stats=spec))
    text = metrics.render().decode()
    assert 'folovllm:spec_decode_num_drafts_total{model_name="m"} 2.0' in text
    assert 'folovllm:spec_decode_num_draft_tokens_total{model_name="m"} 5.0' in text
    assert 'folovllm:spec_decode_num_accepted_tokens_total{model_name="m"} 2.0' in text
    assert 'folovllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="1"} 1.0' in text


def test_server_logprobs_with_speculation(repeating_model):
    """`folovllm serve --speculative-config`: completions with logprobs, streamed and not, give
    the tokens and log-probabilities of the engine without speculation (fp32 tolerance); a
    streamed chunk may carry several tokens (an accepted run) and their positions."""
    from folovllm.entrypoints.openai.serving_engine import ServerOptions
    from tests.test_server_hardening import ENGINE_ARGS, MODEL, STAGE, running_server
    from tests.test_server_logprobs import as_dict, expected_logprobs

    path = repeating_model[0]  # its greedy output loops: drafts are accepted
    prompt = "a b c a b c a b c a b c a b"
    offline = LLM(str(path), stage=STAGE, **ENGINE_ARGS)
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    expected = expected_logprobs(ref.logprobs, ref.token_ids, lambda t: offline.get_tokenizer().decode([t]))
    body = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=2, ignore_eos=True)

    def close(got: dict) -> None:
        assert {k: got[k] for k in ("tokens", "text_offset")} == {k: expected[k] for k in ("tokens", "text_offset")}
        assert got["token_logprobs"] == pytest.approx(expected["token_logprobs"], abs=1e-5)
        for g, e in zip(got["top_logprobs"], expected["top_logprobs"]):
            assert g.keys() == e.keys() and list(g.values()) == pytest.approx(list(e.values()), abs=1e-5)

    with running_server(path, options=ServerOptions(), speculative_config=ngram(3)) as server:
        out = server.post("/v1/completions", body).json()
        assert out["choices"][0]["text"] == ref.text
        close(as_dict(out["choices"][0]["logprobs"]))
        events = [e for e in server.events("/v1/completions", {**body, "stream": True}) if e != "[DONE]"]
        joined: dict[str, list] = {k: [] for k in expected}
        for event in events:
            for choice in event["choices"]:
                for k, v in as_dict(choice["logprobs"] or {k: [] for k in expected}).items():
                    joined[k] += v
        close(joined)
        assert max(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e["choices"] and e["choices"][0]["logprobs"]) > 1
        assert server.engine.stats.spec_decoding.num_accepted_tokens > 0
