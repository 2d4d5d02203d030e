"""`LLM`: the offline API, as in vLLM: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

from folovllm.config import LATEST_STAGE, EngineConfig
from folovllm.engine.llm_engine import LLMEngine, replace_params
from folovllm.entrypoints.chat_utils import apply_chat_template
from folovllm.inputs import PromptType
from folovllm.lora.request import LoRARequest
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import RequestOutputKind, SamplingParams
from folovllm.engine.stats import EngineStats
from folovllm.trace.recorder import StepTracer


class LLM:
    """Load a model once and generate for batches of prompts.

    Args:
        model: a local Hugging Face checkpoint folder or a hub id such as "Qwen/Qwen3-0.6B".
        stage: which optimisation stages are on, cumulatively: 1..6, default 6, every stage
            (the CLI's default too). GPTQ (07) comes with a GPTQ checkpoint and tensor
            parallelism (08) with `tensor_parallel_size`, at any stage; see `EngineConfig`.
        dtype, device, max_num_seqs, max_model_len, seed, **engine_args: `EngineConfig` fields.
            `trace=True` records every engine step in `llm.tracer` (docs/trace.md).
    """

    def __init__(
        self,
        model: str,
        stage: int = LATEST_STAGE,
        dtype: str = "auto",
        device: str = "cpu",
        max_num_seqs: int = 16,
        max_model_len: Optional[int] = None,
        seed: int = 0,
        **engine_args: Any,
    ) -> None:
        config = EngineConfig.for_stage(
            stage, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len, seed=seed, **engine_args,
        )
        self.llm_engine = LLMEngine(model, config)
        self.tracer = StepTracer.attach(self.llm_engine) if config.trace else None
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    @property
    def stats(self) -> EngineStats:
        return self.llm_engine.stats

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        `prompts`: one prompt or a list of them; a prompt is a string, a list of token ids,
        `{"prompt": str}` or `{"prompt_token_ids": list[int]}` (vLLM's `TextPrompt` /
        `TokensPrompt`). `sampling_params`: one for all prompts, or a list with one per prompt.
        `lora_request` (stage 11, `enable_lora=True`): the adapter for all prompts, or a list
        with one per prompt (None: the base model).

        Every prompt is validated before any is queued (a `ValueError` queues nothing). If the
        run stops early (an exception, Ctrl-C, or a request that fails in the engine: a
        `RuntimeError` that names it), the requests of this call are aborted and their KV
        freed before the exception reaches you: the engine is left empty, ready for the next
        call.
        """
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompts)} prompts; "
                    "pass one SamplingParams or exactly one per prompt"
                )
        else:
            raise ValueError(
                "sampling_params must be a SamplingParams or a list of them, got "
                f"{type(sampling_params).__name__}"
            )
        loras = _per_prompt_loras(lora_request, len(prompts))
        engine = self.llm_engine
        # validate (and tokenize) all before queuing any; add_request takes them as they are
        processed = [engine.validate_request(prompt, params) for prompt, params in zip(prompts, params_list)]
        for lora in dict.fromkeys(lr for lr in loras if lr is not None):
            engine.lora_manager.add_lora(lora)  # read and checked before any prompt is queued
        ids: list[str] = []
        try:
            for prompt, params, lora in zip(processed, params_list, loras):
                request_id = str(self._counter)
                self._counter += 1
                # generate() returns finished outputs only: skip building the ones in between.
                params = replace_params(params, output_kind=RequestOutputKind.FINAL_ONLY)
                engine.add_request(request_id, prompt, params, lora_request=lora)
                ids.append(request_id)
            return self._run_engine(ids, use_tqdm)
        except BaseException:  # Ctrl-C included: leave nothing queued or holding KV
            engine.abort_requests(ids)
            raise

    def chat(
        self,
        messages: Union[list[dict[str, str]], list[list[dict[str, str]]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them), then
        generate. Each message is {"role": str, "content": str}."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.get_tokenizer()
        prompts = [apply_chat_template(tokenizer, conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(request_ids) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        _raise_if_failed(output)
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in request_ids]


def _raise_if_failed(output: RequestOutput) -> None:
    """`generate` raises, as vLLM's does when its engine fails, rather than returning an output
    whose finish_reason is "error" among the good ones."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            raise RuntimeError(f"request {output.request_id} failed in the engine: {completion.error}")


def _per_prompt_loras(lora_request: Any, num_prompts: int) -> list[Optional[LoRARequest]]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    if isinstance(lora_request, (list, tuple)):
        if len(lora_request) != num_prompts:
            raise ValueError(f"got {len(lora_request)} lora_request for {num_prompts} prompts; pass "
                             "one LoRARequest (or None) or exactly one per prompt")
        bad = [type(lr).__name__ for lr in lora_request if lr is not None and not isinstance(lr, LoRARequest)]
        if not bad:
            return list(lora_request)
    raise ValueError("lora_request must be a LoRARequest, None, or a list of them (one per prompt), "
                     f"got {type(lora_request).__name__}")


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts must not be an empty list")
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(
        "prompts must be a prompt (a string, a list of token ids, {'prompt': ...} or "
        f"{{'prompt_token_ids': ...}}) or a list of prompts; got {type(prompts).__name__}"
    )
