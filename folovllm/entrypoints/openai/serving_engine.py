"""`OpenAIServing`: what `/v1/completions` and `/v1/chat/completions` share (vLLM's
`serving_engine.py`): model check, request -> `SamplingParams`, adding to the `AsyncLLM`,
waiting for the answer while watching for a disconnect, and the server-sent-events loop.

A request's life in the server::

    body ─► API key, size, time ─► pydantic ─► model, prompt chars ─► SamplingParams
            (401, 413, 408)        (400)       (404, 400)             (400)
         ─► queue full? ─► AsyncLLM.add_request: tokenized in an input thread ─► RequestStream
            (503)           (400: the engine's message)
    stream=false: wait for the final output | client disconnects  ─► answer with usage
    stream=true:  data: {chunk} per delta ... [usage chunk] data: [DONE]
    either way, leaving early closes the stream: the request is aborted, its KV freed.

Every error a client can cause is an `APIError`, answered in OpenAI's shape by the app. What a
client can make large is capped before it costs anything (`ServerOptions`): the body's bytes
(the app, before parsing), the prompt's characters (before tokenizing), the stop list.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from folovllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError, RequestStream
from folovllm.engine.llm_engine import PromptType
from folovllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo, usage
from folovllm.outputs import CompletionOutput, RequestOutput
from folovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from folovllm.entrypoints.openai.serving_models import OpenAIServingModels


class APIError(Exception):
    """An error to send to the client: HTTP status plus OpenAI's error fields."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    @classmethod
    def bad_request(cls, message: str, request: Optional[BaseModel] = None) -> "APIError":
        """400; `param` is the request field the message starts with, as the engine's
        messages do ("top_p must be in (0, 1], got 1.5")."""
        first_word = message.split(" ", 1)[0].split(".", 1)[0].rstrip(":")  # "structured_outputs.json:"
        param = first_word if request is not None and first_word in type(request).model_fields else None
        if param == "structured_outputs" and getattr(request, "response_format", None) is not None:
            param = "response_format"  # the engine names the field the server filled from it
        return cls(400, message, param=param)


# --8<-- [start:server_options]
@dataclass(frozen=True)
class ServerOptions:
    """The limits `folovllm serve` puts on one request (its options of the same names).
    Each is checked before the work it bounds, so an oversized request costs the server
    nothing but its answer."""

    # Template source is code: run only the model's own template unless clients are trusted.
    trust_request_chat_template: bool = False
    # The body is read (up to this) before it is parsed: 413 past it. A prompt of 40,960 token
    # ids (Qwen3's max_model_len) is ~330 KB of JSON, of 128k ids ~1 MB. Parsing happens on the
    # event loop: 2 MiB of token ids (~700k) take ~100 ms.
    max_request_bytes: int = 2 * 2**20
    # A text prompt (or a chat's messages, and the rendered chat) longer than this is refused
    # before tokenizing (~1 s in an input thread, ~250k tokens of English).
    max_prompt_chars: int = 1_000_000
    # OpenAI allows 4 stop strings and vLLM has no cap; these are far above what clients send,
    # and bound the stop-string matcher a request builds (engine/stop_strings.py).
    max_stop_strings: int = 1024
    max_stop_chars: int = 16384
    # Backpressure: while this many requests wait (queued in the scheduler or being tokenized;
    # each sample of n counts), a new one is answered 503 with Retry-After instead of joining
    # the queue; an accepted request is never dropped. None: no limit, as vLLM (its benchmark and lm-eval
    # send hundreds of requests at once and expect them all queued, not refused).
    max_waiting_requests: Optional[int] = None
    # The whole body must arrive within this many seconds of the headers, or the connection
    # gets 408 and is closed (uvicorn has no such timeout: a client that sends headers and then
    # trickles its body, or never ends it, held its connection for ever). 60 s is nginx's
    # client_body_timeout; here it bounds the whole body, which is at most max_request_bytes.
    # The headers get as long, from the connection (or its last answer): else it is closed.
    request_body_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_prompt_chars", "max_stop_strings", "max_stop_chars",
                     "max_waiting_requests"):
            value = getattr(self, name)
            if value is None and name == "max_waiting_requests":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        timeout = self.request_body_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"--request-body-timeout must be a positive number of seconds, got {timeout!r}")
# --8<-- [end:server_options]


# Seconds a client refused for a full queue is told to wait (Retry-After; the `openai` client
# honours it): about the time a short request spends in the queue of a busy CPU server.
RETRY_AFTER_S = 1


# A chunk maker: (choice index, that choice's delta, the request's output it came in; or None,
# None, None) and (usage, or None) -> the endpoint's chunk.
ChunkMaker = Callable[[Optional[int], Optional[CompletionOutput], Optional[RequestOutput],
                       Optional[UsageInfo]], BaseModel]


class OpenAIServing:
    def __init__(self, async_llm: AsyncLLM, model_name: str, options: ServerOptions) -> None:
        self.async_llm = async_llm
        self.model_name = model_name
        self.options = options
        self.models: Optional["OpenAIServingModels"] = None  # stage 11: the LoRA adapters served

    def check_request(self, request: SamplingRequest) -> None:
        """What both endpoints refuse before any work: another model, stream_options without
        stream (as OpenAI)."""
        self.check_model(request.model)
        if request.stream_options is not None and not request.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def check_capacity(self) -> None:
        """503 with Retry-After while `--max-waiting-requests` or more are waiting (each sample
        of `n` of each prompt counts, as the scheduler queues them). Checked once per HTTP
        request, before any of its work: a list of prompts is admitted whole or not at all, and
        a request larger than the limit still runs once the queue is below it (refusing it for
        good would make Retry-After a lie). So the queue may pass the limit by the samples of
        the requests admitted while it was below."""
        limit = self.options.max_waiting_requests
        if limit is None:
            return
        waiting = self.async_llm.num_waiting
        if waiting >= limit:
            raise APIError(503, f"the server is busy: {waiting} requests are waiting, its limit is "
                                f"{limit} (--max-waiting-requests); retry after {RETRY_AFTER_S} s",
                           type="server_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_model(self, model: Optional[str]) -> None:
        """404 for a model this server does not serve (None: not named, as /tokenize allows)."""
        if model is not None and model != self.model_name and not (self.models and self.models.is_served(model)):
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    def response_model(self, request: SamplingRequest) -> str:
        """The `model` a response names: the adapter the request chose (stage 11), as vLLM
        answers, else the model served."""
        lora = self.models.lora_request(request.model) if self.models else None
        return self.models.model_name(lora) if self.models else self.model_name

    def decode_one(self, token_id: int) -> str:
        """One token's text alone (a position the engine gave no text for: the prompt's first)."""
        return self.async_llm.engine.tokenizer.decode([token_id])

    def check_prompt_chars(self, num_chars: int, field: str) -> None:
        limit = self.options.max_prompt_chars
        if num_chars > limit:
            raise APIError(400, f"{field} has {num_chars} characters, more than this server's "
                                f"limit of {limit} (--max-prompt-chars)", param=field)

    def sampling_params(self, request: SamplingRequest, max_tokens: Optional[int],
                        **extra: object) -> SamplingParams:
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        if len(stops) > self.options.max_stop_strings:  # counted first: a huge list is not read
            raise APIError(400, f"stop has {len(stops)} strings, more than this server's limit of "
                                f"{self.options.max_stop_strings} (--max-stop-strings)", param="stop")
        num_chars = sum(map(len, stops))
        if num_chars > self.options.max_stop_chars:
            raise APIError(400, f"stop has {num_chars} characters in all, more than this server's "
                                f"limit of {self.options.max_stop_chars} (--max-stop-chars)", param="stop")
        try:
            return request.to_sampling_params(max_tokens, **extra)
        except ValueError as e:
            raise APIError.bad_request(str(e), request) from e

    async def add_request(self, request: SamplingRequest, request_id: str, prompt: PromptType,
                          params: SamplingParams, prompt_field: str) -> RequestStream:
        try:
            lora = self.models.lora_request(request.model) if self.models else None
            return await self.async_llm.add_request(request_id, prompt, params, lora_request=lora)
        except ValueError as e:
            message = str(e)
            if message.startswith("prompt"):  # empty, too long, bad token ids
                raise APIError(400, message, param=prompt_field) from e
            raise APIError.bad_request(message, request) from e

    # --8<-- [start:final_output]
    async def final_outputs(self, streams: list[RequestStream],
                            raw_request: Request) -> Optional[list[RequestOutput]]:
        """Each request's last output (one per prompt), or None if the client went away first
        (then the requests are aborted: Starlette does not cancel a handler whose client
        disconnects)."""
        async with AsyncExitStack() as opened:
            for stream in streams:
                await opened.enter_async_context(stream)
            result = asyncio.ensure_future(asyncio.gather(*map(_last, streams)))
            disconnect = asyncio.ensure_future(_wait_for_disconnect(raw_request))
            try:
                done, _ = await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                result.cancel()
                disconnect.cancel()
            outputs = result.result() if result in done else None
        for output in outputs or ():
            failed = [c for c in output.outputs if c.finish_reason == "error"]
            if failed:  # a step raised on this request alone (LLMEngine._execute_model)
                raise APIError(500, f"the request failed in the engine: {failed[0].error}",
                               type="server_error")
        return outputs
    # --8<-- [end:final_output]

    # --8<-- [start:sse]
    def stream_response(self, streams: list[RequestStream], make_chunk: ChunkMaker, n: int,
                        include_usage: bool, first_chunks: tuple[BaseModel, ...] = (),
                        count_completion_tokens: bool = True) -> StreamingResponse:
        """Server-sent events: one `data: {chunk}` per new piece of text of any sample of any
        prompt (choice index = prompt index * n + sample index), one chunk with its
        finish_reason per choice, a usage chunk if asked, then `data: [DONE]`. A client that
        disconnects cancels the generator (Starlette listens for it), and leaving the `async
        with` aborts every request. Whatever ends the stream from the server's side still ends
        it this way: a shutdown sends the open choices `finish_reason: "abort"`, a failure an
        error event."""

        async def events() -> AsyncIterator[str]:
            prompt_tokens = [0] * len(streams)
            completion_tokens = 0
            finished: set[int] = set()  # choices whose finish chunk is sent (outputs repeat it)
            error: Optional[ErrorInfo] = None
            try:
                async with AsyncExitStack() as opened:
                    for stream in streams:
                        await opened.enter_async_context(stream)
                    for chunk in first_chunks:
                        yield _sse(chunk)
                    async for prompt_index, output in _merged(streams):  # DELTA outputs: only what is new
                        prompt_tokens[prompt_index] = len(output.prompt_token_ids)
                        for completion in output.outputs:
                            index = prompt_index * n + completion.index
                            if index in finished:
                                continue
                            completion_tokens += len(completion.token_ids) * count_completion_tokens
                            if completion.text or completion.finish_reason is not None \
                                    or completion.logprobs or output.prompt_logprobs:
                                yield _sse(make_chunk(index, completion, output, None))
                            if completion.finish_reason is not None:
                                finished.add(index)
                            if completion.finish_reason == "error":
                                raise RequestFailedError(f"the request failed in the engine: {completion.error}")
            except RequestAbortedError:  # the shutdown grace is over
                for index in sorted(set(range(n * len(streams))) - finished):
                    yield _sse(make_chunk(index, CompletionOutput(index % n, "", [], finish_reason="abort"),
                                          None, None))
            except (EngineDeadError, RequestFailedError) as e:
                error = ErrorInfo(message=str(e), type="server_error")
            if error is not None:
                yield _sse(ErrorResponse(error=error))
            elif include_usage:
                yield _sse(make_chunk(None, None, None, usage(sum(prompt_tokens), completion_tokens)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    # --8<-- [end:sse]


class RequestFailedError(RuntimeError):
    """A sample finished with finish_reason "error": a step raised on its request alone."""


def usage_of(output: RequestOutput) -> UsageInfo:
    return usage(len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs))


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of several streams as they come; the first error ends it."""
    if len(streams) == 1:  # the common case: no tasks
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as e:  # handed to the reader, which raises it
            queue.put_nowait((index, e))
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _last(stream: RequestStream) -> RequestOutput:
    output = None
    async for output in stream:
        pass
    assert output is not None
    return output


async def _wait_for_disconnect(raw_request: Request) -> None:
    # After the body is read, the next ASGI message is the disconnect (or nothing, until the
    # answer is sent and this task is cancelled).
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass
