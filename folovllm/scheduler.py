"""Schedulers: each step, decide which requests compute which of their missing tokens.

A scheduler owns the queues and the KV cache manager. Its two calls frame every engine step::

    output = scheduler.schedule()                       # which rows, how many new tokens each
    ...model runs, samples one token per finished-catching-up row...
    scheduler.update_from_output(output, sampled)       # advance num_computed_tokens, append
                                                        # tokens, apply token-based stops

Stage 01 is `StaticBatchScheduler`. Stage 02 adds the continuous `Scheduler`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from folovllm.config import EngineConfig
from folovllm.kv_cache import StaticKVCacheManager
from folovllm.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's work. Row i computes tokens
    `[requests[i].num_computed_tokens, + num_new_tokens[i])` of its sequence.

    Attributes:
        requests: the rows of this step, in order.
        num_new_tokens: tokens each row computes this step (a decode is 1).
        pad_to: stage 01 only: every row is padded with dummy tokens to this many, so the batch
            is a rectangle [B, pad_to]; None packs the rows back to back without padding.
        is_prefill: True if the rows compute prompts (the policy never mixes the two).
    """

    requests: list[Request]
    num_new_tokens: list[int]
    pad_to: Optional[int] = None
    is_prefill: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.requests)

    @property
    def total_num_tokens(self) -> int:
        """Tokens the model computes this step, padding included."""
        if self.pad_to is not None:
            return self.pad_to * self.num_rows
        return sum(self.num_new_tokens)


# --8<-- [start:check_stop]
def check_stop(request: Request, max_model_len: int, eos_token_ids: Sequence[int]) -> bool:
    """Finish `request` if its last token ends it: EOS, a stop token id or a length limit.
    (Stop *strings* need the text; the output processor checks those.)"""
    token = request.output_token_ids[-1]
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if token in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token
            return True
    if (params.max_tokens is not None and request.num_output_tokens >= params.max_tokens) or (
        request.num_tokens >= max_model_len
    ):
        request.status = RequestStatus.FINISHED_LENGTH
        return True
    return False
# --8<-- [end:check_stop]


class StaticBatchScheduler:
    """Stage 01: static batching.

    Up to `max_num_seqs` waiting requests form a batch; the batch is prefilled together (prompts
    padded to the longest), then decodes one token per row per step until its *last* member
    finishes. A member that finishes early keeps its row and keeps being computed (its output is
    thrown away): those are the wasted row-steps that continuous batching (stage 02) removes.
    ::

        step:      1(prefill) 2   3   4   5   6
        request A  [prompt+pad] o   o   .   .   .     . = row computed for nothing
        request B  [prompt    ] o   o   o   o   o
        request C  [prompt+pad] o   .   .   .   .
        waiting D  ......................................... starts only after step 6
    """

    def __init__(self, config: EngineConfig, kv_cache_manager: StaticKVCacheManager,
                 eos_token_ids: Sequence[int]) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.eos_token_ids = list(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []

    # -- queue --------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (e.g. abort, or a stop string) requests wherever they are. A member of the
        running batch keeps its row until the batch ends: that is how static batching works."""
        ids = set(request_ids)
        for request in list(self.waiting):
            if request.request_id in ids:
                self.waiting.remove(request)
                request.status = status
        for request in self.batch:
            if request.request_id in ids and not request.is_finished:
                request.status = status

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting) or any(not r.is_finished for r in self.batch)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.batch if not r.is_finished]

    # -- step ---------------------------------------------------------------------------------

    # --8<-- [start:static_schedule]
    def schedule(self) -> SchedulerOutput:
        if self.batch and all(r.is_finished for r in self.batch):
            self.batch = []
            self.kv_cache_manager.free_batch()
        if self.batch:  # decode every row, finished or not
            return SchedulerOutput(list(self.batch), [1] * len(self.batch))
        if not self.waiting:
            return SchedulerOutput([], [])
        while self.waiting and len(self.batch) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.batch.append(request)
        pad_to = max(r.num_tokens for r in self.batch)
        capacity = max(pad_to, max(self._max_len(r) for r in self.batch))
        self.kv_cache_manager.allocate_batch(self.batch, capacity)
        return SchedulerOutput(
            list(self.batch), [r.num_tokens for r in self.batch], pad_to=pad_to, is_prefill=True
    # --8<-- [end:static_schedule]
        )

    def _max_len(self, request: Request) -> int:
        """The most tokens this request can hold in the cache."""
        max_tokens = request.sampling_params.max_tokens or self.config.max_model_len
        return min(request.num_prompt_tokens + max_tokens, self.config.max_model_len)

    def update_from_output(self, output: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """Advance the rows that computed real tokens; returns the requests that got a token."""
        advanced = []
        for request, num_new, token in zip(output.requests, output.num_new_tokens, sampled):
            if request.is_finished:  # an idle row of the static batch: result discarded
                continue
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens:
                request.append_output_token(token)
                check_stop(request, self.config.max_model_len, self.eos_token_ids)
                advanced.append(request)
        return advanced
