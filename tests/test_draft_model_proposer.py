"""`DraftModelProposer` (folovllm/spec_decode/draft_model.py) against HF transformers.

The oracle: a draft model's greedy drafts are its greedy continuation of the committed tokens,
which HF computes with a plain no-cache argmax loop (`hf_greedy_ignore_eos`). Whatever the
proposer's own KV cache did before (a prefill, drafts that were then rejected, a bonus token),
its next proposal must equal that continuation, and it must get there by computing only the
tokens its cache does not hold (counted by the proposer, checked against arithmetic here).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

from folovllm.config import EngineConfig
from folovllm.core.request import Request
from folovllm.sampling_params import SamplingParams
from folovllm.spec_decode.config import SpeculativeConfig
from folovllm.spec_decode.draft_model import DraftModelProposer
from tests.helpers import hf_greedy_ignore_eos, num_distinct

VOCAB = 512  # the tiny checkpoints' (tests/fixtures.py)


def _proposer(draft: Path, k: int, stage: int = 6, threshold: float | None = None,
              **overrides: Any) -> DraftModelProposer:
    spec = SpeculativeConfig(method="draft_model", num_speculative_tokens=k, model=str(draft),
                             draft_confidence_threshold=threshold)
    target = EngineConfig.for_stage(stage, dtype="float32", max_model_len=256, **overrides)
    return DraftModelProposer(spec, target, VOCAB)


def _request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=64), arrival_time=0.0)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.mark.parametrize("arch,stage", [("qwen3", 6), ("llama", 6), ("qwen2", 2)])
def test_proposal_is_the_drafts_greedy_continuation(
    tiny_checkpoints: dict[str, Path], hf_models: Callable[[str], Any], arch: str, stage: int
) -> None:
    proposer = _proposer(tiny_checkpoints[arch], k=5, stage=stage, block_size=4)
    prompts = [_prompt(n, seed=n) for n in (1, 9, 37)]
    expected = [hf_greedy_ignore_eos(hf_models(arch), p, 5) for p in prompts]
    got = [proposer.propose([_request(f"r{i}", p)], [5])[0] for i, p in enumerate(prompts)]
    assert got == expected
    assert num_distinct(expected) >= 8  # a draft that repeats one token would prove nothing


def test_after_partial_acceptance_no_reprefill(tiny_checkpoints: dict[str, Path],
                                               hf_models: Callable[[str], Any]) -> None:
    """Rejected drafts are rolled back by the longest common prefix, nothing is recomputed:
    the computed-token count grows by exactly what the cache did not hold."""
    hf = hf_models("qwen3")
    proposer = _proposer(tiny_checkpoints["qwen3"], k=4, block_size=4)
    prompt = _prompt(30, seed=1)
    req = _request("a", prompt)
    d = proposer.propose([req], [4])[0]
    assert d == hf_greedy_ignore_eos(hf, prompt, 4)
    assert proposer.num_computed_tokens == 30 + 3  # the prompt, then d1..d3 (d4 never fed)

    # The target accepts d1, rejects d2 and appends its own token instead.
    other = (d[1] + 1) % VOCAB
    req.append_output_token(d[0])
    req.append_output_token(other)
    d2 = proposer.propose([req], [4])[0]
    assert d2 == hf_greedy_ignore_eos(hf, req.all_token_ids, 4)
    assert proposer.num_computed_tokens == 33 + 1 + 3  # only the corrected token, then drafts

    # All four accepted, plus the bonus token: feed d4 (never fed) and the bonus.
    for t in d2:
        req.append_output_token(t)
    req.append_output_token(7)
    d3 = proposer.propose([req], [2])[0]
    assert d3 == hf_greedy_ignore_eos(hf, req.all_token_ids, 2)
    assert proposer.num_computed_tokens == 37 + 2 + 1

    # Asked again with nothing new: the last token is fed again (its logits), nothing else.
    assert proposer.propose([req], [2])[0] == d3
    assert proposer.num_computed_tokens == 40 + 1 + 1


def test_batch_of_requests(tiny_checkpoints: dict[str, Path], hf_models: Callable[[str], Any]) -> None:
    """Several requests in one call (one pass per draft position, rows dropping out as their
    max_drafts is reached), across two rounds, then every block back in the pool."""
    hf = hf_models("llama")
    proposer = _proposer(tiny_checkpoints["llama"], k=5, block_size=4)
    free_at_start = proposer.num_free_blocks
    reqs = [_request(f"r{i}", _prompt(n, seed=10 + i)) for i, n in enumerate((5, 17, 2, 40))]
    for round_, max_drafts in enumerate(([3, 0, 5, 1], [5, 2, 1, 4])):
        drafts = proposer.propose(reqs, max_drafts)
        assert drafts == [hf_greedy_ignore_eos(hf, r.all_token_ids, m) if m else []
                          for r, m in zip(reqs, max_drafts)]
        for r, d in zip(reqs, drafts):  # accept the first draft (if any), then a token of ours
            r.append_output_token(d[0] if d else 3)
            r.append_output_token(round_ + 11)
    assert proposer.num_forward_passes == 5 + 5  # the longest proposal of each round
    for r in reqs:
        proposer.free(r.request_id)
    proposer.free("never-seen")  # freeing an unknown request is a no-op
    assert proposer.num_free_blocks == free_at_start


def _hf_greedy_with_probs(hf_model: Any, prompt: list[int], n: int) -> list[tuple[int, float]]:
    """HF's greedy continuation, each token with the probability the model gave it."""
    import torch

    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            probs = hf_model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            token = int(probs.argmax())
            out.append((token, float(probs[token])))
            ids.append(token)
    return out


def test_confidence_threshold_stops_after_an_unsure_token(
    tiny_checkpoints: dict[str, Path], hf_models: Callable[[str], Any]
) -> None:
    """With draft_confidence_threshold, a row's proposal is HF's greedy continuation up to and
    including the first token whose probability is below the threshold; no pass is spent after
    it, and a row that stops early does not stop the others."""
    hf = hf_models("qwen3")
    prompts = [_prompt(n, seed=20 + n) for n in (6, 23, 41)]
    refs = [_hf_greedy_with_probs(hf, p, 5) for p in prompts]
    probs = sorted(p for ref in refs for _, p in ref)
    threshold = probs[len(probs) // 2]  # the median: some rows stop early, some do not
    expected = []
    for ref in refs:
        cut = next((j + 1 for j, (_, p) in enumerate(ref) if p < threshold), len(ref))
        expected.append([t for t, _ in ref[:cut]])
    assert any(len(e) < 5 for e in expected) and any(len(e) > 1 for e in expected)
    proposer = _proposer(tiny_checkpoints["qwen3"], k=5, threshold=threshold, block_size=4)
    reqs = [_request(f"c{i}", p) for i, p in enumerate(prompts)]
    assert proposer.propose(reqs, [5, 5, 5]) == expected
    assert proposer.num_forward_passes == max(len(e) for e in expected)
    # without a threshold: k drafts each, the same prefix
    plain = _proposer(tiny_checkpoints["qwen3"], k=5, block_size=4)
    assert plain.propose([_request(f"p{i}", p) for i, p in enumerate(prompts)], [5, 5, 5]) == [
        [t for t, _ in ref] for ref in refs]


def test_draft_weights_packed_for_the_decode_kernel(tiny_checkpoints: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With the CPU kernels on, every linear weight of the draft is stored in our decode
    kernel's panels (unpacked, oneDNN re-lays each weight at every call; packed for oneDNN, its
    fixed cost per call is several times the kernel's on small weights), and stays plain with
    custom_ops="none"; the draft's proposals are HF's greedy tokens either way (other tests)."""
    import torch

    from folovllm._custom_ops import ops_available

    def layouts(model: torch.nn.Module) -> set[str]:
        return {"mkldnn" if m.weight.is_mkldnn else f"{m.weight.dim()}-d"
                for name, m in model.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and name.endswith(("proj", "lm_head"))}

    from folovllm.model_executor.layers import cpu_gemm

    # a measured table that prefers oneDNN for every shape (the trained pair's gate_up shapes
    # get "onednn" from their nearest measured neighbour): the draft still takes the kernel
    monkeypatch.setattr(cpu_gemm, "choose_gemm", lambda out, in_: "onednn")
    path = tiny_checkpoints["qwen3"]
    if ops_available():
        assert layouts(_proposer(path, k=2).model) == {"3-d"}  # [ceil(out / 32), in, 32] panels
    assert layouts(_proposer(path, k=2, custom_ops="none").model) == {"2-d"}


def test_capped_by_max_model_len(tiny_checkpoints: dict[str, Path]) -> None:
    proposer = _proposer(tiny_checkpoints["qwen3"], k=5)
    req = _request("long", _prompt(254, seed=3))  # max_model_len 256: two positions left
    assert len(proposer.propose([req], [5])[0]) == 2


def test_refuses_another_vocabulary(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    import transformers

    config = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16,
                                      architectures=["Qwen3ForCausalLM"])
    config.save_pretrained(tmp_path)  # no weights needed: refused before they are read
    with pytest.raises(ValueError, match=r"speculative_config\.model=.*vocab_size=300.*512"):
        _proposer(tmp_path, k=2)
    with pytest.raises(ValueError, match=r"speculative_config\.model='.*nowhere'"):
        _proposer(tmp_path / "nowhere", k=2)


def test_longest_common_prefix_matches_a_plain_loop() -> None:
    from folovllm.spec_decode.draft_model import longest_common_prefix

    def plain(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(5))]
        assert longest_common_prefix(a, b) == plain(a, b), (a, b)
