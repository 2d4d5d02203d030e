"""The scheduler's LoRA rule: the requests running at once use at most `max_loras` distinct
adapters, so every step's adapters fit in the slots (vLLM's `max_loras` check in
`v1/core/sched/scheduler.py`).

The scheduler asks `can_admit(head of the queue, running)` before admitting a request. The
answer is no when its adapter is new and `max_loras` others are running; the scheduler then
stops admitting for this step (FCFS: nobody overtakes the head). The running requests finish,
an adapter leaves, the head gets in: it waits, it is never starved. (vLLM skips it and admits
requests behind it instead, which fills the batch better and can starve it.)

    max_loras = 2     running: A A B        waiting: C  A  base
                      C is new and A, B fill both slots -> C waits, and so do A and base
                      after the last B finishes         -> C, A, base are admitted
"""

from __future__ import annotations

from typing import Iterable

from folovllm.config import EngineConfig
from folovllm.core.request import Request


class NoLoRAAdmission:
    """enable_lora off: every request may run."""

    def can_admit(self, request: Request, running: Iterable[Request]) -> bool:
        return True


# --8<-- [start:lora_admission]
class LoRAAdmission(NoLoRAAdmission):
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras

    def can_admit(self, request: Request, running: Iterable[Request]) -> bool:
        lora = request.lora_request
        if lora is None:
            return True  # the base model needs no slot
        active = {r.lora_request.lora_int_id for r in running
                  if r.lora_request is not None and not r.is_finished}
        return lora.lora_int_id in active or len(active) < self.max_loras
# --8<-- [end:lora_admission]


def make_lora_admission(config: EngineConfig) -> NoLoRAAdmission:
    return LoRAAdmission(config.max_loras) if config.enable_lora else NoLoRAAdmission()
