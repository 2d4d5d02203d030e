"""`POST /v1/chat/completions`: messages through the model's chat template, then the same path as
a completion; the answer is an assistant message (streamed: a role delta, then content deltas).
`logprobs: true` (+ `top_logprobs: k`) scores each generated token in OpenAI's chat shape
(`logprobs.content`, see logprobs.py), each streamed chunk its own tokens."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from folovllm.entrypoints.chat_utils import apply_chat_template, check_template_kwargs
from folovllm.entrypoints.openai.logprobs import chat_logprobs
from folovllm.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk,
                                                  ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                                                  ChatResponseMessage, ChatStreamChoice,
                                                  DeltaMessage, UsageInfo)
from folovllm.entrypoints.openai.serving_engine import APIError, OpenAIServing, usage_of
from folovllm.outputs import CompletionOutput, RequestOutput


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        self.check_request(request)
        top_k = request.top_logprobs or 0
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_logprobs = self.async_llm.engine.config.max_logprobs
        if max_logprobs != -1 and top_k > max_logprobs:
            raise APIError(400, f"top_logprobs must be at most this server's max_logprobs="
                                f"{max_logprobs}, got {top_k}", param="top_logprobs")
        if request.max_completion_tokens is not None and request.max_completion_tokens < 1:
            raise APIError(400, "max_completion_tokens must be an integer >= 1, got "
                                f"{request.max_completion_tokens}", param="max_completion_tokens")
        max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        params = self.sampling_params(request, max_tokens,  # max_tokens None: up to max_model_len
                                      logprobs=top_k if request.logprobs else None)
        self.check_capacity()  # before the template is rendered: a full queue costs nothing
        prompt = await self.render(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model_name = self.response_model(request)  # the adapter's name when it chose one
        stream = await self.add_request(request, request_id, prompt, params, prompt_field="messages")

        def logprobs(completion: CompletionOutput) -> Optional[ChatLogprobs]:
            if not request.logprobs or completion.logprobs is None:
                return None
            return chat_logprobs(completion.token_ids, completion.logprobs, top_k, self.decode_one)

        if request.stream:
            def chunk(index: Optional[int], completion: Optional[CompletionOutput],
                      output: Optional[RequestOutput], usage: Optional[UsageInfo]) -> BaseModel:
                choices = [] if index is None or completion is None else [ChatStreamChoice(
                    index=index, delta=DeltaMessage(content=completion.text), logprobs=logprobs(completion),
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)]
                return ChatCompletionChunk(id=request_id, model=model_name, choices=choices, usage=usage)

            # OpenAI's first chunk of each choice carries the role and no text.
            role_chunks = tuple(
                ChatCompletionChunk(id=request_id, model=model_name, choices=[ChatStreamChoice(
                    index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(params.n)
            )
            return self.stream_response([stream], chunk, params.n, request.include_usage, role_chunks)
        outputs = await self.final_outputs([stream], raw_request)
        if outputs is None:
            return Response(status_code=499)  # client closed the request (nginx's code)
        output = outputs[0]
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), logprobs=logprobs(c),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in output.outputs]
        return JSONResponse(ChatCompletionResponse(id=request_id, model=model_name, choices=choices,
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
