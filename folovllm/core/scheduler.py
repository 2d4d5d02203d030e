"""`Scheduler` (stage 02 on): each step, decide which requests compute which of their missing
tokens, under a token budget and the KV cache's memory.

There is no prefill phase (vLLM v1's shape): every request asks for
`num_tokens - num_computed_tokens` new tokens. A new prompt asks for all of it, a running request
for its one new token, a preempted one for everything again. Its two calls frame every step::

    output = scheduler.schedule()                       # which rows, how many new tokens each
    ...model runs, samples one token per row that caught up...
    scheduler.update_from_output(output, sampled)       # advance num_computed_tokens, append
                                                        # tokens, apply token-based stops

    stage 01  StaticBatchScheduler   a batch is formed, then runs until its last member ends
                                     (static_batch_scheduler.py)
    stage 02  Scheduler              iteration-level: members leave and join every step
    stage 03  Scheduler              + the paged KV cache can run out: preemption
    stage 05  Scheduler              + prompts computed in chunks, batched with decodes
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Iterable, Sequence

from folovllm.config import EngineConfig
from folovllm.core.kv_cache_manager_base import KVCacheManagerBase
from folovllm.core.request import Request, RequestStatus
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.lora.scheduling import make_lora_admission
from folovllm.structured_output.request import advance_grammar


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


class SchedulerBase(ABC):
    """What every scheduler shares: the two queues and turning sampled tokens into progress."""

    def __init__(self, config: EngineConfig, kv_cache_manager: KVCacheManagerBase,
                 eos_token_ids: Sequence[int]) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.eos_token_ids = list(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.lora_admission = make_lora_admission(config)  # stage 11: at most max_loras adapters

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt this scheduler can ever run: without chunked prefill a prompt is
        computed in one step, so it must fit in the token budget."""
        return min(self.config.max_model_len, self.config.max_num_batched_tokens)

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    @abstractmethod
    def schedule(self) -> SchedulerOutput: ...

    @abstractmethod
    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests wherever they are (abort)."""

    @abstractmethod
    def free_finished_requests(self) -> None:
        """Called at the end of every step, after stop strings were applied."""

    # --8<-- [start:update]
    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance every row by the tokens it computed; a row that caught up gets its sampled
        tokens: one, or with drafts (stage 09) its accepted drafts and the target's token, each
        checked for a stop, so a stop inside an accepted run cuts it there. Returns the
        requests that got tokens.

        A row with k drafts computed 1 + k positions, but only those of the tokens it commits
        are kept: `num_computed_tokens` advances past the last committed token's position and
        the rejected drafts' K/V is overwritten by the next step::

            fed      t7 d1 d2 d3      (num_computed_tokens 7 -> 7 + 3: t7 d1 d2)
            commits     d1 d2 x       x's K/V is computed next step, at position 10
        """
        advanced = []
        for row, request in enumerate(output.requests):
            tokens = sampled.get(request.request_id)
            if tokens is None:  # a prompt chunk (stage 05) or an idle stage-01 row
                request.num_computed_tokens += output.num_new_tokens[row]
                continue
            num_committed = 0
            for token in tokens:
                request.append_output_token(token)
                num_committed += 1
                advance_grammar(request, token)  # stage 10: may finish it (grammar terminated)
                if request.is_finished or check_stop(request, self.config.max_model_len, self.eos_token_ids):
                    break
            num_drafts = len(output.spec_token_ids(row))
            request.num_computed_tokens += output.num_new_tokens[row] - num_drafts + num_committed - 1
            advanced.append(request)
        return advanced
    # --8<-- [end:update]

    def num_live_requests(self) -> int:
        """Requests holding KV for tokens that still matter (for stats)."""
        return len(self.running)

    def live_kv_tokens(self) -> int:
        return sum(r.num_computed_tokens for r in self.running)


class Scheduler(SchedulerBase):
    """Stages 02-04: continuous (iteration-level) batching, FCFS, as in Orca and vLLM.

    Every step, running requests ask for their missing tokens first (oldest first, preempting
    the newest when the KV cache is full), then waiting requests are admitted in arrival order
    while `max_num_seqs`, the step's token budget (`max_num_batched_tokens`) and the KV cache
    allow. Finished and aborted requests leave at once, and their memory is free the next step.
    ::

        step:      1(prefill A,B)  2   3   4(prefill C)  5   6   7
        request A  [prompt A    ]  o   o                          A finished after 2 tokens
        request B  [prompt B    ]  o   o                 o   o   o
        request C                              [prompt C] o   o   C took A's slot at once

    Stages 02-04 add one rule, `prefill_first_never_mixed`: a step computes prompts *or* decodes,
    never both, and new prompts go first (step 4 above: B waits while C's prompt runs). Stage 05
    (chunked prefill) turns it off: running requests first, then prompts in what is left of the
    budget, a prompt longer than that computed over several steps (vLLM v1's order)::

        budget 8   step 1        step 2        step 3
        B (decode) o             o             o              B never waits for C's prompt
        C (prompt) [c0 .. c6]    [c7 .. c13]   [c14 c15] o    a chunk is what the budget leaves
    """

    def __init__(self, config: EngineConfig, kv_cache_manager: KVCacheManagerBase,
                 eos_token_ids: Sequence[int]) -> None:
        super().__init__(config, kv_cache_manager, eos_token_ids)
        self.prefill_first_never_mixed = not config.enable_chunked_prefill
        # Stage 05: the most tokens one prompt computes in a step (the whole prompt before).
        self.max_chunk = config.long_prefill_token_threshold or config.max_model_len

    @property
    def max_prompt_len(self) -> int:
        if self.config.enable_chunked_prefill:
            return self.config.max_model_len  # computed over as many steps as it takes
        return super().max_prompt_len

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests wherever they are (an abort, or the engine's fault guard with
        FINISHED_ERROR); their KV is freed now, and a failed request's blocks leave the prefix
        cache: its step raised, so they may never have been written."""
        ids = set(request_ids)
        keep_cached = status != RequestStatus.FINISHED_ERROR
        for request in [r for r in self.waiting if r.request_id in ids]:
            self.waiting.remove(request)
            # A waiting request holds no KV, unless schedule_waiting was interrupted (Ctrl-C)
            # between allocating its blocks and moving it to `running`: free is a no-op otherwise.
            self.kv_cache_manager.free(request, keep_cached)
            request.status = status
        for request in [r for r in self.running if r.request_id in ids]:
            self.running.remove(request)
            self.kv_cache_manager.free(request, keep_cached)
            if not request.is_finished:
                request.status = status

    def free_finished_requests(self) -> None:
        """Requests that finished in this step (EOS, stop token, stop string, length) leave
        `running`, and their KV is free for the next step."""
        for request in [r for r in self.running if r.is_finished]:
            self.running.remove(request)
            self.kv_cache_manager.free(request)

    # --8<-- [start:schedule]
    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.prefill_first_never_mixed and self.schedule_waiting(output, budget):
            return output  # a prompt step: the running requests wait for the next one
        budget, preempted = self.schedule_running(output, budget)
        if not self.prefill_first_never_mixed and not preempted:
            self.schedule_waiting(output, budget)
        return output
    # --8<-- [end:schedule]

    # --8<-- [start:schedule_running]
    def schedule_running(self, output: SchedulerOutput, budget: int) -> tuple[int, bool]:
        """Each running request asks for its missing tokens: one for a decode, the next chunk
        for a prompt being computed (stage 05). Decodes go first, so a long prompt never delays
        anyone's next token; within each kind, oldest first. Returns the budget left and
        whether anyone was preempted."""
        decodes_first = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        candidates = deque(decodes_first)  # not scheduled yet; the last is preempted first
        num_preemptions = self.num_preemptions
        while candidates and budget > 0:
            request = candidates.popleft()
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, self.max_chunk)
            drafts = self.drafts_to_verify(request, num_new, budget)  # stage 09; [] without it
            if not drafts and not self.allocate_or_preempt(request, num_new, candidates):
                break  # `request` itself had to go: everyone after it is preempted already
            output.add_row(request, num_new + len(drafts), self.kv_cache_manager.get_block_table(request),
                           drafts)
            budget -= num_new + len(drafts)
        return budget, self.num_preemptions > num_preemptions
    # --8<-- [end:schedule_running]

    # --8<-- [start:drafts_to_verify]
    def drafts_to_verify(self, request: Request, num_new: int, budget: int) -> list[int]:
        """Stage 09: the drafts a decoding request verifies this step, after its one new token:
        as many of `request.spec_token_ids` as the budget leaves, with KV slots for them taken
        here. No KV room for the lookahead: none (the plain decode preempts if it must; drafts
        never preempt anyone)."""
        if not request.spec_token_ids or num_new != 1 or request.num_tokens - request.num_computed_tokens != 1:
            return []
        drafts = request.spec_token_ids[: budget - num_new]
        if drafts and not self.kv_cache_manager.allocate_slots(request, num_new + len(drafts)):
            return []
        return drafts
    # --8<-- [end:drafts_to_verify]

    # --8<-- [start:schedule_waiting]
    def schedule_waiting(self, output: SchedulerOutput, budget: int) -> int:
        """Admit waiting requests, oldest first, while a seat, the budget and KV memory allow.
        Returns how many were admitted."""
        admitted = 0
        # Stage 10: a request whose grammar is still compiling is passed over, not waited for:
        # it keeps its place at the head and the requests behind it go on.
        passed_over: list[Request] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.status == RequestStatus.WAITING_FOR_GRAMMAR:
                if not request.structured_output_request.is_grammar_ready:
                    passed_over.append(self.waiting.popleft())
                    continue
                request.status = RequestStatus.WAITING
            computed_blocks, num_computed = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_computed
            if not self.prefill_first_never_mixed:  # stage 05: a chunk of what is missing
                num_new = min(num_new, budget, self.max_chunk)
            if num_new > budget or num_new == 0:
                break  # FCFS: nobody overtakes the head of the queue
            if not self.lora_admission.can_admit(request, self.running):
                break  # stage 11: its adapter would be one more than max_loras; it waits
            if not self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks):
                break  # no KV memory for it (a slot in stage 02, blocks in stage 03)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            self.running.append(request)
            output.add_row(request, num_new, self.kv_cache_manager.get_block_table(request))
            budget -= num_new
            admitted += 1
        self.waiting.extendleft(reversed(passed_over))
        return admitted
    # --8<-- [end:schedule_waiting]

    # --8<-- [start:preempt]
    def allocate_or_preempt(self, request: Request, num_new_tokens: int,
                            candidates: deque[Request]) -> bool:
        """Find KV room for `num_new_tokens` of `request`. While there is none, preempt the most
        recently admitted request still in `candidates` (or `request` itself when none is
        left): never crash, never drop. False if `request` was preempted."""
        while not self.kv_cache_manager.allocate_slots(request, num_new_tokens):
            victim = candidates.pop() if candidates else request
            self.preempt(victim)
            if victim is request:
                return False
        return True

    def preempt(self, request: Request) -> None:
        """Recompute-style preemption: free its KV, forget what was computed, and put it at the
        front of the queue; it is recomputed (prompt and output so far) when it is admitted."""
        self.kv_cache_manager.free(request)
        self.running.remove(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []  # it recomputes before it decodes again
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.num_preemptions += 1
    # --8<-- [end:preempt]
