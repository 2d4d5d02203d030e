"""Lab 01: static batching, the baseline every later stage beats.

Fill in the two methods below; `FOLOVLLM_LAB=starter pytest stages/01` grades them (they replace
`StaticBatchScheduler.schedule` and `StaticBatchScheduler._decode_batch` of
`folovllm/core/static_batch_scheduler.py` while stage 01's tests run). Read labs/01/README.md
first. `self` is the engine's `StaticBatchScheduler`: use its attributes and helpers as they are
(`self.waiting`, `self.running`, `self.config`, `self.kv_cache_manager`, `self._rows`,
`self._max_len`).
"""

from __future__ import annotations

from folovllm.core.request import RequestStatus  # noqa: F401  (you will need it)
from folovllm.core.scheduler_output import SchedulerOutput

# The engine functions these replace (module:Class.method).
REPLACES = {
    "schedule": "folovllm.core.static_batch_scheduler:StaticBatchScheduler.schedule",
    "_decode_batch": "folovllm.core.static_batch_scheduler:StaticBatchScheduler._decode_batch",
}


def schedule(self) -> SchedulerOutput:
    # TODO 1: a batch is running -> every step is a decode step of the whole batch
    #         (`self._decode_batch()`), finished members included.
    # TODO 2: otherwise form a new batch: take waiting requests in arrival order while there is
    #         a seat: at most `self.config.max_num_seqs` rows, and no more than the KV cache has
    #         slots for (`self.kv_cache_manager.num_free_slots`). Each becomes RUNNING and joins
    #         `self.running`. Nobody waiting -> an empty `SchedulerOutput()`.
    # TODO 3: reserve the batch's KV: `self.kv_cache_manager.allocate_batch(self.running, capacity)`,
    #         every row as long as the longest sequence any member may reach (its prompt plus its
    #         max_tokens: `self._max_len(request)`), and never shorter than the longest prompt.
    # TODO 4: return the prefill rows with `self._rows(num_new_tokens=..., num_computed_tokens=...,
    #         query_lens=...)`: each row computes its whole prompt, nothing is cached yet, and every
    #         row is padded to the longest prompt of the batch.
    raise NotImplementedError("not implemented: see labs/01/README.md")


def _decode_batch(self) -> SchedulerOutput:
    """Every row computes one token: its next one, or (finished members) its last cached
    token again, which changes nothing and samples nothing."""
    # TODO: one row per member of `self.running`, each feeding the model one token
    #       (query_lens 1). A member still running adds its next token (num_new_tokens 1) after
    #       its `num_computed_tokens`; a finished member (`request.is_finished`) adds nothing
    #       (num_new_tokens 0) and recomputes its last cached token, so its row starts one
    #       token earlier. Return `self._rows(...)` with the three lists.
    raise NotImplementedError("not implemented: see labs/01/README.md")
