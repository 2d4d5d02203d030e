"""The engine's side of multi-LoRA: adapters known by id, and each step's adapters given a slot
(vLLM splits this between the engine's `add_lora` and the model runner's `set_active_loras`).

    add_lora(request)     at add_request: the workers read and check the adapter (a bad one is
                          refused here, before the request is queued: no slot, no KV touched)
    assign_slots(batch)   each step: the adapters of its rows (at most max_loras: the
                          scheduler's rule) get a slot, the ones already in a slot keep it, a
                          new one takes a free slot or the least recently used one not needed
                          by this step; the rows' slots (-1: base) go into the InputBatch

    max_loras = 2   step 1: A, B   slots [A, B]
                    step 2: B, C   slots [C, B]    A was least recently used: C overwrites it
                    step 3: B      slots [C, B]    nothing copied
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from folovllm.config import EngineConfig
from folovllm.core.request import Request
from folovllm.lora.request import LoRARequest
from folovllm.worker.input_batch import InputBatch


class NoLoRAManager:
    """enable_lora off: a request with an adapter is refused, a step carries no slots."""

    enabled = False

    def add_lora(self, request: Any) -> None:
        raise ValueError("lora_request needs an engine started with enable_lora=True "
                         "(LLM(..., enable_lora=True), or folovllm serve --enable-lora)")

    def remove_lora(self, lora_int_id: int) -> bool:
        return False

    def list_loras(self) -> list[LoRARequest]:
        return []

    def assign_slots(self, batch: InputBatch, requests: Sequence[Request]) -> None:
        pass


class LoRAManager(NoLoRAManager):
    enabled = True

    def __init__(self, config: EngineConfig, executor: Any) -> None:
        self.max_loras = config.max_loras
        self.executor = executor
        self.known: dict[int, LoRARequest] = {}  # every adapter added, by id
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first

    def add_lora(self, request: Any) -> None:
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        known = self.known.get(request.lora_int_id)
        if known is not None and known != request:
            raise ValueError(f"lora_int_id {request.lora_int_id} is already the adapter "
                             f"{known.lora_name!r} at {known.lora_path!r}; give {request.lora_name!r} "
                             "another id")
        self.executor.collective_rpc("add_lora", request)  # read and checked on every rank
        self.known[request.lora_int_id] = request

    def remove_lora(self, lora_int_id: int) -> bool:
        if self.known.pop(lora_int_id, None) is None:
            return False
        self.slot_of.pop(lora_int_id, None)
        self.executor.collective_rpc("remove_lora", lora_int_id)
        return True

    def list_loras(self) -> list[LoRARequest]:
        return list(self.known.values())

    # --8<-- [start:assign_slots]
    def assign_slots(self, batch: InputBatch, requests: Sequence[Request]) -> None:
        ids = [r.lora_request.lora_int_id if r.lora_request is not None else None for r in requests]
        needed = list(dict.fromkeys(i for i in ids if i is not None))
        if not needed:
            return  # a base-only step: no slots, no layout
        assert len(needed) <= self.max_loras, "the scheduler admits at most max_loras adapters"
        for lora_id in needed:
            if lora_id in self.slot_of:
                self.slot_of.move_to_end(lora_id)
                continue
            used = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if not free:  # evict the least recently used adapter this step does not need
                victim = next(i for i in self.slot_of if i not in needed)
                free = [self.slot_of.pop(victim)]
            self.slot_of[lora_id] = free[0]
        batch.lora_slots = [-1 if i is None else self.slot_of[i] for i in ids]
        batch.lora_requests = {self.slot_of[i]: self.known_request(i, requests) for i in needed}
    # --8<-- [end:assign_slots]

    def known_request(self, lora_id: int, requests: Sequence[Request]) -> LoRARequest:
        """The adapter of id `lora_id` (from a request of the step if it was unloaded since)."""
        if lora_id in self.known:
            return self.known[lora_id]
        return next(r.lora_request for r in requests
                    if r.lora_request is not None and r.lora_request.lora_int_id == lora_id)


def make_lora_manager(config: EngineConfig, executor: Any) -> NoLoRAManager:
    return LoRAManager(config, executor) if config.enable_lora else NoLoRAManager()
