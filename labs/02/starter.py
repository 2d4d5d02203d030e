"""Lab 02: continuous batching's admission loop.

Fill in `schedule_waiting` below; `FOLOVLLM_LAB=starter pytest stages/02` grades it (it replaces
`Scheduler.schedule_waiting` of `folovllm/core/scheduler.py` while stage 02's tests run). Read
labs/02/README.md first. `self` is the engine's `Scheduler`: `self.waiting` (a deque, oldest
first), `self.running` (a list), `self.config`, `self.kv_cache_manager`,
`self.prefill_first_never_mixed` and `self.max_chunk` are yours to use.
"""

from __future__ import annotations

from folovllm.core.request import RequestStatus  # noqa: F401  (you will need it)
from folovllm.core.scheduler_output import SchedulerOutput

# The engine function this replaces (module:Class.method).
REPLACES = {"schedule_waiting": "folovllm.core.scheduler:Scheduler.schedule_waiting"}


def schedule_waiting(self, output: SchedulerOutput, budget: int) -> int:
    """Admit waiting requests, oldest first, while a seat, the budget and KV memory allow.
    Returns how many were admitted."""
    # TODO 1: loop while someone waits and a seat is free (`self.config.max_num_seqs` running
    #         requests at most). Look at the head of the queue only; do not pop it yet.
    # TODO 2: how many tokens it needs this step. Ask the KV cache manager what is already
    #         cached first: `blocks, num_computed = self.kv_cache_manager.get_computed_blocks(request)`
    #         (always ([], 0) before stage 06); the rest of its `num_tokens` is new.
    #         (Stage 05 only, `not self.prefill_first_never_mixed`: a chunk of it, at most
    #         `budget` and `self.max_chunk` tokens.)
    # TODO 3: first come, first served: if the head does not fit in the budget (or needs nothing),
    #         or the KV cache manager refuses it (`allocate_slots(request, num_new, blocks)`
    #         returns False), stop: nobody behind it may overtake it.
    # TODO 4: admit it: out of `self.waiting`, status RUNNING, `num_computed_tokens` set to what
    #         was cached, into `self.running`, and a row in `output`
    #         (`output.add_row(request, num_new, self.kv_cache_manager.get_block_table(request))`).
    #         Spend the budget and count it.
    raise NotImplementedError("not implemented: see labs/02/README.md")
