"""Lab 05: chunked prefill: the step's order and the chunk rule.

Fill in `schedule` and `schedule_running` below; `FOLOVLLM_LAB=starter pytest stages/05` grades
them (they replace `Scheduler.schedule` and `Scheduler.schedule_running` of
`folovllm/core/scheduler.py` while stage 05's tests run; the engine's `schedule_waiting` stays,
already chunking what it admits). Read labs/05/README.md first. `self` is the engine's
`Scheduler`: `self.running`, `self.config.max_num_batched_tokens` (the step's token budget),
`self.max_chunk`, `self.prefill_first_never_mixed`, `self.schedule_waiting(output, budget)`,
`self.allocate_or_preempt(request, num_new, candidates)`, `self.num_preemptions`.

    budget 8   step 1        step 2        step 3
    B (decode) o             o             o              B never waits for C's prompt
    C (prompt) [c0 .. c6]    [c7 .. c13]   [c14 c15] o    a chunk is what the budget leaves
"""

from __future__ import annotations

from collections import deque  # noqa: F401  (candidates for preemption)

from folovllm.core.scheduler_output import SchedulerOutput

# The engine functions these replace (module:Class.method).
REPLACES = {
    "schedule": "folovllm.core.scheduler:Scheduler.schedule",
    "schedule_running": "folovllm.core.scheduler:Scheduler.schedule_running",
}


def schedule(self) -> SchedulerOutput:
    # TODO 1: a new `SchedulerOutput` and the step's budget.
    # TODO 2: stages 02-04 (`self.prefill_first_never_mixed`): if `schedule_waiting` admits anyone,
    #         the step is that prompt step alone; return it.
    # TODO 3: the running requests take their tokens first (`schedule_running`); then, with chunked
    #         prefill and only if nobody was preempted this step, waiting requests are admitted
    #         in what is left of the budget.
    raise NotImplementedError("not implemented: see labs/05/README.md")


def schedule_running(self, output: SchedulerOutput, budget: int) -> tuple[int, bool]:
    """Each running request asks for its missing tokens: one for a decode, the next chunk
    for a prompt being computed (stage 05). Decodes go first, so a long prompt never delays
    anyone's next token; within each kind, oldest first. Returns the budget left and
    whether anyone was preempted."""
    # TODO 1: order `self.running`: decodes (one token missing) before prompts still being
    #         computed, keeping the arrival order within each kind (a stable sort).
    # TODO 2: take them one by one while budget is left. The chunk rule: a request computes its
    #         missing tokens, but no more than the budget left, nor `self.max_chunk`.
    # TODO 3: find KV room with `self.allocate_or_preempt(request, num_new, candidates)`, where
    #         `candidates` (a deque) holds the requests not scheduled yet: it preempts from its
    #         end. False means `request` itself was preempted: stop.
    # TODO 4: a row in `output` (`output.add_row(request, num_new,
    #         self.kv_cache_manager.get_block_table(request))`), spend the budget. Return what is
    #         left and whether `self.num_preemptions` grew.
    raise NotImplementedError("not implemented: see labs/05/README.md")
