"""`folovllm serve` against a client that sends the worst it can (issue 28): request chat
templates, huge bodies and prompts, lone surrogates, long stop lists, a shutdown with streams
open. Each test drives a real uvicorn server on 127.0.0.1 (in a thread of this process, so it
can also look at the engine), started with small limits so that exceeding them takes small
inputs, and stopped by the test's fixture.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import httpx
import pytest
import uvicorn

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig
from folovllm.engine.async_llm import AsyncLLM
from folovllm.engine.llm_engine import LLMEngine
from folovllm.engine.stop_strings import StopStringMatcher
from folovllm.entrypoints.openai.api_server import build_app
from folovllm.entrypoints.openai.serving_engine import ServerOptions
from tests.helpers import uvicorn_in_thread

STAGE = 3
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=16)
API_KEY = "sk-hardening"
MODEL = "tiny"
LIMITS = ServerOptions(max_request_bytes=4096, max_prompt_chars=300, max_stop_strings=4,
                       max_stop_chars=64, max_waiting_requests=2, request_body_timeout_s=1.0)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Server:
    root: str
    engine: LLMEngine
    async_llm: AsyncLLM
    uv: uvicorn.Server

    def post(self, path: str, body: Any = None, headers: Optional[dict] = AUTH, timeout: float = 60,
             **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.root}{path}", json=body, headers=headers, timeout=timeout, **kwargs)

    def events(self, path: str, body: dict) -> list[Any]:
        """The `data:` payloads of a streamed answer, `[DONE]` as the string."""
        with httpx.stream("POST", f"{self.root}{path}", json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200, r.read()
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        return [line if line == "[DONE]" else json.loads(line) for line in lines]


@contextmanager
def running_server(tiny_qwen3, options: ServerOptions = LIMITS, grace_s: Optional[float] = None,
                   trace: bool = False, **engine_args: Any) -> Iterator[Server]:
    """A server on a free port; uvicorn's own, or `GracefulServer` when `grace_s` is given."""
    engine = LLMEngine(str(tiny_qwen3), EngineConfig.for_stage(STAGE, trace=trace, **{**ENGINE_ARGS, **engine_args}))
    async_llm = AsyncLLM(engine, MODEL)
    app = build_app(async_llm, MODEL, api_key=API_KEY, options=options)
    with uvicorn_in_thread(app, None if grace_s is None else (async_llm, grace_s), options) as (root, uv):
        yield Server(root, engine, async_llm, uv)


@pytest.fixture(scope="module")
def server(tiny_qwen3) -> Iterator[Server]:
    with running_server(tiny_qwen3, trace=True) as s:
        yield s


@pytest.fixture(scope="module")
def offline(tiny_qwen3) -> LLM:
    return LLM(str(tiny_qwen3), stage=STAGE, **ENGINE_ARGS)


def chat(content: str = "hi", **fields: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def completion(prompt: Any = "the engine", **fields: Any) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 2, **fields}


def assert_400(response: httpx.Response, param: str, *fragments: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    for fragment in fragments:
        assert fragment in error["message"], error


# -- 1. chat templates ------------------------------------------------------------------------


@pytest.mark.parametrize("key, fragment", [
    ("chat_template", "--trust-request-chat-template"),
    ("tokenize", "set by the server"),
    ("return_dict", "set by the server"),
    ("messages", "set by the server"),
    ("raise_exception", "set by the server"),
])
def test_request_chat_template_and_reserved_kwargs_are_refused(server, key, fragment):
    """A template is code run by the server (nested loops in a 150-byte body stalled it); the
    other keys change what apply_chat_template returns or replace what the template is given."""
    kwargs = {key: "{{ messages[0]['content'] }} X" if key == "chat_template" else True}
    r = server.post("/v1/chat/completions", chat(chat_template_kwargs=kwargs))
    assert_400(r, "chat_template_kwargs", f"chat_template_kwargs.{key}", fragment)
    # A variable of the template is still passed (Qwen3's switch), and the server serves on.
    ok = server.post("/v1/chat/completions", chat(chat_template_kwargs={"enable_thinking": False}))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_trusted_server_runs_request_templates_without_echoing_their_errors(tiny_qwen3, offline):
    options = ServerOptions(trust_request_chat_template=True)
    with running_server(tiny_qwen3, options) as trusting:
        template = "PROMPT {{ messages[0]['content'] }}"
        r = trusting.post("/v1/chat/completions", chat("hello", chat_template_kwargs={"chat_template": template}))
        assert r.status_code == 200
        num_tokens = len(offline.get_tokenizer().encode("PROMPT hello", add_special_tokens=False))
        assert r.json()["usage"]["prompt_tokens"] == num_tokens
        # A request template's error text is its own: it could show the template's globals.
        leak = "{{ raise_exception(lipsum|string ~ eos_token) }}"
        r = trusting.post("/v1/chat/completions", chat(chat_template_kwargs={"chat_template": leak}))
        assert_400(r, "messages", "the request's chat template failed")
        assert "function" not in r.text and "0x" not in r.text and "im_end" not in r.text


# -- 2. nothing long on the event loop; body and prompt limits --------------------------------


def test_template_and_tokenizer_run_off_the_loop_and_outside_the_lock(server, monkeypatch):
    """While a chat template is being rendered (held here on an event), /health answers: the
    render is not on the event loop. Tokenizing runs in an input thread, without the engine
    lock."""
    tokenizer = server.engine.tokenizer
    render, encode = tokenizer.apply_chat_template, tokenizer.encode
    rendering, release = threading.Event(), threading.Event()
    seen: list[tuple[str, str, bool]] = []

    def slow_render(*args: Any, **kwargs: Any) -> Any:
        seen.append(("render", threading.current_thread().name, server.async_llm._lock.locked()))
        rendering.set()
        release.wait(timeout=60)
        return render(*args, **kwargs)

    def spy_encode(*args: Any, **kwargs: Any) -> Any:
        seen.append(("encode", threading.current_thread().name, server.async_llm._lock.locked()))
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", slow_render)
    monkeypatch.setattr(tokenizer, "encode", spy_encode)
    answer: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answer.append(server.post("/v1/chat/completions", chat())))
    client.start()
    try:
        assert rendering.wait(timeout=60), "the template was never rendered"
        assert httpx.get(f"{server.root}/health", timeout=20).status_code == 200
    finally:
        release.set()
        client.join(timeout=60)
    assert answer and answer[0].status_code == 200
    assert [what for what, _, _ in seen] == ["render", "encode"]
    for what, thread, locked in seen:
        assert thread.startswith("folovllm-input") and not locked, (what, thread, locked)


def test_body_size_and_prompt_character_limits(server):
    big = completion("x" * 5000)  # > 4096 bytes
    r = server.post("/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-request-bytes" in r.json()["error"]["message"]
    # The same without a Content-Length (chunked): counted as it arrives.
    body = json.dumps(big).encode()
    chunked = httpx.post(f"{server.root}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                         content=iter([body[:2000], body[2000:]]), timeout=60)
    assert chunked.status_code == 413

    assert_400(server.post("/v1/completions", completion("y" * 301)), "prompt",
               "prompt has 301 characters, more than this server's limit of 300 (--max-prompt-chars)")
    assert_400(server.post("/v1/chat/completions", chat("z" * 301)), "messages", "301 characters")
    # A chat under the limit whose template makes it longer is refused after rendering.
    assert_400(server.post("/v1/chat/completions", chat("z" * 290)), "messages", "characters")
    assert server.post("/v1/completions", completion("y" * 300)).status_code == 200


# -- 4, 5, 6: finish chunks, max_completion_tokens, surrogates --------------------------------


def test_n_stream_sends_one_finish_chunk_per_choice(server, offline):
    """A choice that finished early had its finish chunk repeated on every later step."""
    def lengths(seed: int) -> list[int]:
        params = SamplingParams(n=3, temperature=1.0, seed=seed, max_tokens=40)
        return [len(c.token_ids) for c in offline.generate("the engine schedules", params, use_tqdm=False)[0].outputs]

    seed = next((s for s in range(40) if len(set(lengths(s))) > 1), None)
    assert seed is not None, "no seed whose samples finish at different steps"
    events = server.events("/v1/completions", completion("the engine schedules", n=3, temperature=1.0,
                                                          seed=seed, max_tokens=40, stream=True))
    assert events[-1] == "[DONE]"
    finishes = [(c["index"], c["finish_reason"]) for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert sorted(i for i, _ in finishes) == [0, 1, 2], finishes


def test_chat_max_completion_tokens_0_is_refused(server):
    assert_400(server.post("/v1/chat/completions", chat(max_tokens=None, max_completion_tokens=0)),
               "max_completion_tokens", "max_completion_tokens must be an integer >= 1, got 0")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", completion("a\ud800b"), "prompt"),
    ("/v1/completions", completion(["a\udc00"]), "prompt"),
    ("/v1/completions", {**completion(), "model": "\ud800"}, "model"),
    ("/v1/completions", completion(stop=["ok", "\ud800"]), "stop"),
    ("/v1/chat/completions", chat("\ud800"), "messages.0.content"),
    ("/v1/chat/completions", chat(chat_template_kwargs={"x": ["\ud800"]}), "chat_template_kwargs"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    content = json.dumps(body).encode()  # ASCII JSON: the surrogate travels as "\\ud800"
    r = server.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert_400(r, param, "lone UTF-16 surrogate")


# -- 7. shutdown ------------------------------------------------------------------------------


def test_streams_open_when_the_grace_ends_get_abort_and_done(tiny_qwen3):
    """One sequence at a time, three long streams and one non-streamed request: when the
    shutdown grace ends, every stream gets a finish chunk ("abort") and [DONE], the waiting
    non-streamed request a 503, instead of a cut connection."""
    unbounded = dataclasses.replace(LIMITS, max_waiting_requests=None)  # four wait at once here
    with running_server(tiny_qwen3, unbounded, grace_s=0.2, max_num_seqs=1) as s:
        body = completion(max_tokens=1000, ignore_eos=True, stream=True)
        results: dict[int, Any] = {}

        def stream(i: int) -> None:
            results[i] = s.events("/v1/completions", body)

        def wait(i: int) -> None:
            results[i] = s.post("/v1/completions", {**body, "stream": False})

        clients = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        clients.append(threading.Thread(target=wait, args=(3,)))
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while s.engine.get_num_unfinished_requests() < 4:
            assert time.monotonic() < deadline, "the requests did not all arrive"
            time.sleep(0.02)
        s.uv.should_exit = True
        for client in clients:
            client.join(timeout=60)
    for i in range(3):
        events = results[i]
        assert events[-1] == "[DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["abort"], finishes
    assert results[3].status_code == 503 and "shutting down" in results[3].json()["error"]["message"]


# -- 8. stop strings --------------------------------------------------------------------------


def test_stop_list_caps(server):
    assert_400(server.post("/v1/completions", completion(stop=["a", "b", "c", "d", "e"])), "stop",
               "stop has 5 strings, more than this server's limit of 4 (--max-stop-strings)")
    assert_400(server.post("/v1/completions", completion(stop=["a" * 40, "b" * 30])), "stop",
               "stop has 70 characters in all, more than this server's limit of 64 (--max-stop-chars)")
    assert server.post("/v1/completions", completion(stop=["a" * 40, "b" * 24])).status_code == 200


class CountingMatcher(StopStringMatcher):
    steps = 0

    def _next(self, node: int, char: str) -> int:
        CountingMatcher.steps += 1
        return super()._next(node, char)


def naive_first_stop(text: str, stops: list[str]) -> Optional[tuple[int, str]]:
    """The reference: the first end position at which a stop string is complete; the longest
    of those ending there."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return end - len(stop), stop
    return None


def test_stop_matcher_equals_naive_search_and_reads_each_character_once():
    rng = random.Random(0)
    for trial in range(300):
        alphabet = "abc" if trial % 2 else "ab c长"
        stops = list({"".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 8))})
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        matcher = CountingMatcher(stops)
        node, read, found = 0, 0, None
        CountingMatcher.steps = 0
        while read < len(text) and found is None:  # fed in random pieces, as steps do
            piece_end = min(len(text), read + rng.randint(1, 4))
            node, end = matcher.scan(text[:piece_end], read, node)
            read = piece_end
            if end != -1:
                found = (end - matcher.match_len[node], text[end - matcher.match_len[node]:end])
        assert found == naive_first_stop(text, stops), (text, stops)
        assert CountingMatcher.steps <= len(text)  # one transition per character read
    # The work per character does not depend on how many stop strings there are.
    text = "".join(rng.choices("abcdefgh ", k=2000))
    for count in (1, 2000):
        stops = ["zz"] + ["".join(rng.choices("abcdefgh", k=12)) + "z" for _ in range(count - 1)]
        matcher = CountingMatcher(stops)
        CountingMatcher.steps = 0
        assert matcher.scan(text, 0, 0)[1] == -1  # no "z" in the text
        assert CountingMatcher.steps == len(text)


def test_many_stop_strings_give_the_text_of_the_one_that_matches(offline):
    full = offline.generate("A block table maps", SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    stop = full[10:14]
    decoys = [f"@@{i}@@" for i in range(3000)]
    for stops in ([stop], decoys + [stop]):
        out = offline.generate("A block table maps", SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                                      stop=stops), use_tqdm=False)[0].outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (full[: full.index(stop)], "stop", stop)


# -- 11. the API key, stream_options, prompt forms, failed requests ---------------------------


def test_key_guards_trace_and_is_checked_before_the_body(server):
    root = server.root
    assert httpx.get(f"{root}/trace/").status_code == 401
    assert httpx.get(f"{root}/trace/state").status_code == 401
    assert httpx.get(f"{root}/trace/", headers=AUTH).status_code == 200
    # A browser sends the key as the password of HTTP Basic auth, which the 401 asks for.
    assert httpx.get(f"{root}/trace/").headers["www-authenticate"].startswith("Basic")
    basic = base64.b64encode(f":{API_KEY}".encode()).decode()
    assert httpx.get(f"{root}/trace/state", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    wrong = base64.b64encode(b"user:nope").decode()
    assert httpx.get(f"{root}/trace/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{root}{path}").status_code == 200
    # No key and a broken body: 401, not 400 (the key is checked before the body is parsed).
    r = httpx.post(f"{root}/v1/completions", content=b'{"model": "tiny', timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_stream_options_need_stream_and_prompt_forms_are_strict(server):
    assert_400(server.post("/v1/completions", completion(stream_options={"include_usage": True})),
               "stream_options", "stream_options is only allowed when stream is true")
    for prompt in (123, [True], [[1, True]], [1.0], {"a": 1}):
        assert_400(server.post("/v1/completions", completion(prompt)), "prompt",
                   "prompt: must be a string or a list of token ids")
    assert_400(server.post("/v1/completions", completion(stop_token_ids=[True])), "stop_token_ids.0")


def test_a_request_failing_in_the_engine_reaches_the_client_with_its_reason(server, monkeypatch):
    engine = server.engine  # the engine samples (its one Sampler)
    sampler = engine.sampler
    bad = [7, 7, 7]

    def failing(logits: Any, requests: list) -> Any:
        if any(list(r.prompt_token_ids) == bad for r in requests):
            raise RuntimeError("injected fault")
        return sampler(logits, requests)

    monkeypatch.setattr(engine, "sampler", failing)
    r = server.post("/v1/completions", completion(bad))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "the request failed in the engine: RuntimeError: injected fault" in r.json()["error"]["message"]
    events = server.events("/v1/completions", completion(bad, stream=True))
    assert events[-1] == "[DONE]" and "injected fault" in events[-2]["error"]["message"]
    assert [c["finish_reason"] for e in events[:-2] for c in e["choices"]] == ["error"]
    assert server.post("/v1/completions", completion([8, 8, 8])).status_code == 200


def test_serve_options_reach_the_server_and_bad_ones_exit_2(tiny_qwen3, monkeypatch, capsys):
    from folovllm.entrypoints import cli
    from folovllm.entrypoints.openai import api_server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(api_server, "run_server", lambda *args: seen.update(options=args[-1]))
    assert cli.main(["serve", str(tiny_qwen3), "--max-model-len", "64", "--trust-request-chat-template",
                     "--max-request-bytes", "1KiB", "--max-stop-strings", "3"]) == 0
    assert seen["options"] == ServerOptions(trust_request_chat_template=True, max_request_bytes=1024,
                                            max_stop_strings=3)
    assert cli.main(["serve", str(tiny_qwen3), "--max-prompt-chars", "0"]) == 2
    assert "--max-prompt-chars must be a positive integer, got 0" in capsys.readouterr().err


# -- 12. backpressure: a full queue, slow bodies, the key from the environment ----------------


def test_a_full_queue_answers_503_with_retry_after_and_serves_what_it_accepted(server, offline, monkeypatch):
    """The engine is held before its next step: request A waits in the scheduler's queue, B
    (n=2: two samples, admitted since one was waiting) in add_request, at the engine lock. With
    --max-waiting-requests 2 the next ones get a 503 with Retry-After in OpenAI's shape, and A
    and B are then served exactly."""
    engine = server.engine
    step, entered, release = engine.step, threading.Event(), threading.Event()

    def held_step() -> Any:
        entered.set()
        release.wait(timeout=60)
        return step()

    monkeypatch.setattr(engine, "step", held_step)
    answers: dict[str, httpx.Response] = {}
    prompts = {"A": "the engine", "B": "A block table maps"}
    fields = {"A": dict(temperature=0), "B": dict(n=2, temperature=1.0, seed=3)}

    def send(name: str) -> None:
        answers[name] = server.post("/v1/completions", completion(prompts[name], max_tokens=4, **fields[name]))

    clients = [threading.Thread(target=send, args=(name,)) for name in prompts]
    try:
        clients[0].start()
        assert entered.wait(timeout=30), "the engine never stepped"
        clients[1].start()
        deadline = time.monotonic() + 30
        while server.async_llm.num_waiting < 3:
            assert time.monotonic() < deadline, "B never arrived"
            time.sleep(0.02)
        busy = server.post("/v1/completions", completion(), timeout=10)
        busy_chat = server.post("/v1/chat/completions", chat(), timeout=10)
        two = server.post("/v1/completions", completion(["x", "y"]), timeout=10)
        n2 = server.post("/v1/completions", completion(n=2, temperature=1.0), timeout=10)
    finally:
        release.set()
        for client in clients:
            client.join(timeout=60)
    for r in (busy, busy_chat, two, n2):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_busy"
        assert "3 requests are waiting, its limit is 2 (--max-waiting-requests)" in error["message"]
    for name, prompt in prompts.items():
        expected = offline.generate(prompt, SamplingParams(max_tokens=4, **fields[name]), use_tqdm=False)[0]
        assert answers[name].status_code == 200, answers[name].text
        assert [c["text"] for c in answers[name].json()["choices"]] == [c.text for c in expected.outputs]
    monkeypatch.setattr(engine, "step", step)
    assert server.async_llm.num_waiting == 0
    assert server.post("/v1/completions", completion(["x", "y"])).status_code == 200
    # A request larger than the limit is not refused for good: it runs when nothing waits.
    assert server.post("/v1/completions", completion(n=3, temperature=1.0)).status_code == 200


def raw_request(root: str, body_start: bytes, content_length: int) -> socket.socket:
    """A connection that sent its headers and the first bytes of a body of `content_length`."""
    host, port = root.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {content_length}\r\n\r\n".encode()
                 + body_start)
    return conn


def read_until_closed(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):  # b"": the server closed the connection
        answer += chunk
    return answer


def test_a_body_that_never_ends_or_trickles_gets_408_and_is_closed(server):
    """--request-body-timeout 1: the body must all come within a second of the headers. Both a
    body that stops and one sent a byte at a time (each byte well within the second, which a
    timeout per read would let run for ever) get 408 and a closed connection, while every other
    client is served."""
    stalled = raw_request(server.root, b'{"model": "tiny"', 200)
    trickled = raw_request(server.root, b"{", 200)
    started = time.monotonic()
    try:
        assert httpx.get(f"{server.root}/health", timeout=5).status_code == 200
        assert server.post("/v1/completions", completion()).status_code == 200
        trickled.setblocking(False)
        while True:  # one byte every 0.1 s until the server answers
            try:
                answer = trickled.recv(65536)
                break
            except BlockingIOError:
                pass
            assert time.monotonic() - started < 10, "no answer to the trickled body"
            trickled.send(b" ")
            time.sleep(0.1)
        trickled.setblocking(True)
        answers = [read_until_closed(stalled), answer + read_until_closed(trickled)]
    finally:
        stalled.close()
        trickled.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "--request-body-timeout" in error["message"], error
        assert "within 1 s" in error["message"]


def test_a_connection_that_never_completes_its_headers_is_closed(server):
    """Headers must be complete within --request-body-timeout (1 s here) of connecting: one
    connection that sends nothing and one that stops halfway through its headers are both
    closed, while the server answers everyone else."""
    host, port = server.root.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)), timeout=10)
    half = socket.create_connection((host, int(port)), timeout=10)
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
    try:
        assert httpx.get(f"{server.root}/health", timeout=5).status_code == 200
        started = time.monotonic()
        assert read_until_closed(silent) == b"" and read_until_closed(half) == b""
        assert time.monotonic() - started < 8
    finally:
        silent.close()
        half.close()
    assert server.post("/v1/completions", completion()).status_code == 200


@pytest.mark.parametrize("env, argv, expected", [
    ({"FOLOVLLM_API_KEY": "from-env"}, [], "from-env"),
    ({"VLLM_API_KEY": "from-vllm"}, [], "from-vllm"),
    ({"FOLOVLLM_API_KEY": "ours", "VLLM_API_KEY": "theirs"}, [], "ours"),
    ({"FOLOVLLM_API_KEY": "from-env"}, ["--api-key", "from-argv"], "from-argv"),
    ({}, [], None),
])
def test_api_key_from_the_environment_argv_wins(tiny_qwen3, monkeypatch, env, argv, expected):
    from folovllm.entrypoints import cli
    from folovllm.entrypoints.openai import api_server

    for name in ("FOLOVLLM_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(api_server, "run_server", lambda *args: seen.update(api_key=args[4], options=args[5]))
    assert cli.main(["serve", str(tiny_qwen3), "--max-model-len", "64", *argv,
                     "--max-waiting-requests", "7", "--request-body-timeout", "2.5"]) == 0
    assert seen["api_key"] == expected
    assert seen["options"] == ServerOptions(max_waiting_requests=7, request_body_timeout_s=2.5)


@pytest.mark.parametrize("option, message", [
    (["--max-waiting-requests", "0"], "--max-waiting-requests must be a positive integer, got 0"),
    (["--request-body-timeout", "0"], "--request-body-timeout must be a positive number of seconds, got 0.0"),
    (["--request-body-timeout", "inf"], "--request-body-timeout must be a positive number of seconds, got inf"),
])
def test_bad_backpressure_options_exit_2(tiny_qwen3, capsys, option, message):
    from folovllm.entrypoints import cli

    assert cli.main(["serve", str(tiny_qwen3), *option]) == 2
    assert message in capsys.readouterr().err
