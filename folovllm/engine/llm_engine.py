"""`LLMEngine`: requests in, outputs out, one step at a time.

    add_request() -> waiting queue
    step():  schedule() -> execute_model() -> update()       (read it below, top to bottom)
    abort_request(), has_unfinished_requests()

`LLM.generate` is a loop over `step()`; a streaming server can drive the same engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from folovllm.config import EngineConfig
from folovllm.core.kv_cache_interface import KVCacheManagerBase, KVCacheSpec
from folovllm.core.kv_cache_utils import fit_max_model_len, get_kv_cache_manager_cls
from folovllm.core.request import Request, RequestStatus
from folovllm.core.scheduler import Scheduler, SchedulerBase
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.core.static_batch_scheduler import StaticBatchScheduler
from folovllm.engine.output_processor import OutputProcessor
from folovllm.engine.stats import EngineStats, SchedulerStats
from folovllm.model_executor.attention_backends import get_attn_backend
from folovllm.model_executor.model_loader import load_model
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import SamplingParams
from folovllm.worker.model_runner import ModelRunner
from folovllm.worker.sampler import Sampler

PromptType = Union[str, list[int]]


class LLMEngine:
    def __init__(self, model: str, config: Optional[EngineConfig] = None) -> None:
        config = config or EngineConfig.for_stage(1)
        self.model, self.hf_config, path = load_model(model, config.torch_dtype, config.device)
        self.config = config.resolve(self.hf_config.max_position_embeddings)
        self.tokenizer = _load_tokenizer(path)
        self.eos_token_ids = _eos_token_ids(self.hf_config, self.tokenizer, path)
        self.vocab_size = self.hf_config.vocab_size

        dtype = next(self.model.parameters()).dtype
        attn = self.model.model.layers[0].self_attn
        spec = KVCacheSpec(
            num_layers=self.hf_config.num_hidden_layers,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            dtype=dtype,
            device=self.config.device,
        )
        generator = torch.Generator(self.config.device).manual_seed(self.config.seed)
        self.model_runner = ModelRunner(
            self.model, Sampler(self.eos_token_ids, generator), self.config.device,
            get_attn_backend(self.config.attention_backend),
        )

        # The stage flags pick the engine's parts here, once (the attention backend above, the
        # KV cache manager in `_initialize_kv_cache`, the scheduler below).
        self.kv_cache_manager = self._initialize_kv_cache(spec, fit_len=config.max_model_len is None)
        scheduler_cls = Scheduler if self.config.enable_continuous_batching else StaticBatchScheduler
        self.scheduler: SchedulerBase = scheduler_cls(self.config, self.kv_cache_manager, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats(bytes_per_token=spec.bytes_per_token)
        # Called with a `SchedulerStats` after every step (benchmark traces, server metrics).
        self.stat_loggers: list[Callable[[SchedulerStats], None]] = []
        self.last_scheduler_stats: Optional[SchedulerStats] = None
        self._request_ids: set[str] = set()  # parents not finished yet

    # --8<-- [start:initialize_kv_cache]
    def _initialize_kv_cache(self, spec: KVCacheSpec, fit_len: bool) -> KVCacheManagerBase:
        """Size the KV cache once, at start-up (vLLM's `_initialize_kv_caches`): the byte budget,
        `max_model_len` fitted to it if the user left it unset, the stage's manager cutting it
        into blocks (or slots), and the tensors allocated and bound to the attention layers."""
        budget = self.config.kv_cache_memory or self.model_runner.determine_available_memory(self.config, spec)
        if fit_len:
            self.config = fit_max_model_len(self.config, spec, budget)
        manager_cls = get_kv_cache_manager_cls(self.config)
        kv_cache_config = manager_cls.get_kv_cache_config(self.config, spec, budget)
        self.model_runner.initialize_kv_cache(spec, kv_cache_config)  # refuses more than RAM/VRAM
        self.kv_cache_capacity_tokens = kv_cache_config.num_tokens
        return manager_cls.from_config(self.config, kv_cache_config)
    # --8<-- [end:initialize_kv_cache]

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
    ) -> None:
        """Queue a prompt (text or token ids). Raises ValueError, queuing nothing, on bad input."""
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        in_use = self._request_ids | self.output_processor.parent_of.keys()
        for rid in dict.fromkeys([request_id, *child_ids]):
            if rid in in_use:
                raise ValueError(f"request id {rid!r} is already in use by an unfinished request")
        prompt_text, prompt_token_ids = self.process_prompt(prompt)
        arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:  # each sample is its own request; seeded ones get seed + i
                seed = None if params.seed is None else params.seed + i
                child_params = replace_params(params, n=1, seed=seed)
            children.append(
                Request(child_ids[i], prompt_token_ids, child_params, arrival_time,
                        prompt=prompt_text, device=self.config.device)
            )
        self._request_ids.add(request_id)
        self.output_processor.add_request(request_id, prompt_text, prompt_token_ids, children)
        for child in children:
            self.scheduler.add_request(child)
        self.stats.num_prompt_tokens += len(prompt_token_ids) * len(children)

    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """Validate a prompt and return (text or None, token ids)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]}"
                )
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        if len(ids) > self.config.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_model_len={self.config.max_model_len}"
            )
        if len(ids) > self.scheduler.max_prompt_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}, the most one step computes; raise "
                "max_num_batched_tokens, or turn on enable_chunked_prefill (stage 5), which "
                "computes a prompt over several steps"
            )
        return text, ids

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request now and free what it holds; returns its final output
        (finish_reason "abort")."""
        if request_id not in self._request_ids:
            raise ValueError(f"cannot abort {request_id!r}: no unfinished request has this id")
        children = self.output_processor.parents[request_id].children
        self.scheduler.finish_requests(
            [c.request_id for c in children if not c.is_finished], RequestStatus.FINISHED_ABORTED
        )
        self._request_ids.discard(request_id)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._request_ids)

    # -- the step -----------------------------------------------------------------------------

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model once, turn the new tokens into outputs."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.num_rows == 0:
            return []
        self._mark_scheduled(scheduler_output)
        sampled = self.model_runner.execute_model(scheduler_output)
        advanced = self.scheduler.update_from_output(scheduler_output, sampled)
        outputs = self.output_processor.process(advanced)
        self.scheduler.free_finished_requests()
        self._record_stats(scheduler_output, advanced)
        for out in outputs:
            if out.finished:
                self._request_ids.discard(out.request_id)
        return outputs
    # --8<-- [end:step]

    def _mark_scheduled(self, output: SchedulerOutput) -> None:
        now = time.perf_counter()
        for request in output.requests:
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now

    def _record_stats(self, output: SchedulerOutput, advanced: list[Request]) -> None:
        step = SchedulerStats(
            num_running_reqs=self.scheduler.num_live_requests(),
            num_waiting_reqs=len(self.scheduler.waiting),
            num_rows=output.num_rows,
            num_scheduled_tokens=output.total_num_scheduled_tokens,
            num_prefill_tokens=output.num_prefill_tokens,
            num_decode_tokens=output.num_decode_tokens,
            kv_tokens_reserved=self.kv_cache_manager.num_reserved_tokens,
            # a slot shared by several requests (stage 06) holds one live token, not several
            kv_tokens_used=self.scheduler.live_kv_tokens() - self.kv_cache_manager.num_shared_tokens,
            num_preemptions=self.scheduler.num_preemptions,
        )
        s = self.stats
        s.num_forward_passes += 1
        s.num_generated_tokens += len(advanced)
        s.num_prompt_tokens_computed += step.num_prefill_tokens
        s.num_decode_row_steps += step.num_decode_tokens
        s.num_wasted_row_steps += output.num_idle_rows
        s.num_preemptions = step.num_preemptions
        s.max_num_running = max(s.max_num_running, step.num_running_reqs)
        s.kv_tokens_reserved += step.kv_tokens_reserved
        s.kv_tokens_used += step.kv_tokens_used
        s.peak_kv_tokens_reserved = max(s.peak_kv_tokens_reserved, step.kv_tokens_reserved)
        s.prefix_cache += self.kv_cache_manager.make_prefix_cache_stats()
        self.last_scheduler_stats = step
        for logger in self.stat_loggers:
            logger(step)


def replace_params(params: SamplingParams, **changes: object) -> SamplingParams:
    """A copy of `params` with some fields changed (validated again)."""
    import dataclasses

    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    fields.update(changes)
    return SamplingParams(**fields)


def _load_tokenizer(path: object) -> object:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path} ({type(e).__name__}: {e})") from e


def _eos_token_ids(hf_config: object, tokenizer: object, path: Path) -> list[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json (Qwen3 lists both
    <|im_end|> and <|endoftext|> there)."""
    generation_eos = None
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        try:
            generation_eos = json.loads(generation_config.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ValueError(f"{generation_config} is not valid JSON: {e}") from e
    ids: list[int] = []
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(hf_config, "eos_token_id", None),
        generation_eos,
    ):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids
