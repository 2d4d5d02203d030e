"""Schedulers: each step, decide which requests compute which of their missing tokens.

A scheduler owns the queues and the KV cache manager. Its two calls frame every engine step::

    output = scheduler.schedule()                       # which rows, how many new tokens each
    ...model runs, samples one token per row that caught up...
    scheduler.update_from_output(output, sampled)       # advance num_computed_tokens, append
                                                        # tokens, apply token-based stops

    stage 01  StaticBatchScheduler   a batch is formed, then runs until its last member ends
    stage 02  Scheduler              iteration-level: members leave and join every step
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from folovllm.config import EngineConfig
from folovllm.worker.kv_cache import SlotKVCacheManager, StaticKVCacheManager
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.request import Request, RequestStatus


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


class Scheduler:
    """Stage 02: continuous (iteration-level) batching, FCFS, as in Orca and vLLM's first version.

    Every step: finished and aborted requests leave `running` (their slot is free at once), then
    waiting requests are admitted in arrival order while a slot is free and the step's token
    budget (`max_num_batched_tokens`) holds their prompts. A step either prefills the newly
    admitted requests or, if none was admitted, decodes every running request: prefill first,
    never both in one step (mixing them is stage 05's chunked prefill).
    ::

        step:      1(prefill A,B)  2   3   4(prefill C)  5   6   7
        request A  [prompt A    ]  o   o                          A finished after 2 tokens
        request B  [prompt B    ]  o   o                 o   o   o
        request C                              [prompt C] o   o   C took A's slot at once
    """

    def __init__(self, config: EngineConfig, kv_cache_manager: SlotKVCacheManager | KVCacheManager,
                 eos_token_ids: Sequence[int]) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.eos_token_ids = list(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue --------------------------------------------------------------------------------

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt this scheduler can ever run: without chunked prefill a prompt is
        computed in one step, so it must fit in the token budget."""
        return min(self.config.max_model_len, self.config.max_num_batched_tokens)

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests wherever they are (abort); their resources are freed now."""
        ids = set(request_ids)
        for request in [r for r in self.waiting if r.request_id in ids]:
            self.waiting.remove(request)
            request.status = status
        for request in [r for r in self.running if r.request_id in ids]:
            self.running.remove(request)
            self.kv_cache_manager.free(request)
            if not request.is_finished:
                request.status = status

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting) or any(not r.is_finished for r in self.running)

    # -- step ---------------------------------------------------------------------------------

    # --8<-- [start:schedule]
    def schedule(self) -> SchedulerOutput:
        # Admit waiting requests, oldest first, while a slot and the token budget allow.
        admitted, num_new_tokens = [], []
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = request.num_tokens - request.num_computed_tokens
            if num_new > budget:
                break  # FCFS: nobody overtakes the head of the queue
            if not self.kv_cache_manager.allocate_slots(request, num_new):
                break  # no KV memory for its prompt (a slot in stage 02, blocks in stage 03)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            num_new_tokens.append(num_new)
            budget -= num_new
        if admitted:
            return SchedulerOutput(admitted, num_new_tokens, is_prefill=True)

        # Otherwise every running request decodes one token, if it has room for it.
        return SchedulerOutput(self.make_room_to_decode(), [1] * len(self.running))
    # --8<-- [end:schedule]

    # --8<-- [start:preempt]
    def make_room_to_decode(self) -> list[Request]:
        """Give every running request room for one more token, oldest first. When the cache is
        full, the most recently admitted request is preempted: its KV is dropped and it goes
        back to the front of the queue, to be recomputed later (never crash, never drop)."""
        queue = deque(self.running)
        scheduled: list[Request] = []
        while queue:
            request = queue.popleft()
            while not self.kv_cache_manager.allocate_slots(request, 1):
                victim = queue.pop() if queue else request
                self.preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(request)
        self.running = scheduled
        return list(scheduled)

    def preempt(self, request: Request) -> None:
        """Recompute-style preemption: free the blocks, forget what was computed."""
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.num_preemptions += 1
    # --8<-- [end:preempt]

    # --8<-- [start:update]
    def update_from_output(self, output: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """Advance the rows that computed real tokens; returns the requests that got a token."""
        advanced = []
        for request, num_new, token in zip(output.requests, output.num_new_tokens, sampled):
            if request.is_finished:  # an idle row of a static batch: result discarded
                continue
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens:
                request.append_output_token(token)
                check_stop(request, self.config.max_model_len, self.eos_token_ids)
                advanced.append(request)
        return advanced

    def free_finished_requests(self) -> None:
        """Called at the end of every step: requests that finished in it (EOS, stop token,
        stop string, length) leave `running` and their KV slot is free for the next step."""
        for request in [r for r in self.running if r.is_finished]:
            self.running.remove(request)
            self.kv_cache_manager.free(request)
    # --8<-- [end:update]

    def num_live_requests(self) -> int:
        """Requests holding KV for tokens that still matter (for stats)."""
        return sum(1 for r in self.running if not r.is_finished)

    def live_kv_tokens(self) -> int:
        return sum(r.num_computed_tokens for r in self.running if not r.is_finished)


class StaticBatchScheduler(Scheduler):
    """Stage 01: static batching.

    Up to `max_num_seqs` waiting requests form a batch; the batch is prefilled together (prompts
    padded to the longest), then decodes one token per row per step until its *last* member
    finishes. A member that finishes early keeps its row and keeps being computed (its output is
    thrown away): those are the wasted row-steps that continuous batching (stage 02) removes.
    `running` is the batch, finished members included.
    ::

        step:      1(prefill) 2   3   4   5   6
        request A  [prompt+pad] o   o   .   .   .     . = row computed for nothing
        request B  [prompt    ] o   o   o   o   o
        request C  [prompt+pad] o   .   .   .   .
        waiting D  ......................................... starts only after step 6
    """

    kv_cache_manager: StaticKVCacheManager

    @property
    def max_prompt_len(self) -> int:
        return self.config.max_model_len  # the padded batch ignores the token budget

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """A waiting request leaves the queue; a batch member keeps its row until the batch
        ends: that is how static batching works."""
        ids = set(request_ids)
        for request in [r for r in self.waiting if r.request_id in ids]:
            self.waiting.remove(request)
            request.status = status
        for request in self.running:
            if request.request_id in ids and not request.is_finished:
                request.status = status

    def free_finished_requests(self) -> None:
        """Nothing leaves a static batch early; the batch is freed when its last member ends."""
        if self.running and all(r.is_finished for r in self.running):
            self.running = []
            self.kv_cache_manager.free_batch()

    # --8<-- [start:static_schedule]
    def schedule(self) -> SchedulerOutput:
        if self.running:  # decode every row, finished or not
            return SchedulerOutput(list(self.running), [1] * len(self.running))
        if not self.waiting:
            return SchedulerOutput([], [])
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        pad_to = max(r.num_tokens for r in self.running)
        capacity = max(pad_to, max(self._max_len(r) for r in self.running))
        self.kv_cache_manager.allocate_batch(self.running, capacity)
        return SchedulerOutput(
            list(self.running), [r.num_tokens for r in self.running], pad_to=pad_to, is_prefill=True
        )
    # --8<-- [end:static_schedule]

    def _max_len(self, request: Request) -> int:
        """The most tokens this request can hold in the cache."""
        max_tokens = request.sampling_params.max_tokens or self.config.max_model_len
        return min(request.num_prompt_tokens + max_tokens, self.config.max_model_len)
