"""Stage 10 through `folovllm serve`, with the official `openai` client: `response_format`
(json_schema, json_object) and vLLM's extra field `structured_outputs`, completions and chat,
streamed and not. The server fixture is tests/test_server.py's (a real uvicorn server).

Here and not in stages/10: the lab switch (`FOLOVLLM_LAB=starter pytest stages/10`) replaces
engine functions for every test under stages/10, and a starter's error in the server's engine
loop stops that shared server's engine: every later test of the module would fail on the same
error, far from the lab's own tests (tests/test_async_llm_errors.py: the client gets the error)."""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.test_server import MODEL, server  # noqa: F401  (the fixture)
from folovllm.structured_output.backend_xgrammar import xgrammar_available

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                    "maxItems": 2}},
          "required": ["name", "tags"]}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


def validates(value, schema) -> bool:
    """JSON `value` against SCHEMA's subset (object, string maxLength, array of an enum)."""
    if "enum" in schema:
        return value in schema["enum"]
    if schema["type"] == "object":
        return (isinstance(value, dict) and set(value) == set(schema["required"])
                and all(validates(value[k], schema["properties"][k]) for k in value))
    if schema["type"] == "array":
        return isinstance(value, list) and len(value) <= schema["maxItems"] and all(
            validates(v, schema["items"]) for v in value)
    return isinstance(value, str) and len(value) <= schema["maxLength"]


def streamed_text(stream, chat: bool) -> tuple[str, str]:
    text, reason = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += (choice.delta.content or "") if chat else choice.text
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_schema(server, stream):
    client = server.client()
    for seed in range(3):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "a person please"}],
                      max_tokens=60, temperature=1.0, seed=seed, response_format=JSON_SCHEMA_FORMAT)
        if stream:
            text, reason = streamed_text(client.chat.completions.create(stream=True, **kwargs), chat=True)
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        assert reason == "stop" and validates(json.loads(text), SCHEMA), text


@pytest.mark.parametrize("stream", [False, True])
def test_completions_structured_outputs_extra_field(server, stream):
    client = server.client()
    cases = [({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
             ({"regex": r"[a-c]{2,4}-\d{1,2}"}, lambda t: re.fullmatch(r"[a-c]{2,4}-\d{1,2}", t)),
             ({"json": SCHEMA}, lambda t: validates(json.loads(t), SCHEMA))]
    for spec, ok in cases:
        kwargs = dict(model=MODEL, prompt="the engine", max_tokens=60, temperature=1.0, seed=1, n=2,
                      extra_body={"structured_outputs": spec})
        if stream:
            text, reason = streamed_text(client.completions.create(stream=True, **{**kwargs, "n": 1}), chat=False)
            texts, reasons = [text], [reason]
        else:
            choices = client.completions.create(**kwargs).choices
            texts, reasons = [c.text for c in choices], [c.finish_reason for c in choices]
        assert reasons == ["stop"] * len(texts) and all(ok(t) for t in texts), (spec, texts)


@pytest.mark.skipif(not xgrammar_available(), reason="xgrammar is not installed")
def test_json_object_goes_to_xgrammar(server):
    choice = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json"}], max_tokens=80, temperature=1.0,
        seed=0, response_format={"type": "json_object"}).choices[0]
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("extra, param, message", [
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "structured_outputs.regex: invalid regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs", "Extra inputs are not permitted"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "needs json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 1}}}}, "response_format",
     "maxItems (1) < minItems (2)"),
    ({"response_format": {"type": "yaml"}}, "response_format", "Input should be"),
])
def test_bad_specs_are_400_naming_the_field(server, extra, param, message):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=MODEL, prompt="the", max_tokens=4, extra_body=extra)
    e = info.value
    assert e.status_code == 400 and message in e.message
    assert (e.param or "").split(".")[0] == param, e.param
