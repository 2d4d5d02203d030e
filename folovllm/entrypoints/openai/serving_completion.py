"""`POST /v1/completions`: prompts (text or token ids, one or a list) in, `n` completions each
out, with OpenAI's `logprobs` and `echo`.

Several prompts are several engine requests, batched by the scheduler like any others; their
choices come back prompt-major, as OpenAI's and vLLM's::

    prompt: ["a", "b"], n: 2  ->  choices[0, 1] = "a"'s samples, choices[2, 3] = "b"'s
                                  index = prompt index * n + sample index

`echo` puts the prompt in front of each choice's text; with `logprobs: k` it asks the engine
for the prompt's log-probabilities too (`prompt_logprobs=k`), and the choice's logprobs cover
prompt + completion (the prompt's first token: null). `echo` with `max_tokens: 0` is
lm-evaluation-harness's likelihood request: only the prompt's text and scores (see
`CompletionRequest.prompt_only`). Streamed, the echo comes in each choice's first chunk.
vLLM's extra `prompt_logprobs: k` returns the engine's prompt scores in vLLM's shape as
`choices[].prompt_logprobs` (not streamed, as in vLLM); with echo and no `prompt_logprobs`,
echo's `logprobs` sets how many the engine computes, as before.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from folovllm.engine.async_llm import RequestStream
from folovllm.engine.llm_engine import PromptType
from folovllm.entrypoints.openai.logprobs import Decode, completion_logprobs
from folovllm.entrypoints.openai.protocol import (CompletionChoice, CompletionLogprobs,
                                                  CompletionRequest, CompletionResponse, PromptLogprob,
                                                  UsageInfo, usage)
from folovllm.entrypoints.openai.serving_engine import APIError, OpenAIServing
from folovllm.outputs import CompletionOutput, PromptLogprobs, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        self.check_request(request)
        prompts = _prompts(request.prompt)
        for prompt in prompts:
            if isinstance(prompt, str):
                self.check_prompt_chars(len(prompt), "prompt")
        if request.stream and request.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not available when stream is true (as vLLM); "
                                "use echo with logprobs to stream the prompt's scores",
                           param="prompt_logprobs")
        # vLLM's rule: prompt_logprobs when given, else echo's logprobs
        prompt_scores_k = request.prompt_logprobs
        if prompt_scores_k is None and request.echo:
            prompt_scores_k = request.logprobs
        params = self.sampling_params(request, 1 if request.prompt_only else request.max_tokens,
                                      logprobs=request.logprobs, prompt_logprobs=prompt_scores_k)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        model_name = self.response_model(request)  # the adapter's name when it chose one
        self.check_capacity()  # once for all the prompts: none of a list is queued for a 503
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.add_request(request, rid, prompt, params, prompt_field="prompt"))
        except BaseException:  # a later prompt is bad: the earlier ones must not run for nobody
            for stream in streams:
                stream.close()
            raise
        decode = self.decode_one

        def echo(output: RequestOutput, scores: Optional[PromptLogprobs]) -> Echo:
            text = output.prompt  # None for a token-id prompt
            if text is None:
                text = self.async_llm.engine.tokenizer.decode(output.prompt_token_ids)
            return Echo(text, output.prompt_token_ids, scores)

        def response(choices: list[CompletionChoice], usage: Optional[UsageInfo]) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage)

        if request.stream:
            # choice index -> text_offset of its next token: the token texts so far, as not
            # streamed (the text sent may lag behind: the engine holds back partial characters)
            sent_text: dict[int, int] = {}
            prompt_scores: dict[int, PromptLogprobs] = {}  # DELTA: in a prompt's first output only

            def chunk(index: Optional[int], completion: Optional[CompletionOutput],
                      output: Optional[RequestOutput], usage: Optional[UsageInfo]) -> BaseModel:
                if index is None or completion is None:
                    return response([], usage)
                if output is not None and output.prompt_logprobs is not None:
                    prompt_scores[index // params.n] = output.prompt_logprobs
                echoed = None
                if request.echo and index not in sent_text and output is not None:
                    echoed = echo(output, prompt_scores.get(index // params.n))
                choice = _choice(request, index, completion, echoed, decode, sent_text.get(index, 0))
                sent_text[index] = sent_text.get(index, 0)
                if choice.logprobs is not None and choice.logprobs.tokens:
                    sent_text[index] = choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1])
                return response([choice], usage)

            return self.stream_response(streams, chunk, params.n, request.include_usage,
                                        count_completion_tokens=not request.prompt_only)
        outputs = await self.final_outputs(streams, raw_request)
        if outputs is None:
            return Response(status_code=499)  # client closed the request (nginx's code)
        choices = [_choice(request, i * params.n + c.index, c,
                           echo(output, output.prompt_logprobs) if request.echo else None, decode,
                           prompt_logprobs=output.prompt_logprobs)
                   for i, output in enumerate(outputs) for c in output.outputs]
        generated = 0 if request.prompt_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return JSONResponse(response(choices, usage(sum(len(o.prompt_token_ids) for o in outputs),
                                                    generated)).model_dump())


class Echo(NamedTuple):
    """What goes in front of a choice with `echo`: the prompt's text, tokens and scores."""

    text: str
    token_ids: list[int]
    logprobs: Optional[PromptLogprobs]  # None unless `logprobs` was asked


def _choice(request: CompletionRequest, index: int, completion: CompletionOutput,
            echo: Optional[Echo], decode: Decode, text_offset: int = 0,
            prompt_logprobs: Optional[PromptLogprobs] = None) -> CompletionChoice:
    """One choice, or one streamed chunk of it (from `text_offset` in the choice's text);
    `echo` goes in front (streamed: in a choice's first chunk only). `prompt_logprobs`: the
    engine's, sent as vLLM's extra field when the request named `prompt_logprobs`."""
    text, token_ids = completion.text, list(completion.token_ids)
    scores: list = list(completion.logprobs or [])
    if request.prompt_only:  # the one token sampled for the engine's sake is not an answer
        text, token_ids, scores = "", [], []
    if echo is not None:
        text, token_ids = echo.text + text, echo.token_ids + token_ids
        scores = list(echo.logprobs or []) + scores
    logprobs: Optional[CompletionLogprobs] = None
    if request.logprobs is not None:
        logprobs = completion_logprobs(token_ids, scores, decode, text_offset)
    vllm_prompt_logprobs = None
    if request.prompt_logprobs is not None and prompt_logprobs is not None:
        vllm_prompt_logprobs = [None if d is None else {
            t: PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                             decoded_token=lp.decoded_token if lp.decoded_token is not None else decode(t))
            for t, lp in d.items()} for d in prompt_logprobs]
    return CompletionChoice(index=index, text=text, logprobs=logprobs,
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                            prompt_logprobs=vllm_prompt_logprobs)


def _prompts(prompt: object) -> list[PromptType]:
    """One prompt (a string or token ids) or a list of them -> the list."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]  # type: ignore[list-item]
