"""`POST /v1/completions`: one prompt (text or token ids) in, `n` completions out."""

from __future__ import annotations

import uuid
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from folovllm.engine.llm_engine import PromptType
from folovllm.entrypoints.openai.protocol import (CompletionChoice, CompletionRequest,
                                                  CompletionResponse, UsageInfo)
from folovllm.entrypoints.openai.serving_engine import APIError, OpenAIServing, usage_of
from folovllm.outputs import CompletionOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        self.check_request(request)
        if request.logprobs is not None:
            raise APIError(400, "logprobs is not supported: the engine does not compute "
                                "log-probabilities", param="logprobs")
        prompt = _single_prompt(request.prompt)
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), "prompt")
        params = self.sampling_params(request, request.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await self.add_request(request, request_id, prompt, params, prompt_field="prompt")

        def response(choices: list[CompletionChoice], usage: Optional[UsageInfo]) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if request.stream:
            def chunk(completion: Optional[CompletionOutput], usage: Optional[UsageInfo]) -> BaseModel:
                return response([] if completion is None else [_choice(completion)], usage)

            return self.stream_response(stream, chunk, params.n, request.include_usage)
        output = await self.final_output(stream, raw_request)
        if output is None:
            return Response(status_code=499)  # client closed the request (nginx's code)
        return JSONResponse(response([_choice(c) for c in output.outputs], usage_of(output)).model_dump())


def _choice(completion: CompletionOutput) -> CompletionChoice:
    return CompletionChoice(index=completion.index, text=completion.text,
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)


def _single_prompt(prompt: object) -> PromptType:
    """A string or a list of token ids; a batch of one is unwrapped, larger batches refused."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt must be one prompt (a string or a list of token ids); "
                                f"got a batch of {len(prompt)}, send them as separate requests",
                           param="prompt")
        return prompt[0]
    return prompt  # type: ignore[return-value]
