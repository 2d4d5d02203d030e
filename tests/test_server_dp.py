"""`folovllm serve --data-parallel-size 2`: two engine replicas in their own processes behind one
front (`engine/dp_client.py`), driven by the official `openai` client as tests/test_server.py
does. The oracle is the offline `LLM` (one engine, DP=1) on the same checkpoint and settings.

Every test stops every process it starts: the module's server stops its replicas on leaving
(and the test that kills one checks that none is left), the SIGTERM test its own server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig
from folovllm.engine.dp_client import DPAsyncLLM
from folovllm.entrypoints.openai.api_server import build_app
from tests.helpers import uvicorn_in_thread
from tests.test_server import metric, wait_for

STAGE = 6  # prefix caching: what prefix-aware routing is for
ENGINE_ARGS = dict(dtype="float32", max_model_len=512, max_num_seqs=8)
MODEL = "tiny-qwen3"
LONG = 400  # max_tokens of a request cut short
SYSTEM = "You answer about paged attention and block tables, briefly. " * 3  # several full blocks


@dataclass
class DPServer:
    root: str
    dp: DPAsyncLLM

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.root}/v1", api_key="none", max_retries=0)

    def metrics(self) -> str:
        return httpx.get(f"{self.root}/metrics").text

    def routed(self) -> list[int]:
        return [r.num_routed for r in self.dp.replicas]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def dp_server(tiny_qwen3) -> Iterator[DPServer]:
    dp = DPAsyncLLM(str(tiny_qwen3), EngineConfig.for_stage(STAGE, **ENGINE_ARGS), data_parallel_size=2,
                    routing="prefix_aware", model_name=MODEL, max_load_imbalance=4)
    pids = [r.process.pid for r in dp.replicas]
    try:
        with uvicorn_in_thread(build_app(dp, MODEL), stop_timeout_s=30) as (root, _):
            yield DPServer(root, dp)
    finally:
        for r in dp.replicas:  # the lifespan exit stopped them; a failed start must not leak them
            if r.process.is_alive():
                r.process.kill()
    assert not any(pid_alive(p) and not _is_zombie(p) for p in pids), "a replica outlived the server"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def offline(tiny_qwen3) -> LLM:
    return LLM(str(tiny_qwen3), stage=STAGE, **ENGINE_ARGS)


def test_dp2_answers_equal_dp1_streamed_and_not(dp_server, offline):
    """Completions (text and a list of prompts), n=2 seeded samples and chat, streamed and not:
    the same text as one engine, and both replicas served some of them."""
    client = dp_server.client()
    prompts = ["the engine", "A block table maps", "Paged attention reads keys", "x"]
    refs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for prompt, ref in zip(prompts, refs):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == ref.outputs[0].text
        assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == ref.outputs[0].text
    listed = client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in listed.choices] == [r.outputs[0].text for r in refs]

    samples = offline.generate("the engine", SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12),
                               use_tqdm=False)[0].outputs
    assert samples[0].text != samples[1].text
    out = client.completions.create(model=MODEL, prompt="the engine", n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.text for c in out.choices] == [s.text for s in samples]

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == ref.text
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert all(n > 0 for n in dp_server.routed()), f"one replica served everything: {dp_server.routed()}"


def test_prefix_aware_routes_each_conversation_back_to_its_replica(dp_server):
    """Two conversations, two turns each: each second turn goes to the replica of its first,
    and that replica's prefix cache finds the first turn's blocks (the hits counter grows by at
    least the system prompt's full blocks)."""
    client = dp_server.client()
    replicas = []
    for name in ("Ada", "Bob"):
        # each conversation its own system prompt: a shared one would (rightly) pull both to
        # the replica that holds it
        system = f"{name}'s assistant. {SYSTEM}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"I am {name}."}]
        # equal loads (KV usage is the tie-break, from reports ~0.2 s old): the tie rotates
        wait_for(lambda: all(r.kv_cache_usage == 0 for r in dp_server.dp.replicas), "idle replicas")
        before = dp_server.routed()
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        first = [a - b for a, b in zip(dp_server.routed(), before)].index(1)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And what is a block?"}]
        wait_for(lambda: metric(dp_server.metrics(), "prefix_cache_queries_total", f'replica="{first}"') > 0,
                 "the replica's stats report")
        hits_before = metric(dp_server.metrics(), "prefix_cache_hits_total", f'replica="{first}"')
        before = dp_server.routed()
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        second = [a - b for a, b in zip(dp_server.routed(), before)].index(1)
        replicas.append((first, second))
        block_size = dp_server.dp.engine.config.block_size
        system_tokens = len(dp_server.dp.engine.tokenizer.encode(system))
        wait_for(lambda: metric(dp_server.metrics(), "prefix_cache_hits_total", f'replica="{first}"')
                 >= hits_before + system_tokens // block_size * block_size, "the second turn's prefix hit")
    assert all(first == second for first, second in replicas), replicas
    assert replicas[0][0] != replicas[1][0], "both conversations on one replica: least-loaded did not spread"


def total(text: str, name: str, *labels: str) -> float:
    """The sum over replicas of `folovllm:<name>` samples whose labels contain all `labels`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"folovllm:{name}{{") and all(label in line for label in labels))


def test_disconnect_aborts_on_the_replica_and_frees_its_kv(dp_server):
    before = total(dp_server.metrics(), "request_success_total", 'finished_reason="abort"')
    stream = dp_server.client().completions.create(model=MODEL, prompt="the engine", max_tokens=LONG,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert all(next(stream).choices[0].finish_reason is None for _ in range(3))
    stream.close()

    wait_for(lambda: total(dp_server.metrics(), "request_success_total", 'finished_reason="abort"') == before + 1,
             "the replica to abort the request")
    wait_for(lambda: all(metric(dp_server.metrics(), "kv_cache_usage_perc", f'replica="{i}"') == 0
                         for i in range(2)), "every replica's KV back")
    assert all(r.num_requests == 0 for r in dp_server.dp.replicas)


def test_bad_input_is_refused_by_the_replicas_engine_as_a_400(dp_server):
    """The front only routes; the replica's engine checks, and its message comes back as it
    would from one engine. Nothing is left in flight."""
    client = dp_server.client()
    for prompt, message in (([5] * 600, "prompt has 600 tokens, more than max_model_len=512"),
                            ([10**6], "prompt token ids must be integers in [0,")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert info.value.param == "prompt" and message in info.value.message
    assert all(r.num_requests == 0 for r in dp_server.dp.replicas)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_metrics_and_health_show_each_replica(dp_server):
    text = dp_server.metrics()
    assert text.count("# TYPE folovllm:num_requests_running gauge") == 1
    for i in range(2):
        assert f'folovllm:num_requests_running{{replica="{i}",model_name="{MODEL}"}}' in text
    health = httpx.get(f"{dp_server.root}/health")
    assert health.status_code == 200
    assert [(r["replica"], r["alive"]) for r in health.json()["replicas"]] == [(0, True), (1, True)]


def test_a_killed_replica_fails_its_requests_and_the_other_keeps_serving(dp_server, offline):
    """Last in the module: it kills replica 0 for good."""
    dp = dp_server.dp
    client = dp_server.client()
    # open long streams until one is on replica 0
    streams = []
    while dp.replicas[0].num_requests == 0:
        streams.append(client.completions.create(model=MODEL, prompt=f"the engine {len(streams)}",
                                                 max_tokens=LONG, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
        next(streams[-1])
    victim = dp.replicas[0].process.pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not dp.replicas[0].alive, "the front to see replica 0 die")
    on_victim = streams[-1]
    with pytest.raises(openai.APIError, match="data-parallel replica 0 exited with code -9"):
        for _ in on_victim:
            pass
    for s in streams[:-1]:
        s.close()
    ref = offline.generate("A block table maps", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for _ in range(3):  # round after round, all on replica 1 now
        out = client.completions.create(model=MODEL, prompt="A block table maps", max_tokens=8, temperature=0)
        assert out.choices[0].text == ref[0].outputs[0].text
    health = httpx.get(f"{dp_server.root}/health")
    assert health.status_code == 200
    dead = health.json()["replicas"][0]
    assert (dead["alive"], dead["pid"], dead["num_requests"], dead["error"]) == (False, victim, 0, "exited with code -9")
    assert dp.replicas[1].alive and not pid_alive(victim) or _is_zombie(victim)


def test_sigterm_stops_the_front_and_every_replica(tiny_qwen3):
    """`folovllm serve --data-parallel-size 2` as a user runs it: SIGTERM to the front lets the
    open stream finish, then the front exits 0 and no replica process is left."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "folovllm.entrypoints.cli", "serve", str(tiny_qwen3),
                             "--stage", str(STAGE), "--dtype", "float32", "--max-model-len", "512",
                             "--port", str(port), "--served-model-name", MODEL, "--data-parallel-size", "2",
                             "--data-parallel-routing", "least_loaded", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"{root}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the DP server to start", timeout=120)
        pids = [r["pid"] for r in httpx.get(f"{root}/health").json()["replicas"]]
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt="the engine", max_tokens=24, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(stream)
        proc.send_signal(signal.SIGTERM)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"  # drained, not cut
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:  # only ours; by pid, never by name
            if pid_alive(pid) and not _is_zombie(pid):
                os.kill(pid, signal.SIGKILL)
    assert pids and not any(pid_alive(p) for p in pids), "a replica outlived the server"


def test_bad_data_parallel_options_are_clear_errors(tiny_qwen3):
    from folovllm.entrypoints.cli import main

    with pytest.raises(ValueError, match="--data-parallel-size must be a positive integer, got 0"):
        DPAsyncLLM(str(tiny_qwen3), EngineConfig.for_stage(STAGE, **ENGINE_ARGS), data_parallel_size=0)
    with pytest.raises(ValueError, match="--data-parallel-routing must be one of"):
        DPAsyncLLM(str(tiny_qwen3), EngineConfig.for_stage(STAGE, **ENGINE_ARGS), 2, routing="random")
    assert main(["serve", str(tiny_qwen3), "--data-parallel-size", "2", "--trace"]) == 2
    assert json  # (imported for symmetry with test_server; keeps the linter quiet)
