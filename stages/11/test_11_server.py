"""Stage 11 through `folovllm serve`: two adapters and the base model through the official
`openai` client, each equal to the offline engine under the same adapter (whose tokens
`test_11_multi_lora.py` checks against HF + PEFT); adapters loaded and unloaded at run time;
errors as 400/404 naming the field."""

from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig
from folovllm.engine.async_llm import AsyncLLM
from folovllm.engine.llm_engine import LLMEngine
from folovllm.entrypoints.openai.api_server import build_app
from tests.helpers import uvicorn_in_thread

MODEL = "tiny-qwen3"
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=16)
PROMPTS = ["the engine schedules", "A block table maps pages", "x"]


@pytest.fixture(scope="module")
def lora_adapters(adapters):
    return adapters("qwen3")


@pytest.fixture(scope="module")
def base_url(tiny_qwen3, lora_adapters) -> Iterator[str]:
    engine = LLMEngine(str(tiny_qwen3), EngineConfig.for_stage(6, **ENGINE_ARGS))
    modules = [(n, str(lora_adapters[n].path)) for n in ("A", "B")]
    app = build_app(AsyncLLM(engine, MODEL), MODEL, lora_modules=modules)
    with uvicorn_in_thread(app) as (root, _):
        yield f"{root}/v1"


@pytest.fixture(scope="module")
def offline(tiny_qwen3, lora_adapters):
    llm = LLM(str(tiny_qwen3), stage=6, **ENGINE_ARGS)

    def texts(name):
        lora = None if name is None else lora_adapters[name].request
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                            lora_request=lora)
        return [o.outputs[0].text for o in outs]

    return texts


def completions(client: openai.OpenAI, model: str) -> list[str]:
    out = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0)
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


def test_adapters_and_base_through_openai(base_url, offline, lora_adapters):
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "A", "B"]
    results = {}
    for model, name in ((MODEL, None), ("A", "A"), ("B", "B")):
        results[name] = completions(client, model)
        assert results[name] == offline(name)
    assert results["A"] != results[None] and results["B"] != results[None]
    chat = client.chat.completions.create(model="B", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError, match="model"):
        completions(client, "C")


def test_response_names_the_adapter(base_url):
    """Every response says which model answered: the adapter the request chose, as vLLM does
    (completions and chat, whole and each streamed chunk); the base model's name otherwise."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    for model in (MODEL, "A", "B"):
        out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert out.model == model
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0)
        assert chat.model == model
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert len(chunks) > 1 and {c.model for c in chunks} == {model}
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=3,
                                                     temperature=0, stream=True))
        assert len(chunks) > 1 and {c.model for c in chunks} == {model}


def test_load_and_unload_at_run_time(base_url, offline, lora_adapters, tmp_path):
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    http = httpx.Client(base_url=base_url)
    body = {"lora_name": "C", "lora_path": str(lora_adapters["C"].path)}
    r = http.post("/load_lora_adapter", json=body)
    assert r.status_code == 200, r.text
    assert "C" in [m.id for m in client.models.list().data]
    assert completions(client, "C") == offline("C")

    r = http.post("/load_lora_adapter", json=body)  # the name is taken
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = http.post("/load_lora_adapter", json={"lora_name": "D", "lora_path": str(tmp_path / "none")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert "does not exist" in r.json()["error"]["message"]
    r = http.post("/load_lora_adapter", json={"lora_name": "D"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"

    assert http.post("/unload_lora_adapter", json={"lora_name": "C"}).status_code == 200
    assert "C" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        completions(client, "C")
    r = http.post("/unload_lora_adapter", json={"lora_name": "C"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    assert completions(client, "A") == offline("A")  # the others are untouched


def test_serve_command_line_takes_lora_modules():
    from folovllm.entrypoints.cli import _engine_kwargs, build_parser
    from folovllm.entrypoints.openai.serving_models import parse_lora_modules

    args = build_parser().parse_args(["serve", "m", "--enable-lora", "--max-loras", "3", "--max-lora-rank", "8",
                                      "--lora-modules", "a=/x", "b=/y=z"])
    assert parse_lora_modules(args.lora_modules) == [("a", "/x"), ("b", "/y=z")]
    kw = _engine_kwargs(args)
    assert (kw["enable_lora"], kw["max_loras"], kw["max_lora_rank"]) == (True, 3, 8)
    with pytest.raises(ValueError, match="--lora-modules takes name=path pairs, got 'a'"):
        parse_lora_modules(["a"])
