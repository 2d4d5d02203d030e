"""The OpenAI API's request and response bodies as pydantic models (vLLM keeps them in the same
place, `vllm/entrypoints/openai/protocol.py`).

Pydantic checks types and shapes (a string where a number belongs, an unknown field); the
*values* are checked by `SamplingParams` and `LLMEngine.add_request`, so the server answers with
the engine's own messages ("top_p must be in (0, 1], got 1.5") and there is one rule per value.

Fields beyond OpenAI's, as `vllm serve` has them (the `openai` client sends them through
`extra_body`): top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens, allowed_token_ids, bad_words, structured_outputs (stage 10, beside OpenAI's
response_format); for chat, chat_template_kwargs (e.g.
{"enable_thinking": false} for Qwen3). OpenAI's `logit_bias` has string keys (JSON object keys);
`SamplingParams` reads them as token ids.
Unknown fields are refused (400) rather than silently ignored.

Text fields refuse lone UTF-16 surrogates (JSON may spell "\\ud800" without its pair, Python
keeps it, and the tokenizer or the JSON encoder of the answer then raised a 500); token ids
refuse booleans (JSON `true` is not token 1).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError,
                      ValidatorFunctionWrapHandler, WrapValidator)
from pydantic_core import PydanticCustomError

from folovllm.sampling_params import RequestOutputKind, SamplingParams


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


LONE_SURROGATE = ("contains a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), which is "
                  "not valid Unicode text")


def _valid_unicode(value: Any) -> Any:
    """`value` (a string, or any JSON value holding strings) if every string in it is valid
    Unicode: a lone surrogate cannot be encoded as UTF-8, so nothing downstream could use it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("lone_surrogate", LONE_SURROGATE) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key), _valid_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode(item)
    return value


def _one_of(forms: str) -> WrapValidator:
    """A union's errors as one, at the field's own path: pydantic reports one error per member
    of a union, at paths like `prompt.str` (`prompt: 123`). A lone surrogate keeps its message."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            if any(err["type"] == "lone_surrogate" for err in e.errors()):
                raise PydanticCustomError("lone_surrogate", LONE_SURROGATE) from None
            raise PydanticCustomError("wrong_form", f"must be {forms}") from None

    return WrapValidator(validate)


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = list[StrictInt]  # strict: `true` and `1.0` are not token ids
Prompt = Annotated[Union[Text, TokenIds, list[Text], list[TokenIds]],
                   _one_of("a string or a list of token ids (integers), or a list of one of those")]
Stop = Annotated[Union[Text, list[Text]], _one_of("a string or a list of strings")]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


# --8<-- [start:response_format]
class JsonSchemaFormat(OpenAIBaseModel):
    name: Text
    description: Optional[Text] = None
    schema_: Annotated[Optional[dict[str, Any]], AfterValidator(_valid_unicode)] = Field(
        default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's `response_format` (stage 10): "text" (no constraint), "json_object" (any JSON
    object) or "json_schema" (JSON that validates against `json_schema.schema`)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsRequest(OpenAIBaseModel):
    """vLLM's extra body field `structured_outputs`: exactly one of these (SamplingParams'
    `StructuredOutputsParams`)."""

    json_: Annotated[Union[dict[str, Any], Text, None], AfterValidator(_valid_unicode)] = Field(
        default=None, alias="json")
    regex: Optional[Text] = None
    choice: Optional[list[Text]] = None
    grammar: Optional[Text] = None
    json_object: Optional[bool] = None


def structured_outputs_of(response_format: Optional[ResponseFormat],
                          structured: Optional[StructuredOutputsRequest]) -> Optional[dict[str, Any]]:
    """The request's structured output as `StructuredOutputsParams` fields, None for none.
    ValueError (naming the field) for a json_schema without a schema, or both fields at once."""
    if response_format is not None and response_format.type != "text":
        if structured is not None:
            raise ValueError("response_format: send response_format or structured_outputs, not both")
        if response_format.type == "json_object":
            return {"json_object": True}
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise ValueError('response_format: type "json_schema" needs json_schema.schema')
        return {"json": response_format.json_schema.schema_}
    if structured is None:
        return None
    fields = structured.model_dump(by_alias=True, exclude_none=True)
    return fields
# --8<-- [end:response_format]


# The request fields that are `SamplingParams` fields of the same name and meaning.
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                   "min_tokens", "ignore_eos", "skip_special_tokens", "logit_bias",
                   "allowed_token_ids", "bad_words")


# --8<-- [start:sampling_fields]
class SamplingRequest(OpenAIBaseModel):
    """The fields both endpoints share. None means "not sent": SamplingParams' default applies."""

    model: Text
    n: Optional[int] = Field(default=None, le=128)  # OpenAI's limit: one request, at most 128 samples
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop: Optional[Stop] = None
    stop_token_ids: Optional[TokenIds] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    logit_bias: Optional[dict[Text, float]] = None  # {"token id": bias}, OpenAI's string keys
    allowed_token_ids: Optional[TokenIds] = None
    bad_words: Optional[list[Text]] = None
    response_format: Optional[ResponseFormat] = None  # stage 10
    structured_outputs: Optional[StructuredOutputsRequest] = None  # stage 10, vLLM's extra field
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[Text] = None  # accepted and ignored, as by OpenAI for abuse tracking

    def to_sampling_params(self, max_tokens: Optional[int], **extra: Any) -> SamplingParams:
        """Raises ValueError with SamplingParams' message on a bad value. `extra`: the fields an
        endpoint maps itself (logprobs)."""
        sent = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        kind = RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY
        structured = structured_outputs_of(self.response_format, self.structured_outputs)
        return SamplingParams(max_tokens=max_tokens, output_kind=kind, **sent, **extra,
                              structured_outputs=structured)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage
# --8<-- [end:sampling_fields]


class CompletionRequest(SamplingRequest):
    # A string or token ids, or a list of those: one request per prompt, `n` choices each.
    prompt: Prompt
    max_tokens: Optional[int] = 16  # 0 only with echo: the prompt's log-probabilities alone
    # The sampled token and the `logprobs` most likely ones per position (OpenAI allows 0..5,
    # vLLM up to its max_logprobs, as here); with echo, the prompt's positions too.
    logprobs: Optional[int] = Field(default=None, ge=0)
    echo: bool = False  # the answer's text (and logprobs) start with the prompt's
    # vLLM's extra: the prompt's log-probabilities in vLLM's own shape, `choices[].prompt_logprobs`
    # (per prompt position {token id: {logprob, rank, decoded_token}}, None first), with the
    # prompt's token and the k most likely; -1 = the whole vocabulary. Not with stream (vLLM).
    prompt_logprobs: Optional[int] = None

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: lm-evaluation-harness's likelihood request. The engine
        samples one token (SamplingParams needs >= 1, as vLLM's), which the answer leaves out."""
        return self.echo and self.max_tokens == 0


class ChatContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Union[Text, list[ChatContentPart], None],
                       _one_of('a string or a list of {"type": "text", "text": ...} parts')] = None
    name: Optional[Text] = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None  # each generated token's log-probability ...
    top_logprobs: Optional[int] = Field(default=None, ge=0)  # ... and the k most likely
    add_generation_prompt: bool = True
    chat_template_kwargs: Annotated[Optional[dict[str, Any]], AfterValidator(_valid_unicode)] = None


# -- responses --------------------------------------------------------------------------------


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class _Response(OpenAIBaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionLogprobs(OpenAIBaseModel):
    """OpenAI's completions shape: per token its text, log-probability, {text: logprob} of the
    scored and the top tokens, and where its text starts in the choice's text. The echoed
    prompt's first token has no log-probability (nothing comes before it): None, as vLLM."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None  # the token's UTF-8 bytes (a token may be half a character)


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class _Choice(OpenAIBaseModel):
    index: int
    finish_reason: Optional[str] = None  # None while a streamed choice runs
    stop_reason: Union[int, str, None] = None  # vLLM's extra: the stop string or token id hit


class PromptLogprob(OpenAIBaseModel):
    """vLLM's `Logprob` as its server sends it in `prompt_logprobs`."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


class CompletionChoice(_Choice):
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    # vLLM's extra, only when the request asked for `prompt_logprobs` (JSON keys: token ids)
    prompt_logprobs: Optional[list[Optional[dict[int, PromptLogprob]]]] = Field(default=None, exclude_if=lambda v: v is None)


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's `/tokenize`: a text prompt -> its token ids, as the engine tokenizes it."""

    model: Optional[Text] = None
    prompt: Text
    add_special_tokens: bool = False  # the engine adds none to a completion's prompt


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[Text] = None
    tokens: TokenIds


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "folovllm"
    max_model_len: int
    root: Optional[str] = None  # a LoRA adapter's path (stage 11)
    parent: Optional[str] = None  # a LoRA adapter's base model


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    """vLLM's POST /v1/load_lora_adapter body (stage 11)."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    """vLLM's POST /v1/unload_lora_adapter body (stage 11)."""

    lora_name: str
    lora_int_id: Optional[int] = None
