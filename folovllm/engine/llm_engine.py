"""`LLMEngine`: requests in, outputs out, one step at a time.

    add_request() -> waiting queue
    step():  schedule() -> execute_model() -> update()       (read it below, top to bottom)
             -> outputs -> free finished -> publish the step's record to `stat_loggers`
    abort_request(), has_unfinished_requests()

`LLM.generate` is a loop over `step()`; a streaming server can drive the same engine.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from folovllm.config import LATEST_STAGE, EngineConfig, describe_engine
from folovllm.core.kv_cache_manager_base import KVCacheManagerBase
from folovllm.core.kv_cache_sizing import fit_max_model_len, get_kv_cache_manager_cls
from folovllm.core.request import Request, RequestStatus
from folovllm.core.scheduler import Scheduler, SchedulerBase
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.core.static_batch_scheduler import StaticBatchScheduler
from folovllm.engine.output_processor import OutputProcessor
from folovllm.engine.stats import EngineStats, ExpertLoadStats, SchedulerStats, make_rows
from folovllm.executor import WorkerDiedError, get_executor_cls
from folovllm.inputs import ProcessedPrompt, PromptType, is_token_id, parse_prompt
from folovllm.kv_cache_interface import KVCacheSpec
from folovllm.lora.engine_manager import make_lora_manager
from folovllm.lora.request import LoRARequest
from folovllm.model_executor.model_loader import load_hf_config, resolve_model_path
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import SEED_LIMIT, SamplingParams
from folovllm.structured_output import StructuredOutputManager
from folovllm.spec_decode import get_proposer
from folovllm.spec_decode.metrics import SpecDecodingStats
from folovllm.spec_decode.proposer import Drafter
from folovllm.spec_decode.rejection_sampler import RejectionSampler
from folovllm.worker.input_batch import InputBatch
from folovllm.worker.model_runner import ModelRunner
from folovllm.worker.persistent_batch import make_input_batch_sender
from folovllm.worker.sampler import LogprobsLists, Sampler, gather_logprobs, num_logprobs

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str, config: Optional[EngineConfig] = None) -> None:
        config = config or EngineConfig.for_stage(LATEST_STAGE)
        path = resolve_model_path(model)
        self.hf_config = load_hf_config(path)
        self.config = config.resolve(self.hf_config.max_position_embeddings)
        self.tokenizer = _load_tokenizer(path)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = _eos_token_ids(self.hf_config, self.tokenizer, path, self.vocab_size)

        # The model lives behind the executor: in this process, or split over one worker
        # process per tensor-parallel rank (stage 08). It returns logits; the engine samples.
        generator = torch.Generator(self.config.device).manual_seed(self.config.seed)
        self.sampler = Sampler(self.eos_token_ids, generator, self.config.logprobs_mode)
        executor_cls = get_executor_cls(self.config)
        self.model_executor = executor_cls(self.config, path, self.hf_config)
        # The stage flags pick the engine's parts here, once (the executor above and, in its
        # `Worker`, the attention backend; the KV cache manager in `_initialize_kv_cache`; the
        # scheduler below).
        try:
            spec = self.model_executor.kv_cache_spec()  # this rank's kv heads
            self.kv_cache_manager = self._initialize_kv_cache(spec, fit_len=config.max_model_len is None)
        except BaseException:  # e.g. a KV budget too small: no worker process outlives the error
            self.model_executor.shutdown()
            raise
        # stage 11: adapters known by id and each step's slots (a do-nothing one without LoRA)
        self.lora_manager = make_lora_manager(self.config, self.model_executor)
        # what each step sends the workers: a diff of their persistent tables, or the whole batch
        self.input_batch_sender = make_input_batch_sender(self.config)
        self.description = describe_engine(self.config, self.hf_config, spec.dtype)
        logger.info("engine: %s", self.description["summary"])
        scheduler_cls = Scheduler if self.config.enable_continuous_batching else StaticBatchScheduler
        self.scheduler: SchedulerBase = scheduler_cls(self.config, self.kv_cache_manager, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Stage 10: grammars, compiled off the step; idle (no thread, no mask) until a request
        # asks for structured output.
        self.structured_output_manager = StructuredOutputManager(
            self.config, self.tokenizer, self.vocab_size, self.eos_token_ids)
        # Stage 09: the proposer drafts between steps, the rejection sampler verifies them.
        # Off: a `NullProposer` that drafts nothing, so every step takes the plain sampler.
        spec_config = self.config.speculative_config
        self.drafter = Drafter(get_proposer(spec_config, self.config, self.vocab_size),
                               spec_config.num_speculative_tokens if spec_config else 0,
                               self.config.max_model_len,
                               spec_config.disable_by_batch_size if spec_config else None)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.stats = EngineStats(bytes_per_token=spec.bytes_per_token)
        # The subscribers of the step's record: each is called with the step's `SchedulerStats`
        # after every step (server metrics, the step trace, benchmarks). The engine knows none.
        self.stat_loggers: list[Callable[[SchedulerStats], None]] = []
        self.last_scheduler_stats: Optional[SchedulerStats] = None
        self._step_counter = itertools.count(1)

    # --8<-- [start:initialize_kv_cache]
    def _initialize_kv_cache(self, spec: KVCacheSpec, fit_len: bool) -> KVCacheManagerBase:
        """Size the KV cache once, at start-up (vLLM's `_initialize_kv_caches`): the byte budget,
        `max_model_len` fitted to it if the user left it unset, the stage's manager cutting it
        into blocks (or slots), and the tensors allocated and bound to the attention layers."""
        budget = self.config.kv_cache_memory or self.model_executor.determine_available_memory(spec)
        if fit_len:
            self.config = fit_max_model_len(self.config, spec, budget)
        manager_cls = get_kv_cache_manager_cls(self.config)
        kv_cache_config = manager_cls.get_kv_cache_config(self.config, spec, budget)
        self.model_executor.initialize_kv_cache(spec, kv_cache_config)  # refuses more than RAM/VRAM
        self.kv_cache_capacity_tokens = kv_cache_config.num_tokens
        return manager_cls.from_config(self.config, kv_cache_config)
    # --8<-- [end:initialize_kv_cache]

    @property
    def model_runner(self) -> ModelRunner:
        """The in-process model runner (tensor_parallel_size = 1 only)."""
        return self.model_executor.model_runner

    def shutdown(self) -> None:
        """Stop the worker processes, if any (also done when the engine is garbage collected)."""
        self.model_executor.shutdown()
        self.structured_output_manager.shutdown()

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: Optional[SamplingParams] = None,
        arrival_time: Optional[float] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> None:
        """Queue a prompt (text, token ids, `TextPrompt` or `TokensPrompt`). Raises ValueError,
        queuing nothing, on bad input (see `validate_request`). `lora_request`: the adapter to
        run it under (stage 11; read and checked here, so a bad adapter fails this call)."""
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        params = SamplingParams() if sampling_params is None else sampling_params
        prompt_text, prompt_token_ids = self.validate_request(prompt, params)
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        in_use = self.output_processor.parents.keys() | self.output_processor.parent_of.keys()
        for rid in dict.fromkeys([request_id, *child_ids]):
            if rid in in_use:
                raise ValueError(f"request id {rid!r} is already in use by an unfinished request")
        if lora_request is not None:
            self.lora_manager.add_lora(lora_request)
        arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:  # each sample is its own request; seeded ones get seed + i
                seed = None if params.seed is None else (params.seed + i) % SEED_LIMIT
                child_params = replace_params(params, n=1, seed=seed)
            children.append(
                Request(child_ids[i], prompt_token_ids, child_params, arrival_time,
                        prompt=prompt_text, device=self.config.device, lora_request=lora_request)
            )
        self.output_processor.add_request(request_id, prompt_text, prompt_token_ids, children)
        for child in children:
            self.structured_output_manager.add_request(  # stage 10: its grammar, if any
                child, wait=not self.config.enable_continuous_batching)
            self.scheduler.add_request(child)
        self.stats.num_prompt_tokens += len(prompt_token_ids) * len(children)

    # --8<-- [start:validate_request]
    def validate_request(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        """The one check of a request against this engine, before anything is queued.
        `SamplingParams` checked each field on its own; here is what depends on the model:
        token ids within its vocabulary (the tokenizer's too), lengths within `max_model_len`.
        A request that passes runs to a normal finish. Returns (prompt text or None, token ids),
        which `add_request` takes as the prompt without tokenizing it again."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, ProcessedPrompt):  # tokenized by an earlier call: check it again
            text, ids = prompt
        else:
            text, ids = parse_prompt(prompt)
            if text is not None:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
        bad = [t for t in ids if not is_token_id(t, self.vocab_size)]
        if bad:
            raise ValueError(
                f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]}"
                + ("" if text is None else " from the tokenizer, which does not match the model")
            )
        ids = [int(t) for t in ids]
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
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids must be token ids of this model, in [0, {self.vocab_size}), got {bad[:5]}"
            )
        if params.top_k > self.vocab_size:
            raise ValueError(
                f"top_k must be at most the vocabulary size ({self.vocab_size}), or 0 / -1 to "
                f"keep every token, got {params.top_k}"
            )
        params.verify_with_model(self.vocab_size, self.config.max_logprobs)  # logprobs, biases
        params.update_from_tokenizer(self.tokenizer, self.vocab_size)  # bad_words -> token ids
        self.structured_output_manager.validate_request(params)  # stage 10: the spec compiles
        return ProcessedPrompt(text, ids)
    # --8<-- [end:validate_request]

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request now and free what it holds; returns its final output
        (finish_reason "abort")."""
        if request_id not in self.output_processor.parents:
            raise ValueError(f"cannot abort {request_id!r}: no unfinished request has this id")
        children = self.output_processor.parents[request_id].children
        self.scheduler.finish_requests(
            [c.request_id for c in children if not c.is_finished], RequestStatus.FINISHED_ABORTED
        )
        self.scheduler.free_finished_requests()  # a static batch whose last member this was
        self.drafter.free({c.request_id for c in children})  # stage 09: the proposer's state
        return self.output_processor.abort(request_id)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Abort those of `request_ids` that have not finished, when whoever queued them gives
        up (`LLM.generate` on an exception or Ctrl-C). Afterwards none of them holds KV, even
        if a step was interrupted before it freed the requests that finished in it."""
        for request_id in request_ids:
            if request_id in self.output_processor.parents:
                self.abort_request(request_id)
        self.scheduler.free_finished_requests()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)

    # -- the step -----------------------------------------------------------------------------

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model once, turn the new tokens into outputs."""
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.num_rows == 0:
            self.structured_output_manager.wait_for_grammars(timeout=0.05)  # stage 10: not spin
            return []
        self._mark_scheduled(scheduler_output)
        sampled, failed = self._execute_model(scheduler_output)
        advanced = self.scheduler.update_from_output(scheduler_output, sampled)
        outputs = self.output_processor.process(advanced, failed)
        self.scheduler.free_finished_requests()
        self.drafter.propose(self.scheduler.running)  # stage 09: drafts for the next step
        self.structured_output_manager.validate_drafts(self.scheduler.running)  # cut by grammar
        self._publish_stats(scheduler_output, advanced, start, sampled)
        return outputs
    # --8<-- [end:step]

    # --8<-- [start:execute_model_guard]
    def _execute_model(self, output: SchedulerOutput) -> tuple[dict[str, list[int]], list[Request]]:
        """Run the model on one step and sample -> (sampled tokens by request id: one, or with
        drafts the ones the rejection sampler keeps; requests that failed).

        Defence in depth: `validate_request` lets no request through that can make a step
        raise. If one still does, the rows are run again one at a time; a row that raises on
        its own finishes with finish_reason "error" (`finish_requests` frees its KV at once and
        takes its blocks out of the prefix cache), the other rows keep the token they sampled, and the
        engine goes on serving. (KeyboardInterrupt is not caught: nothing has advanced yet, so
        the caller can abort cleanly.) A `WorkerDiedError` is not one request's fault: a
        tensor-parallel worker died or failed, and no step can run any more (stage 08)."""
        try:
            return self._execute_and_sample(output), []
        except WorkerDiedError:
            raise
        except Exception:
            logger.warning("a step of %d rows failed; running them one at a time", output.num_rows,
                           exc_info=True)
        sampled: dict[str, list[int]] = {}
        failed: list[Request] = []
        for row, request in enumerate(output.requests):
            try:
                sampled.update(self._execute_and_sample(output.row(row)))
            except WorkerDiedError:
                raise
            except Exception as error:
                logger.error("request %r failed; it finishes with finish_reason 'error'",
                             request.request_id, exc_info=True)
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_ERROR)
                request.error = f"{type(error).__name__}: {error}"
                failed.append(request)
        return sampled, failed
    # --8<-- [end:execute_model_guard]

    # --8<-- [start:execute_and_sample]
    def _execute_and_sample(self, output: SchedulerOutput) -> dict[str, list[int]]:
        """The executor runs the model wherever it lives and returns the logits of the rows
        that sample (then of the prompt positions whose log-probabilities are asked for); the
        engine samples them with its one sampler, where the requests and their seeded
        generators are, and hands the log-probabilities asked for to the output processor.
        A row with drafts (stage 09) has logits at 1 + k positions, which the rejection
        sampler verifies. -> {request id: tokens} of the rows that caught up."""
        batch = self.make_input_batch(output)
        self.lora_manager.assign_slots(batch, output.requests)  # stage 11: each row's slot
        # persistent_input_batch: only what the workers' tables lack (else the batch itself)
        message = self.input_batch_sender.make_message(batch, output.requests)
        try:
            logits = self.model_executor.execute_model(message)  # [S + P, vocab] or None
        except BaseException:
            self.input_batch_sender.invalidate()  # a worker may hold half of it: resend all next time
            raise
        if logits is None:
            return {}
        requests = [output.requests[row] for row in batch.sampling_rows]  # output.sampling_rows
        num_sampled = len(requests) + sum(batch.num_draft_tokens.values())
        logits, prompt_logits = logits[:num_sampled], logits[num_sampled:]  # [S, V], [P, V]
        drafts = None
        if output.scheduled_spec_decode_tokens:  # stage 09
            drafts = [output.scheduled_spec_decode_tokens.get(r.request_id, []) for r in requests]
        # stage 10: -inf outside each grammar's mask, one mask row per position a row verifies
        self.structured_output_manager.apply_grammar_bitmask(logits, requests, drafts)
        if drafts is not None:
            tokens = self.rejection_sampler(logits, requests, drafts)
        else:
            tokens = [[t] for t in self.sampler(logits, requests)] if requests else []
        sampled = None  # log-probabilities are computed only when someone asks
        if any(r.sampling_params.logprobs is not None for r in requests):  # one per committed token
            sampled = (self.rejection_sampler.compute_logprobs(logits, requests, drafts, tokens) if drafts
                       else self.sampler.compute_logprobs(logits, requests, [t[0] for t in tokens]))
        prompts = self.score_prompts(output, batch.prompt_logits, prompt_logits)
        self.output_processor.add_logprobs(requests, sampled, prompts, [len(t) for t in tokens])
        return {r.request_id: t for r, t in zip(requests, tokens)}
    # --8<-- [end:execute_and_sample]

    # --8<-- [start:make_input_batch]
    @staticmethod
    def make_input_batch(output: SchedulerOutput) -> InputBatch:
        """What the workers need of a step, in plain lists: the tokens each row feeds the model
        (a decode row: one), where they start, the block tables, the rows that sample, and the
        prompt positions whose logits are asked for."""
        starts = output.num_computed_tokens
        query_lens = list(output.num_new_tokens if output.query_lens is None else output.query_lens)
        drafts = [output.spec_token_ids(i) for i in range(output.num_rows)]  # stage 09
        return InputBatch(
            req_ids=[r.request_id for r in output.requests],
            token_ids=[r.all_token_ids[start : start + n] + d
                       for r, start, n, d in zip(output.requests, starts, query_lens, drafts)],
            num_computed_tokens=list(starts),
            query_lens=query_lens,
            block_tables=output.block_tables,
            sampling_rows=output.sampling_rows,
            prompt_logits=LLMEngine.prompt_logits_rows(output),
            num_draft_tokens={row: len(d) for row, d in enumerate(drafts) if d},
        )
    # --8<-- [end:make_input_batch]

    # --8<-- [start:prompt_logits_rows]
    @staticmethod
    def prompt_logits_rows(output: SchedulerOutput) -> dict[int, int]:
        """Row -> how many of its first tokens need their logits, for the requests that ask
        for prompt log-probabilities. Position j scores prompt token j + 1, so a row computing
        positions [start, start + n) of a P-token prompt scores min(n, P - 1 - start) of them;
        position P - 1 is the sampling row's. Only real tokens count (num_new_tokens, not stage
        01's padded query_lens), and a request that has generated a token has all its prompt
        log-probabilities already (a preempted one recomputing its prompt asks for none)::

            prompt p0 p1 p2 p3 p4, chunks of 3:  row [p0 p1 p2] -> 3 (score p1 p2 p3)
                                                 row [p3 p4]    -> 1 (scores p4; p4 samples)
        """
        rows = {}
        for row, request in enumerate(output.requests):
            if request.sampling_params.prompt_logprobs is None or request.num_output_tokens:
                continue
            count = min(output.num_new_tokens[row],
                        request.num_prompt_tokens - 1 - output.num_computed_tokens[row])
            if count > 0:
                rows[row] = count
        return rows
    # --8<-- [end:prompt_logits_rows]

    @staticmethod
    def score_prompts(output: SchedulerOutput, prompt_logits_rows: dict[int, int],
                      logits: torch.Tensor) -> list[tuple[str, int, LogprobsLists]]:
        """logits [P, vocab] of the prompt positions of `prompt_logits_rows`, in row order ->
        (request id, first position, its positions) per row: float32 log_softmax, each
        position's next prompt token and the top k, gathered for all rows at once."""
        if not prompt_logits_rows:
            return []
        rows = sorted(prompt_logits_rows)
        targets: list[int] = []  # the prompt token each position scores
        for row in rows:
            start = output.num_computed_tokens[row]
            targets += output.requests[row].prompt_token_ids[start + 1 : start + 1 + prompt_logits_rows[row]]
        k = max(num_logprobs(output.requests[row].sampling_params.prompt_logprobs, logits.shape[-1])
                for row in rows)
        lists = gather_logprobs(logits.float().log_softmax(dim=-1),
                                torch.tensor(targets, device=logits.device), k)
        scored, offset = [], 0
        for row in rows:
            count = prompt_logits_rows[row]
            scored.append((output.requests[row].request_id, output.num_computed_tokens[row],
                           lists[offset : offset + count]))
            offset += count
        return scored

    def _mark_scheduled(self, output: SchedulerOutput) -> None:
        now = time.perf_counter()
        for request in output.requests:
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now

    def _publish_stats(self, output: SchedulerOutput, advanced: list[Request], start: float,
                       sampled: dict[str, list[int]]) -> None:
        """Build the step's one record, count it into `self.stats`, and hand it to every
        subscriber in `stat_loggers`."""
        scheduler, kv = self.scheduler, self.kv_cache_manager
        # preempt() puts its victim at the head of the queue, and nothing is admitted after a
        # preemption in the same step: this step's victims are the first ones waiting.
        last = self.last_scheduler_stats
        num_preempted = scheduler.num_preemptions - (last.num_preemptions if last else 0)
        scheduled = set(output.requests)
        step = SchedulerStats(
            step=next(self._step_counter),
            start_time=start,
            end_time=time.perf_counter(),
            rows=make_rows(output),
            waiting=[r.request_id for r in scheduler.waiting],
            stalled=[r.request_id for r in scheduler.running if r not in scheduled],
            preempted=[r.request_id for r in itertools.islice(scheduler.waiting, num_preempted)],
            num_running_reqs=scheduler.num_live_requests(),
            num_scheduled_tokens=output.total_num_scheduled_tokens,
            num_prefill_tokens=output.num_prefill_tokens,
            num_decode_tokens=output.num_decode_tokens,
            num_generated_tokens=num_generated_tokens(output, advanced),
            kv_blocks_used=kv.num_used_blocks,
            kv_tokens_reserved=kv.num_reserved_tokens,
            # a slot shared by several requests (stage 06) holds one live token, not several
            kv_tokens_used=scheduler.live_kv_tokens() - kv.num_shared_tokens,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache=kv.make_prefix_cache_stats(),
            spec_decoding_stats=self.spec_decoding_stats(output, sampled),
            expert_load=ExpertLoadStats.from_counts(self.model_executor.take_expert_load()),  # MoE
        )
        self.stats.add(step)
        self.last_scheduler_stats = step
        for stat_logger in self.stat_loggers:
            stat_logger(step)


    def spec_decoding_stats(self, output: SchedulerOutput,
                            sampled: dict[str, list[int]]) -> Optional[SpecDecodingStats]:
        """Stage 09: drafts verified and accepted in the step (None without speculation)."""
        if self.config.speculative_config is None:
            return None
        stats = SpecDecodingStats.new(self.config.speculative_config.num_speculative_tokens)
        for request_id, drafts in output.scheduled_spec_decode_tokens.items():
            if request_id in sampled:  # a row that failed verified nothing
                stats.observe_draft(len(drafts), len(sampled[request_id]) - 1)
        return stats


def num_generated_tokens(output: SchedulerOutput, advanced: list[Request]) -> int:
    """Tokens the step's rows added to their requests, after stops cut them: one per row that
    caught up, or with drafts (stage 09) up to 1 + k. A row's request had `num_computed_tokens
    + num_new_tokens - drafts` tokens before the step."""
    rows = {r.request_id: i for i, r in enumerate(output.requests)}
    return sum(
        r.num_tokens - (output.num_computed_tokens[i] + output.num_new_tokens[i] - len(output.spec_token_ids(i)))
        for r in advanced for i in [rows[r.request_id]]
    )


def replace_params(params: SamplingParams, **changes: object) -> SamplingParams:
    """A copy of `params` with some fields changed (validated again)."""
    import dataclasses

    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    fields.update(changes)
    return SamplingParams(**fields)


def _load_tokenizer(path: Path) -> object:
    """The checkpoint's tokenizer. A folder without tokenizer files is refused: transformers
    would give an empty tokenizer (no vocabulary, EOS id 0) on which every text prompt fails."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path} ({type(e).__name__}: {e})") from e
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ValueError(
            f"no tokenizer in {path}: expected tokenizer.json (or vocab.json + merges.txt, or "
            "tokenizer.model) next to config.json; copy the tokenizer files of the model there"
        )
    return tokenizer


def _eos_token_ids(hf_config: object, tokenizer: object, path: Path, vocab_size: int) -> list[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json (Qwen3 lists both
    <|im_end|> and <|endoftext|> there); an id outside the model's vocabulary can never be
    sampled, and is left out."""
    generation_eos = None
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        try:
            raw = json.loads(generation_config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{generation_config} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{generation_config} must hold a JSON object, got a {type(raw).__name__}")
        generation_eos = raw.get("eos_token_id")
    ids: list[int] = []
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(hf_config, "eos_token_id", None),
        generation_eos,
    ):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and 0 <= token < vocab_size and token not in ids:
                ids.append(token)
    return ids
