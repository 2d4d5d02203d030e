"""`folovllm serve`: the OpenAI-compatible server, driven by the official `openai` client against a
real uvicorn server on 127.0.0.1 (run in a thread of this process, so a test can also look at the
engine behind it: free KV blocks, requests left).

The oracle for every text is the offline `LLM.generate` / `LLM.chat` on the same checkpoint,
stage and settings; its greedy tokens are themselves checked against HF transformers by the
stage tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig
from folovllm.engine.async_llm import AsyncLLM
from folovllm.engine.llm_engine import LLMEngine
from folovllm.entrypoints.openai.api_server import build_app
from tests.helpers import uvicorn_in_thread

STAGE = 3  # paged KV: the disconnect test counts blocks
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=16)
LONG = 1000  # max_tokens of a request that the disconnect tests cut short
API_KEY = "sk-folovllm-test"
MODEL = "tiny-qwen3"
PROMPTS = ["the engine", "A block table maps", "Paged attention reads keys", "x"]


@dataclass
class Server:
    base_url: str
    engine: LLMEngine

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0)

    def metrics(self) -> str:
        return httpx.get(self.base_url.removesuffix("/v1") + "/metrics").text


@pytest.fixture(scope="module")
def server(tiny_qwen3) -> Iterator[Server]:
    """A uvicorn server on a free port, stopped (and its engine loop with it) after the module."""
    engine = LLMEngine(str(tiny_qwen3), EngineConfig.for_stage(STAGE, **ENGINE_ARGS))
    with uvicorn_in_thread(build_app(AsyncLLM(engine, MODEL), MODEL, api_key=API_KEY),
                           stop_timeout_s=15) as (root, _):
        yield Server(f"{root}/v1", engine)


@pytest.fixture(scope="module")
def offline(tiny_qwen3) -> LLM:
    return LLM(str(tiny_qwen3), stage=STAGE, **ENGINE_ARGS)


def greedy(offline: LLM, prompt: str, max_tokens: int, **kwargs: Any) -> Any:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)
    return offline.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def all_blocks_free(engine: LLMEngine) -> bool:
    kv = engine.kv_cache_manager
    return kv.num_free_blocks == kv.block_pool.num_blocks and not engine.has_unfinished_requests()


# -- completions and chat ---------------------------------------------------------------------


def test_completion_streamed_and_not_equal_offline_greedy_with_usage(server, offline):
    client = server.client()
    for prompt in PROMPTS[:2]:
        ref = greedy(offline, prompt, 24)
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == ref.text
        assert out.choices[0].finish_reason == ref.finish_reason
        num_prompt = len(offline.get_tokenizer().encode(prompt, add_special_tokens=False))
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (num_prompt, len(ref.token_ids))
        assert out.usage.total_tokens == num_prompt + len(ref.token_ids)

        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert len(texts) > 3, "streamed as one piece: deltas are not being sent step by step"
        assert "".join(texts) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completion_token_id_prompt_and_sampling_fields(server, offline):
    """Token-id prompts, and vLLM's extra fields through extra_body (top_k, ignore_eos, ...)."""
    prompt_ids = offline.get_tokenizer().encode("Paged attention", add_special_tokens=False)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, seed=3, max_tokens=20,
                            ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.3,
                            repetition_penalty=1.2)
    ref = offline.generate([prompt_ids], params, use_tqdm=False)[0].outputs[0]
    out = server.client().completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=20, temperature=0.8, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.3,
        extra_body={"top_k": 20, "min_p": 0.01, "ignore_eos": True, "repetition_penalty": 1.2},
    )
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == 20


def test_n_samples_equal_offline(server, offline):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12)
    ref = offline.generate("the engine", params, use_tqdm=False)[0].outputs
    assert ref[0].text != ref[1].text  # else this test could not tell the samples apart
    out = server.client().completions.create(model=MODEL, prompt="the engine", n=2, temperature=1.0,
                                             seed=7, max_tokens=12)
    assert [(c.index, c.text) for c in out.choices] == [(0, ref[0].text), (1, ref[1].text)]
    assert out.usage.completion_tokens == len(ref[0].token_ids) + len(ref[1].token_ids)


def test_stop_string_cuts_text_streamed_and_not(server, offline):
    full = greedy(offline, PROMPTS[1], 32, ignore_eos=True).text
    stop = full[10:14]
    expected = full[: full.index(stop)]
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=32, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=32, temperature=0,
                                       stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_chat_streamed_and_not_equal_offline_chat(server, offline):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_concurrent_clients_each_get_their_own_greedy_text(server, offline):
    """32 clients at once with different prompts and lengths: each answer equals its own offline
    greedy result, and the engine ran several of them in one batch."""
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    max_tokens = [4 + (7 * i) % 29 for i in range(32)]
    refs = offline.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens],
                            use_tqdm=False)

    async def ask(client: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:  # half stream, half do not
            stream = await client.completions.create(model=MODEL, prompt=prompts[i], temperature=0,
                                                     max_tokens=max_tokens[i], stream=True)
            return "".join([c.choices[0].text async for c in stream])
        out = await client.completions.create(model=MODEL, prompt=prompts[i], temperature=0,
                                              max_tokens=max_tokens[i])
        return out.choices[0].text

    async def main() -> list[str]:
        async with server.async_client() as client:
            return await asyncio.gather(*(ask(client, i) for i in range(32)))

    texts = asyncio.run(main())
    assert texts == [r.outputs[0].text for r in refs]
    assert len(set(texts)) > 16  # distinct answers: a mix-up between requests would show
    # The tests before this one never run more than 2 requests at once.
    assert server.engine.stats.max_num_running >= 4, "the requests were not batched"
    wait_for(lambda: all_blocks_free(server.engine), "all KV blocks back after the burst")


# -- disconnects ------------------------------------------------------------------------------


def metric(text: str, name: str, label: str = "") -> float:
    """The value of `folovllm:<name>{...}` in Prometheus text (0 if absent), its labels
    containing `label`."""
    for line in text.splitlines():
        if line.startswith(f"folovllm:{name}{{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def aborted_count(server: Server) -> float:
    return metric(server.metrics(), "request_success_total", 'finished_reason="abort"')


def metrics_show_an_empty_engine(server: Server) -> bool:
    text = server.metrics()
    return all(metric(text, name) == 0 for name in
               ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting"))


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    before = aborted_count(server)
    stream = server.client().completions.create(model=MODEL, prompt="the engine", max_tokens=LONG,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = [next(stream) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in first)
    kv = server.engine.kv_cache_manager
    assert kv.num_free_blocks < kv.block_pool.num_blocks  # it holds KV now
    wait_for(lambda: metric(server.metrics(), "kv_cache_usage_perc") > 0, "/metrics to show KV in use")
    stream.close()  # the client goes away, long before the end
    wait_for(lambda: aborted_count(server) == before + 1, "the request to be aborted")
    wait_for(lambda: all_blocks_free(server.engine), "every KV block back in the pool")
    assert metrics_show_an_empty_engine(server)


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(server):
    before = aborted_count(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/completions", timeout=0.2,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL, "prompt": "the engine", "max_tokens": LONG,
                         "temperature": 0, "ignore_eos": True})
    wait_for(lambda: aborted_count(server) == before + 1, "the request to be aborted")
    wait_for(lambda: all_blocks_free(server.engine), "every KV block back in the pool")
    assert metrics_show_an_empty_engine(server)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param, message", [
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"n": 0}, "n", "n must be an integer >= 1"),
    ({"top_k": 10**30}, "top_k", "top_k must be a 64-bit integer"),  # would kill the engine loop
    ({"n": 1000}, "n", "n: Input should be less than or equal to 128"),
    ({"temperature": "hot"}, "temperature", "temperature: Input should be a valid number"),
    ({"prompt": ""}, "prompt", "prompt must be a non-empty string"),
    ({"prompt": [5] * 1100}, "prompt", "prompt has 1100 tokens, more than max_model_len=1024"),
    ({"prompt": [10**6]}, "prompt", "prompt token ids must be integers in [0,"),
    ({"logprobs": 21}, "logprobs", "logprobs must be at most the engine's max_logprobs=20"),
    ({"suffix": "x"}, "suffix", "suffix: Extra inputs are not permitted"),
])
def test_bad_input_is_400_naming_the_field(server, fields, param, message):
    prompt = fields.get("prompt", "the engine")
    extra = {k: v for k, v in fields.items() if k != "prompt"}  # sent as is, past the client's types
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body=extra)
    e = info.value
    assert e.status_code == 400 and e.type == "invalid_request_error" and e.param == param
    assert message in e.message


def test_chat_bad_input_and_logprobs_are_400(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be at most"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=21)


def test_auth_unknown_model_and_malformed_json(server):
    hi = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").completions.create(**hi)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    no_key = httpx.get(f"{server.base_url}/models")  # the client refuses to send no key at all
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as info:
        server.client().completions.create(**{**hi, "model": "gpt-9"})
    assert info.value.status_code == 404 and info.value.param == "model"

    r = httpx.post(f"{server.base_url}/completions", content=b'{"model": "tiny', timeout=10,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in r.json()["error"]["message"]
    # /health and /metrics need no key; the server still answers after all the errors above.
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").status_code == 200
    assert server.client().completions.create(**hi).usage.completion_tokens >= 1


def test_models_endpoint(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]


def test_metrics_show_latency_histograms_gauges_and_counters(server):
    server.client().completions.create(model=MODEL, prompt="the engine", max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    text = server.metrics()

    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                      "e2e_request_latency_seconds"):
        assert f'folovllm:{histogram}_bucket{{le="0.1",model_name="{MODEL}"}}' in text
        assert metric(text, f"{histogram}_count") >= 1
    assert metric(text, "inter_token_latency_seconds_count") >= 5  # 6 tokens: 5 gaps at least
    assert metric(text, "generation_tokens_total") >= 6
    assert metric(text, "request_success_total", 'finished_reason="length"') >= 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                  "num_preemptions_total"):
        assert f"folovllm:{gauge}{{" in text
    # what the engine runs, as describe_engine says it (Prometheus' info pattern)
    assert metric(text, "engine_info", f'stage="{STAGE}"') == 1
    assert 'attention_backend="' in text.split("folovllm:engine_info{", 1)[1].split("}")[0]


# -- the async front alone --------------------------------------------------------------------


def test_async_llm_generate_streams_deltas_and_closing_early_aborts(tiny_qwen3, offline):
    """`AsyncLLM.generate` without HTTP: two requests at once, one read to the end (its deltas
    add up to the offline greedy text), one closed after two outputs (aborted, its KV freed)."""
    from contextlib import aclosing

    from folovllm.sampling_params import RequestOutputKind

    engine = LLMEngine(str(tiny_qwen3), EngineConfig.for_stage(STAGE, **ENGINE_ARGS))
    ref = greedy(offline, PROMPTS[0], 20)
    stream_params = SamplingParams(temperature=0, max_tokens=20, output_kind=RequestOutputKind.DELTA)
    long_params = SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True,
                                 output_kind=RequestOutputKind.DELTA)

    async def main() -> tuple[str, int]:
        async_llm = AsyncLLM(engine)

        async def full() -> str:
            return "".join([o.outputs[0].text async for o in async_llm.generate(PROMPTS[0], stream_params, "a")])

        async def cut_short() -> int:
            seen = 0
            async with aclosing(async_llm.generate(PROMPTS[1], long_params, "b")) as outputs:
                async for _ in outputs:
                    seen += 1
                    if seen == 2:
                        break
            return seen

        text, seen = await asyncio.gather(full(), cut_short())
        for _ in range(500):  # the abort is applied by the engine loop, before its next step
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await async_llm.shutdown()
        return text, seen

    text, seen = asyncio.run(main())
    assert text == ref.text and seen == 2
    assert all_blocks_free(engine)
