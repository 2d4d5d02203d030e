"""The worker's side of multi-LoRA (vLLM's `LRUCacheWorkerLoRAManager` in
`vllm/lora/worker_manager.py` and the slots of `LoRAModelManager` in `vllm/lora/models.py`).

Two tiers, both fixed in size::

    disk (lora_path)  --load-->  CPU cache: up to max_cpu_loras LoRAModels, least recently used
                                 dropped first (read from disk again when needed)
                      --copy-->  slots: max_loras stacked A/B tensors per layer, the only copy
                                 the forward pass reads (on a GPU: device memory)

The engine decides which adapter sits in which slot (`engine_manager.py`) and sends it with each
step's `InputBatch` (`lora_requests`: slot -> adapter); here a slot whose content differs is
filled from the CPU cache, and the step's per-token slots are laid out for the layers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from folovllm.config import EngineConfig
from folovllm.lora.layers import LinearWithLoRA, install_lora_layers
from folovllm.lora.lora_model import LoRAModel
from folovllm.lora.punica_wrapper import PunicaWrapper
from folovllm.lora.request import LoRARequest
from folovllm.worker.input_batch import InputBatch


class NoWorkerLoRAManager:
    """enable_lora off: the model keeps its plain layers and a step lays out nothing."""

    def set_active_adapters(self, batch: InputBatch) -> None:
        pass


class WorkerLoRAManager(NoWorkerLoRAManager):
    def __init__(self, model: nn.Module, config: EngineConfig) -> None:
        self.max_loras = config.max_loras
        self.max_lora_rank = config.max_lora_rank
        self.capacity = config.max_cpu_loras or config.max_loras
        self.dtype = model.model.embed_tokens.weight.dtype
        # the C++ shrink/expand kernels come with the other CPU kernels (custom_ops="all")
        self.punica = PunicaWrapper(torch.device(config.device), num_slots=self.max_loras,
                                    use_kernel=config.custom_ops == "all")
        self.layers: list[LinearWithLoRA] = install_lora_layers(
            model, self.max_loras, self.max_lora_rank, self.punica, self.dtype)
        self.expected: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            self.expected.update(layer.expected_shapes())
        self.cpu_cache: OrderedDict[int, LoRAModel] = OrderedDict()  # LRU: oldest first
        self.slot_ids: list[Optional[int]] = [None] * self.max_loras  # adapter id in each slot
        self.num_loads = 0  # adapters read from disk (a test reads it: the CPU LRU works)

    def add_adapter(self, request: LoRARequest) -> LoRAModel:
        """The adapter, from the CPU cache or read (and checked) from disk; ValueError naming
        what is wrong. The least recently used adapter beyond `max_cpu_loras` is dropped."""
        lora = self.cpu_cache.get(request.lora_int_id)
        if lora is None:
            lora = LoRAModel.from_local_checkpoint(request, self.expected, self.max_lora_rank, self.dtype)
            self.num_loads += 1
            self.cpu_cache[request.lora_int_id] = lora
            while len(self.cpu_cache) > self.capacity:
                self.cpu_cache.popitem(last=False)
        self.cpu_cache.move_to_end(request.lora_int_id)
        return lora

    def remove_adapter(self, lora_int_id: int) -> None:
        self.cpu_cache.pop(lora_int_id, None)
        self.slot_ids = [None if i == lora_int_id else i for i in self.slot_ids]

    # --8<-- [start:set_active_adapters]
    def set_active_adapters(self, batch: InputBatch) -> None:
        """Fill the slots this step uses that hold another adapter, then lay out which token
        reads which slot (every LoRA layer of the step reads that one layout)."""
        for slot, request in batch.lora_requests.items():
            if self.slot_ids[slot] == request.lora_int_id:
                continue  # already there: nothing is copied
            lora = self.add_adapter(request)
            for layer in self.layers:
                layer.set_lora(slot, [lora.loras.get(m) for m in layer.slice_modules])
            self.slot_ids[slot] = request.lora_int_id
        row_slots = batch.lora_slots or [-1] * batch.num_rows
        self.punica.update_metadata(row_slots, batch.query_lens)
    # --8<-- [end:set_active_adapters]
