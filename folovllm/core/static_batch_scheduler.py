"""`StaticBatchScheduler` (stage 01): static batching, the baseline continuous batching beats.

Up to `max_num_seqs` waiting requests form a batch; the batch is prefilled together (prompts
padded to the longest), then decodes one token per row per step until its *last* member
finishes. A member that finishes early keeps its row and keeps being computed (it recomputes its
last cached token and nothing is sampled): those are the wasted row-steps that continuous
batching (stage 02) removes. `running` is the batch, finished members included.
::

    step:      1(prefill) 2   3   4   5   6
    request A  [prompt+pad] o   o   .   .   .     . = idle row: computed for nothing
    request B  [prompt    ] o   o   o   o   o
    request C  [prompt+pad] o   .   .   .   .
    waiting D  ......................................... starts only after step 6
"""

from __future__ import annotations

from typing import Iterable

from folovllm.core.request import Request, RequestStatus
from folovllm.core.scheduler import SchedulerBase
from folovllm.core.scheduler_output import SchedulerOutput
from folovllm.core.slot_kv_cache_manager import StaticKVCacheManager


class StaticBatchScheduler(SchedulerBase):
    kv_cache_manager: StaticKVCacheManager

    @property
    def max_prompt_len(self) -> int:
        return self.config.max_model_len  # the padded batch ignores the token budget

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting) or any(not r.is_finished for r in self.running)

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
        if self.running:
            return self._decode_batch()
        num_seats = min(self.config.max_num_seqs, self.kv_cache_manager.num_free_slots)
        while self.waiting and len(self.running) < num_seats:
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        if not self.running:
            return SchedulerOutput()
        pad_to = max(r.num_tokens for r in self.running)
        capacity = max(pad_to, max(self._max_len(r) for r in self.running))
        self.kv_cache_manager.allocate_batch(self.running, capacity)
        return self._rows(
            num_new_tokens=[r.num_tokens for r in self.running],
            num_computed_tokens=[0] * len(self.running),
            query_lens=[pad_to] * len(self.running),  # every prompt padded to the longest
        )

    def _decode_batch(self) -> SchedulerOutput:
        """Every row computes one token: its next one, or (finished members) its last cached
        token again, which changes nothing and samples nothing."""
        idle = [r.is_finished for r in self.running]
        return self._rows(
            num_new_tokens=[0 if i else 1 for i in idle],
            num_computed_tokens=[r.num_computed_tokens - i for r, i in zip(self.running, idle)],
            query_lens=[1] * len(self.running),
        )
    # --8<-- [end:static_schedule]

    def _rows(self, **rows: list[int]) -> SchedulerOutput:
        tables = [self.kv_cache_manager.get_block_table(r) for r in self.running]
        return SchedulerOutput(requests=list(self.running), block_tables=tables, **rows)

    def _max_len(self, request: Request) -> int:
        """The most tokens this request can hold in the cache."""
        max_tokens = request.sampling_params.max_tokens or self.config.max_model_len
        return min(request.num_prompt_tokens + max_tokens, self.config.max_model_len)

    def num_live_requests(self) -> int:
        return sum(1 for r in self.running if not r.is_finished)

    def live_kv_tokens(self) -> int:
        return sum(r.num_computed_tokens for r in self.running if not r.is_finished)
