"""Sampling and stopping: every `SamplingParams` field does what vLLM documents.

Greedy-equivalent settings and stop conditions are checked against HF transformers (generate or
a plain argmax loop over its forward); the logit processors against the formulas, written out
here on hand-made logits; sampling itself against softmax, statistically.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.core.request import Request
from folovllm.worker.sampler import Sampler, apply_top_k_top_p
from tests.helpers import hf_greedy, hf_greedy_ignore_eos

SEARCH_STEPS = 12


def _random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab_size) for _ in range(n)]  # no special tokens


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=16)


@pytest.fixture(scope="module")
def eos(hf_qwen3):
    """The EOS id the checkpoint declares (generation_config.json, as HF generate uses it)."""
    eos = hf_qwen3.generation_config.eos_token_id
    assert isinstance(eos, int)
    return eos


@pytest.fixture(scope="module")
def eos_case(hf_qwen3, eos):
    """A prompt whose HF greedy continuation emits EOS as its k-th token, k >= 3.

    Found by running greedy for every one-token prompt at once (a batched argmax loop over HF's
    forward), so the search is deterministic and needs no luck."""
    vocab = hf_qwen3.config.vocab_size
    ids = torch.arange(vocab)[:, None]
    with torch.no_grad():
        for _ in range(SEARCH_STEPS):
            ids = torch.cat([ids, hf_qwen3(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for token in range(3, vocab):
        hits = (ids[token, 1:] == eos).nonzero()
        if len(hits) and hits[0].item() >= 2:
            prompt, eos_index = [token], hits[0].item()
            assert hf_greedy(hf_qwen3, prompt, 20) == ids[token, 1 : eos_index + 2].tolist()
            return prompt, eos_index
    pytest.fail("no one-token prompt whose greedy output contains EOS after 3+ tokens")


@pytest.fixture(scope="module")
def plain_case(hf_qwen3, eos):
    """A prompt whose 30 greedy tokens contain no EOS, and those tokens (HF)."""
    for seed in range(50):
        prompt = _random_prompt(hf_qwen3.config.vocab_size, 9, seed)
        ref = hf_greedy(hf_qwen3, prompt, 30)
        if eos not in ref and len(set(ref)) > 10:
            return prompt, ref
    pytest.fail("no prompt with a diverse, EOS-free greedy output")


def _one(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0]


# -- settings that must reduce to greedy ----------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-6)],
    ids=["top_k=1", "top_p=1e-6", "min_p=1", "temperature=1e-6"],
)
def test_degenerate_sampling_equals_hf_greedy(llm, plain_case, params):
    prompt, ref = plain_case
    params = {"temperature": 1.5, **params}
    assert _one(llm, prompt, max_tokens=30, **params).token_ids == ref


# -- seeds ----------------------------------------------------------------------------------


def test_seed_reproduces_alone_and_inside_a_batch(llm, plain_case):
    prompt, greedy = plain_case
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert len(alone) == 24 and alone != greedy[:24]  # it really sampled
    assert llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids == alone
    # In a batch with a longer prompt (so this row is padded), unseeded sampling and greedy.
    others = [_random_prompt(512, 40, 1), _random_prompt(512, 3, 2)]
    outs = llm.generate(
        [others[0], prompt, others[1]],
        [SamplingParams(temperature=0.8, max_tokens=30), seeded, SamplingParams(temperature=0.0, max_tokens=5)],
        use_tqdm=False,
    )
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=1235, max_tokens=24)
    assert llm.generate(prompt, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_engine_seed_reproduces_unseeded_sampling(tiny_qwen3, plain_case):
    prompt, _ = plain_case
    params = SamplingParams(temperature=1.0, max_tokens=20)

    def run(seed):
        llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", seed=seed)
        return llm.generate([prompt, prompt], params, use_tqdm=False)

    a, b, c = run(7), run(7), run(8)
    tokens = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)
    assert tokens(a)[0] != tokens(a)[1]  # two unseeded requests draw different noise


def test_n_completions(llm, plain_case):
    prompt, greedy = plain_case
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=16)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out.outputs]
    assert all(len(s) == 16 for s in samples)
    assert len({tuple(s) for s in samples}) == 3  # seeded samples differ from each other
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples
    # n greedy samples are n copies of the greedy output.
    out = llm.generate(prompt, SamplingParams(n=2, temperature=0.0, max_tokens=30), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [greedy, greedy]


# -- stopping -------------------------------------------------------------------------------


def test_max_tokens_finishes_with_length(llm, plain_case):
    prompt, ref = plain_case
    out = _one(llm, prompt, temperature=0.0, max_tokens=7)
    assert out.token_ids == ref[:7]
    assert out.finish_reason == "length" and out.stop_reason is None


def test_max_model_len_finishes_with_length(tiny_qwen3, hf_qwen3, plain_case):
    prompt, _ = plain_case  # 9 tokens
    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_model_len=20)
    out = _one(llm, prompt, temperature=0.0, max_tokens=None, ignore_eos=True)
    assert len(prompt) + len(out.token_ids) == 20
    assert out.token_ids == hf_greedy_ignore_eos(hf_qwen3, prompt, 20 - len(prompt))
    assert out.finish_reason == "length"


def test_eos_stops_with_stop(llm, eos_case, eos):
    prompt, k = eos_case
    out = _one(llm, prompt, temperature=0.0, max_tokens=20)
    assert len(out.token_ids) == k + 1 and out.token_ids[-1] == eos
    assert out.finish_reason == "stop" and out.stop_reason is None  # EOS is not a stop_reason
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode([eos]) not in out.text
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_ignore_eos_generates_past_eos(llm, hf_qwen3, eos_case, eos):
    prompt, k = eos_case
    out = _one(llm, prompt, temperature=0.0, max_tokens=k + 6, ignore_eos=True)
    assert out.token_ids == hf_greedy_ignore_eos(hf_qwen3, prompt, k + 6)
    assert out.token_ids[k] == eos and len(out.token_ids) == k + 6
    assert out.finish_reason == "length"


def test_min_tokens_suppresses_eos(llm, hf_qwen3, eos_case, eos):
    prompt, k = eos_case
    min_tokens = k + 3
    out = _one(llm, prompt, temperature=0.0, max_tokens=20, min_tokens=min_tokens)
    # HF's min_new_tokens masks EOS the same way.
    assert out.token_ids == hf_greedy(hf_qwen3, prompt, 20, min_new_tokens=min_tokens)
    assert eos not in out.token_ids[:min_tokens]
    assert len(out.token_ids) >= min_tokens


def test_stop_token_ids(llm, plain_case):
    prompt, ref = plain_case
    j = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # first occurrence at j
    stop = ref[j]
    out = _one(llm, prompt, temperature=0.0, max_tokens=30, stop_token_ids=[stop])
    assert out.token_ids == ref[: j + 1]  # the stop token is kept in token_ids ...
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == llm.get_tokenizer().decode(ref[:j])  # ... but not in the text


def test_min_tokens_suppresses_stop_token_ids(llm, hf_qwen3, plain_case, eos):
    prompt, ref = plain_case
    j = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    stop, min_tokens = ref[j], j + 2
    out = _one(llm, prompt, temperature=0.0, max_tokens=30, min_tokens=min_tokens,
               stop_token_ids=[stop])
    # HF: the stop id is one more EOS, masked like EOS until min_new_tokens.
    want = hf_greedy(hf_qwen3, prompt, 30, min_new_tokens=min_tokens, eos_token_id=[eos, stop])
    assert out.token_ids == want
    assert stop not in out.token_ids[:min_tokens]
    if want[-1] == stop:
        assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_string(llm, plain_case):
    prompt, ref = plain_case
    tokenizer = llm.get_tokenizer()
    full = tokenizer.decode(ref)

    def first_prefix_containing(s: str) -> int:
        return next(n for n in range(1, len(ref) + 1) if s in tokenizer.decode(ref[:n]))

    def spans_tokens(s: str) -> bool:
        """The stop string starts in an earlier token than the one that completes it, so only
        a search that looks back over the previous text can find it."""
        return full.find(s) < len(tokenizer.decode(ref[: first_prefix_containing(s) - 1]))

    # A 3-character ASCII stop string from the second half of the text, across a token boundary.
    stop = next(
        full[i : i + 3]
        for i in range(len(full) // 2, len(full) - 3)
        if full[i : i + 3].isascii() and full[i : i + 3].strip() and spans_tokens(full[i : i + 3])
    )
    cut = full.find(stop)
    assert cut > 0
    k = first_prefix_containing(stop)
    out = _one(llm, prompt, temperature=0.0, max_tokens=30, stop=[stop, "@@never@@"])
    assert out.text == full[:cut]
    assert out.token_ids == ref[:k]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # Stop strings that never occur change nothing.
    out = _one(llm, prompt, temperature=0.0, max_tokens=30, stop="@@never@@")
    assert out.text == full and out.token_ids == ref and out.finish_reason == "length"


# -- logit processors, against the formulas -------------------------------------------------


def _request(prompt, output, **params) -> Request:
    r = Request("r", prompt, SamplingParams(**params), arrival_time=0.0)
    for t in output:
        r.append_output_token(t)
    return r


class _GeneralPathSampler(Sampler):
    """The sampler with its plain-greedy shortcut turned off: every row takes the general path."""

    def plain_greedy(self, request: Request) -> bool:
        return False


def test_plain_greedy_shortcut_equals_general_path():
    """Rows that need no logit processing skip the copy and the per-row passes; on random logits
    that gives the tokens of the general path, and rows that do need processing never take it."""
    eos = 2
    plain = [
        _request([5, 6], [], temperature=0.0),
        _request([5, 6], [7], temperature=0.0, min_tokens=1, stop_token_ids=[4]),  # min reached
        _request([5, 6], [], temperature=0.0, min_tokens=3, ignore_eos=True),  # nothing banned
        _request([5, 6], [7, 7], temperature=0.0, max_tokens=9),
    ]
    needs_processing = [
        _request([5, 6], [], temperature=0.0, min_tokens=2),  # EOS banned for now
        _request([5, 6], [7], temperature=0.0, repetition_penalty=1.3),
        _request([5, 6], [7], temperature=0.0, presence_penalty=0.5),
        _request([5, 6], [7], temperature=0.7, seed=1),
    ]
    fast, general = Sampler([eos], torch.Generator()), _GeneralPathSampler([eos], torch.Generator())
    assert all(fast.plain_greedy(r) for r in plain)
    assert not any(fast.plain_greedy(r) for r in needs_processing)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(len(plain), 50, generator=g)
        assert fast(logits, plain) == general(logits, plain)


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    r = _request([0, 1], [3, 3], repetition_penalty=2.0)
    Sampler.apply_penalties(logits, [r])
    # Seen (prompt or output): 0, 1, 3. Positive divided, negative multiplied; others unchanged.
    assert logits.tolist() == [[1.0, -2.0, 0.5, -6.0, 4.0, 1.0]]


def test_frequency_and_presence_penalty_formula():
    base = [2.0, -1.0, 0.5, -3.0, 4.0, 1.0]
    logits = torch.tensor([base, base, base])
    rows = [
        _request([0, 1], [3, 5, 5, 5], frequency_penalty=0.5, presence_penalty=0.25),
        _request([0, 1], [3, 5, 5, 5], frequency_penalty=-0.5, presence_penalty=-1.0),
        _request([0, 1], [3, 5, 5, 5]),  # defaults: untouched
    ]
    Sampler.apply_penalties(logits, rows)
    counts = {3: 1, 5: 3}  # over the output only: prompt tokens 0 and 1 are not counted
    for row, (freq, pres) in enumerate([(0.5, 0.25), (-0.5, -1.0), (0.0, 0.0)]):
        want = [v - freq * counts.get(t, 0) - pres * (t in counts) for t, v in enumerate(base)]
        torch.testing.assert_close(logits[row], torch.tensor(want), rtol=0, atol=1e-6)


def test_penalties_combined_order():
    """Repetition first (on prompt + output), then frequency/presence (on output)."""
    base = [3.0, -2.0, 1.0, 0.0]
    logits = torch.tensor([base])
    r = _request([1], [0, 0, 2], repetition_penalty=1.5, frequency_penalty=0.2, presence_penalty=0.1)
    Sampler.apply_penalties(logits, [r])
    want = [3.0 / 1.5 - 0.2 * 2 - 0.1, -2.0 * 1.5, 1.0 / 1.5 - 0.2 - 0.1, 0.0]
    torch.testing.assert_close(logits[0], torch.tensor(want), rtol=0, atol=1e-6)


def test_penalties_in_bulk_equal_the_per_row_reference():
    """The batched penalties give bitwise the logits of the row-by-row reference, on random rows
    (each penalty alone, combined, none; outputs with repeats; tokens past the vocabulary)."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    choices = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.4), dict(presence_penalty=-0.7),
               dict(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=0.2), {}]
    for _ in range(30):
        vocab = rng.choice([7, 50])
        rows = [_request([rng.randrange(vocab + 3) for _ in range(rng.randrange(1, 12))],
                         [rng.randrange(vocab + 2) for _ in range(rng.randrange(0, 9))], **rng.choice(choices))
                for _ in range(rng.randrange(1, 7))]
        logits = torch.randn(len(rows), vocab, generator=g) * 3
        bulk, reference = logits.clone(), logits.clone()
        Sampler.apply_penalties(bulk, rows)
        Sampler.apply_penalties_per_row(reference, rows)
        assert torch.equal(bulk, reference)


def test_penalties_change_generation(llm, plain_case):
    prompt, ref = plain_case
    assert len(set(ref)) < len(ref)  # greedy repeats itself ...
    out = _one(llm, prompt, temperature=0.0, max_tokens=30, presence_penalty=2.0,
               frequency_penalty=2.0)
    assert out.token_ids != ref
    # ... and with strong penalties it repeats less.
    assert len(set(out.token_ids)) > len(set(ref))


def _reference_top_k_top_p(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """One row, the obvious way: sort, keep k, renormalise, keep while the mass before < p."""
    order = sorted(range(len(row)), key=lambda i: -row[i].item())
    if k > 0:
        order = order[:k]
    z = sum(math.exp(row[i].item()) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass < p:
            kept.append(i)
        mass += math.exp(row[i].item()) / z
    out = torch.full_like(row, float("-inf"))
    out[kept] = row[kept]
    return out


def test_top_p_boundary_is_inclusive():
    """top_p keeps the smallest set whose mass reaches p: with four equal tokens (exactly 0.25
    each in float32) top_p=0.5 keeps two, not three."""
    logits = torch.zeros(1, 4)
    got = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.5]))
    assert torch.isfinite(got).sum().item() == 2
    got = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.51]))
    assert torch.isfinite(got).sum().item() == 3


def test_top_k_top_p_against_reference():
    gen = torch.Generator().manual_seed(0)
    M, V = 48, 40
    logits = torch.randn(M, V, generator=gen) * 2
    top_k = torch.tensor([[0, 1, 3, 10, 40, 50][i % 6] for i in range(M)])
    top_p = torch.tensor([[1.0, 0.9, 0.5, 0.05, 0.99, 0.3, 0.7, 1e-6][i % 8] for i in range(M)])
    got = apply_top_k_top_p(logits, top_k, top_p)
    for i in range(M):
        want = _reference_top_k_top_p(logits[i], int(top_k[i]), float(top_p[i]))
        assert torch.equal(got[i], want), f"row {i}: k={int(top_k[i])} p={float(top_p[i])}"


# -- sampling follows the distribution ------------------------------------------------------


def _empirical(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    sampler = Sampler(eos_token_ids=[], generator=torch.Generator().manual_seed(0))
    request = _request([1], [], **params)
    tokens = sampler(logits_row.repeat(n, 1), [request] * n)
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).double() / n


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0])
    n = 20_000  # std of a frequency <= 0.0036: 0.015 is > 4 sigma
    for temperature in (1.0, 0.5, 2.0):
        freq = _empirical(logits, n, temperature=temperature)
        want = torch.softmax(logits.double() / temperature, -1)
        assert (freq - want).abs().max() < 0.015, (temperature, freq, want)


def test_truncated_sampling_follows_renormalised_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0])  # ranks: 3, 0, 1, 4, 2, 5
    n = 20_000
    probs = torch.softmax(logits.double(), -1)
    # top_k=3 keeps {3, 0, 1}; top_p=0.8 keeps tokens while the mass before them < 0.8.
    for params, keep in [
        (dict(top_k=3), [3, 0, 1]),
        (dict(top_p=0.8), [3, 0, 1]),  # mass before token 1: 0.57 + 0.21 = 0.78 < 0.8
        (dict(min_p=0.3), [3, 0]),  # p(0)/p(3) = 0.37 >= 0.3 > p(1)/p(3) = 0.165
    ]:
        freq = _empirical(logits, n, temperature=1.0, **params)
        want = torch.zeros_like(probs)
        want[keep] = probs[keep] / probs[keep].sum()
        assert freq[[i for i in range(6) if i not in keep]].sum() == 0, params
        assert (freq - want).abs().max() < 0.015, (params, freq, want)
