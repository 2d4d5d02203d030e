"""The server side of issue 33: completions `logprobs` and `echo` (with `max_tokens: 0`, the
lm-evaluation-harness likelihood request), `logit_bias`, a list of prompts, chat
`logprobs`/`top_logprobs`, streamed and not, vLLM's `/tokenize` and `/detokenize`, and the 400s
that name the field. Every number is compared with the offline engine's for the same request.
The old server refused all of these (400) or had no such route (404).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterator

import httpx
import openai
import pytest

from folovllm import LLM, SamplingParams
from folovllm.entrypoints.openai.serving_engine import ServerOptions
from tests.test_server_hardening import AUTH, ENGINE_ARGS, MODEL, STAGE, Server, running_server

PROMPT = "The engine computes a"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_qwen3) -> Iterator[Server]:
    with running_server(tiny_qwen3, options=ServerOptions()) as s:
        yield s


@pytest.fixture(scope="module")
def offline(tiny_qwen3) -> LLM:
    return LLM(str(tiny_qwen3), stage=STAGE, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.root}/v1", api_key=AUTH["Authorization"][7:], max_retries=0)


def expected_logprobs(positions: list, token_ids: list[int], decode) -> dict[str, list]:
    """The engine's {id: Logprob} per position, in OpenAI's completions shape."""
    tokens, token_logprobs, top = [], [], []
    for t, scores in zip(token_ids, positions):
        if scores is None:
            tokens.append(decode(t)), token_logprobs.append(None), top.append(None)
        else:
            tokens.append(scores[t].decoded_token)
            token_logprobs.append(scores[t].logprob)
            top.append({lp.decoded_token: lp.logprob for lp in scores.values()})
    offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def as_dict(logprobs: Any) -> dict[str, list]:
    d = logprobs if isinstance(logprobs, dict) else logprobs.model_dump()
    return {k: d[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def test_completion_logprobs_equal_offline_streamed_and_not(client, offline):
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    decode = offline.get_tokenizer().decode
    expected = expected_logprobs(ref.logprobs, ref.token_ids, lambda t: decode([t]))
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref.text
    got = as_dict(out.choices[0].logprobs)
    assert got == expected
    # top 3 plus the sampled token; tokens of the same text (bytes of one character: U+FFFD) share a key
    assert all(len(top) == len({lp.decoded_token for lp in scores.values()}) <= 4
               for top, scores in zip(got["top_logprobs"], ref.logprobs))

    # Streamed: each chunk's logprobs cover its tokens; together they are the whole answer's.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                            logprobs=3, stream=True, extra_body={"ignore_eos": True}))
    joined: dict[str, list] = {k: [] for k in expected}
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            for k, v in as_dict(c.choices[0].logprobs).items():
                joined[k] += v
    assert joined == expected
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text


def test_echo_with_max_tokens_0_gives_the_prompt_logprobs(client, server, offline):
    """lm-evaluation-harness's likelihood request: the prompt's text and scores, nothing
    generated; the first token has no log-probability."""
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                           use_tqdm=False)[0]
    decode = offline.get_tokenizer().decode
    expected = expected_logprobs(ref.prompt_logprobs, ref.prompt_token_ids, lambda t: decode([t]))
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == PROMPT
    got = as_dict(choice.logprobs)
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    assert got == expected and len(got["tokens"]) == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ref.prompt_token_ids)
    # A token-id prompt echoes as its text, and streamed the same scores arrive.
    chunks = server.events("/v1/completions", {"model": MODEL, "prompt": ref.prompt_token_ids, "max_tokens": 0,
                                               "echo": True, "logprobs": 2, "stream": True})
    streamed = [c["choices"][0] for c in chunks[:-1] if c["choices"]]
    assert "".join(c["text"] for c in streamed) == PROMPT
    assert sum((c["logprobs"]["token_logprobs"] for c in streamed), []) == expected["token_logprobs"]
    assert streamed[-1]["finish_reason"] == "length"

    # echo with generated tokens: prompt + completion, offsets into the whole text.
    gen = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2,
                                                  ignore_eos=True), use_tqdm=False)[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                                    temperature=0, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == PROMPT + gen.outputs[0].text
    want = expected_logprobs(gen.prompt_logprobs + gen.outputs[0].logprobs,
                             gen.prompt_token_ids + gen.outputs[0].token_ids, lambda t: decode([t]))
    assert as_dict(choice.logprobs) == want


def test_list_of_prompts_is_prompt_major(client, offline):
    prompts = [PROMPT, "Paged attention"]
    refs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [refs[0].outputs[0].text] * 2 + [refs[1].outputs[0].text] * 2
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    assert out.usage.completion_tokens == 16
    # Token-id prompts, streamed: each choice's chunks carry its own index.
    chunks = list(client.completions.create(model=MODEL, prompt=[r.prompt_token_ids for r in refs],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    for i, ref in enumerate(refs):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) \
            == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_logit_bias_string_keys_steer_sampling(client, offline):
    token = offline.get_tokenizer().encode(" cat", add_special_tokens=False)[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                  logit_bias={token: 100}), use_tqdm=False)[0].outputs[0]
    assert out.choices[0].text == ref.text == offline.get_tokenizer().decode([token] * 3)


def test_chat_logprobs_equal_offline_streamed_and_not(client, offline):
    ref = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for entry, t, scores in zip(content, ref.token_ids, ref.logprobs):
        assert entry.token == scores[t].decoded_token and entry.logprob == scores[t].logprob
        assert entry.bytes == list(entry.token.encode("utf-8"))
        top = sorted((lp.rank, lp.logprob) for lp in scores.values() if lp.rank <= 2)
        assert [e.logprob for e in entry.top_logprobs] == [lp for _, lp in top]
        assert len(entry.top_logprobs) == 2
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    # logprobs: true alone scores the sampled token only
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0,
                                         logprobs=True)
    assert [e.top_logprobs for e in out.choices[0].logprobs.content] == [[], []]
    assert all(math.isfinite(e.logprob) for e in out.choices[0].logprobs.content)


def test_tokenize_detokenize_round_trip(server, offline):
    r = server.post("/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    ids = offline.get_tokenizer().encode(PROMPT, add_special_tokens=False)
    assert r.json() == {"count": len(ids), "max_model_len": ENGINE_ARGS["max_model_len"], "tokens": ids}
    r = server.post("/detokenize", {"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}
    assert server.post("/tokenize", {"prompt": PROMPT}, headers={}).status_code == 401  # behind the key
    r = server.post("/detokenize", {"tokens": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert server.post("/tokenize", {"model": "gpt-9", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize("fields, param, message", [
    ({"logprobs": 21}, "logprobs", "logprobs must be at most the engine's max_logprobs=20"),
    ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"logprobs": 21, "echo": True}, "logprobs", "max_logprobs=20"),
    ({"logit_bias": {"999999": 5}}, "logit_bias", "logit_bias must hold token ids of this model"),
    ({"logit_bias": {"cat": 5}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"prompt": [[5, 6], [10**7]]}, "prompt", "prompt token ids must be integers"),
])
def test_bad_values_are_400_naming_the_field(server, fields, param, message):
    r = server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_chat_bad_logprobs_are_400_and_a_bad_prompt_in_a_list_adds_nothing(server):
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    for fields, message in (({"logprobs": True, "top_logprobs": 21}, "max_logprobs=20"),
                            ({"top_logprobs": 2}, "needs logprobs: true"),
                            ({"logprobs": True, "top_logprobs": -1}, "greater than or equal to 0")):
        r = server.post("/v1/chat/completions", {**chat, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
        assert message in r.json()["error"]["message"]
    # The first prompt of a list was added before the second failed: it must not run on.
    r = server.post("/v1/completions", {"model": MODEL, "prompt": ["fine", ""], "max_tokens": 1000,
                                        "ignore_eos": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    engine = server.engine
    deadline = time.monotonic() + 3  # aborted before the next step; 1000 tokens take far longer
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the first prompt of a refused list kept running"
        time.sleep(0.02)


def test_vllm_prompt_logprobs_field(server, offline):
    """vLLM's extra `prompt_logprobs: k` on completions: `choices[].prompt_logprobs` in vLLM's
    shape (None first, then {token id: {logprob, rank, decoded_token}} with the prompt's token
    and the top k), the offline engine's numbers; without echo, and refused with stream."""
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, ignore_eos=True),
                           use_tqdm=False)[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "prompt_logprobs": 3}
    r = httpx.post(f"{server.root}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == ref.outputs[0].text and choice["logprobs"] is None
    got = choice["prompt_logprobs"]
    assert len(got) == len(ref.prompt_token_ids) and got[0] is None
    for position, want in zip(got[1:], ref.prompt_logprobs[1:]):
        assert {int(t): (v["logprob"], v["rank"], v["decoded_token"]) for t, v in position.items()} == \
            {t: (lp.logprob, lp.rank, lp.decoded_token) for t, lp in want.items()}
    # a request that does not name it gets no such field (OpenAI's shape unchanged)
    plain = httpx.post(f"{server.root}/v1/completions", json={**body, "prompt_logprobs": None},
                       headers=AUTH, timeout=60).json()["choices"][0]
    assert "prompt_logprobs" not in plain
    bad = httpx.post(f"{server.root}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60)
    assert bad.status_code == 400 and "prompt_logprobs" in bad.text
    too_many = httpx.post(f"{server.root}/v1/completions", json={**body, "prompt_logprobs": 10_000},
                          headers=AUTH, timeout=60)
    assert too_many.status_code == 400 and "prompt_logprobs" in too_many.text
