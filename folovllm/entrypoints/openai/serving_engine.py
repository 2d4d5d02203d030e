"""`OpenAIServing`: what `/v1/completions` and `/v1/chat/completions` share (vLLM's
`serving_engine.py`): model check, request -> `SamplingParams`, adding to the `AsyncLLM`,
waiting for the answer while watching for a disconnect, and the server-sent-events loop.

A request's life in the server::

    body ─ pydantic ─► check model ─► SamplingParams ─► AsyncLLM.add_request ─► RequestStream
           (400)         (404)          (400)             (400: engine's message)
    stream=false: wait for the final output | client disconnects  ─► answer with usage
    stream=true:  data: {chunk} per delta ... [usage chunk] data: [DONE]
    either way, leaving early closes the stream: the request is aborted, its KV freed.

Every error a client can cause is an `APIError`, answered in OpenAI's shape by the app.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from folovllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from folovllm.engine.llm_engine import PromptType
from folovllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo, usage
from folovllm.outputs import CompletionOutput, RequestOutput
from folovllm.sampling_params import SamplingParams


class APIError(Exception):
    """An error to send to the client: HTTP status plus OpenAI's error fields."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    @classmethod
    def bad_request(cls, message: str, request: Optional[BaseModel] = None) -> "APIError":
        """400; `param` is the request field the message starts with, as the engine's
        messages do ("top_p must be in (0, 1], got 1.5")."""
        first_word = message.split(" ", 1)[0]
        param = first_word if request is not None and first_word in type(request).model_fields else None
        return cls(400, message, param=param)


# A chunk maker: (one sample's delta, or None) and (usage, or None) -> the endpoint's chunk.
ChunkMaker = Callable[[Optional[CompletionOutput], Optional[UsageInfo]], BaseModel]


class OpenAIServing:
    def __init__(self, async_llm: AsyncLLM, model_name: str) -> None:
        self.async_llm = async_llm
        self.model_name = model_name

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    def sampling_params(self, request: SamplingRequest, max_tokens: Optional[int]) -> SamplingParams:
        try:
            return request.to_sampling_params(max_tokens)
        except ValueError as e:
            raise APIError.bad_request(str(e), request) from e

    async def add_request(self, request: SamplingRequest, request_id: str, prompt: PromptType,
                          params: SamplingParams, prompt_field: str) -> RequestStream:
        try:
            return await self.async_llm.add_request(request_id, prompt, params)
        except ValueError as e:
            message = str(e)
            if message.startswith("prompt"):  # empty, too long, bad token ids
                raise APIError(400, message, param=prompt_field) from e
            raise APIError.bad_request(message, request) from e

    # --8<-- [start:final_output]
    async def final_output(self, stream: RequestStream, raw_request: Request) -> Optional[RequestOutput]:
        """The request's last output, or None if the client went away first (then the request
        is aborted: Starlette does not cancel a handler whose client disconnects)."""
        async with stream:
            result = asyncio.ensure_future(_last(stream))
            disconnect = asyncio.ensure_future(_wait_for_disconnect(raw_request))
            try:
                done, _ = await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                result.cancel()
                disconnect.cancel()
            return result.result() if result in done else None
    # --8<-- [end:final_output]

    # --8<-- [start:sse]
    def stream_response(self, stream: RequestStream, make_chunk: ChunkMaker, include_usage: bool,
                        first_chunks: tuple[BaseModel, ...] = ()) -> StreamingResponse:
        """Server-sent events: one `data: {chunk}` per new piece of text of any sample, a usage
        chunk if asked, then `data: [DONE]`. A client that disconnects cancels the generator
        (Starlette listens for it), and `async with stream` aborts the request."""

        async def events() -> AsyncIterator[str]:
            prompt_tokens = completion_tokens = 0
            try:
                async with stream:
                    for chunk in first_chunks:
                        yield _sse(chunk)
                    async for output in stream:  # DELTA outputs: only what is new
                        prompt_tokens = len(output.prompt_token_ids)
                        for completion in output.outputs:
                            completion_tokens += len(completion.token_ids)
                            if completion.text or completion.finish_reason is not None:
                                yield _sse(make_chunk(completion, None))
                if include_usage:
                    yield _sse(make_chunk(None, usage(prompt_tokens, completion_tokens)))
            except EngineDeadError as e:
                yield _sse(ErrorResponse(error=ErrorInfo(message=str(e), type="server_error")))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    # --8<-- [end:sse]


def usage_of(output: RequestOutput) -> UsageInfo:
    return usage(len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs))


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


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
