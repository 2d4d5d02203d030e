"""`POST /v1/chat/completions`: messages through the model's chat template, then the same path as
a completion; the answer is an assistant message (streamed: a role delta, then content deltas)."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from folovllm.entrypoints.chat_utils import apply_chat_template, check_template_kwargs
from folovllm.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk,
                                                  ChatCompletionRequest, ChatCompletionResponse,
                                                  ChatResponseMessage, ChatStreamChoice,
                                                  DeltaMessage, UsageInfo)
from folovllm.entrypoints.openai.serving_engine import APIError, OpenAIServing, usage_of
from folovllm.outputs import CompletionOutput


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        self.check_request(request)
        if request.logprobs or request.top_logprobs:
            raise APIError(400, "logprobs is not supported: the engine does not compute "
                                "log-probabilities", param="logprobs")
        if request.max_completion_tokens is not None and request.max_completion_tokens < 1:
            raise APIError(400, "max_completion_tokens must be an integer >= 1, got "
                                f"{request.max_completion_tokens}", param="max_completion_tokens")
        max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        params = self.sampling_params(request, max_tokens)  # max_tokens None: up to max_model_len
        prompt = await self.render(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.add_request(request, request_id, prompt, params, prompt_field="messages")

        if request.stream:
            def chunk(completion: Optional[CompletionOutput], usage: Optional[UsageInfo]) -> BaseModel:
                choices = [] if completion is None else [ChatStreamChoice(
                    index=completion.index, delta=DeltaMessage(content=completion.text),
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)]
                return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage)

            # OpenAI's first chunk of each choice carries the role and no text.
            role_chunks = tuple(
                ChatCompletionChunk(id=request_id, model=self.model_name, choices=[ChatStreamChoice(
                    index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(params.n)
            )
            return self.stream_response(stream, chunk, params.n, request.include_usage, role_chunks)
        output = await self.final_output(stream, raw_request)
        if output is None:
            return Response(status_code=499)  # client closed the request (nginx's code)
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in output.outputs]
        return JSONResponse(ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                                   usage=usage_of(output)).model_dump())

    async def render(self, request: ChatCompletionRequest) -> str:
        """The prompt text, through the chat template in an input thread (a template is a
        program: even the model's own one takes time on long conversations)."""
        conversation = [m.as_template_input() for m in request.messages]
        self.check_prompt_chars(sum(len(m["content"]) for m in conversation), "messages")
        tokenizer = self.async_llm.engine.tokenizer
        kwargs = request.chat_template_kwargs or {}
        try:
            check_template_kwargs(tokenizer, kwargs, self.options.trust_request_chat_template)
        except ValueError as e:
            raise APIError(400, str(e), param="chat_template_kwargs") from e
        try:
            prompt = await self.async_llm.run_off_loop(
                partial(apply_chat_template, tokenizer, conversation, request.add_generation_prompt, **kwargs))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        self.check_prompt_chars(len(prompt), "messages")
        return prompt
