"""`OpenAIServingModels`: the models a server answers to, the base model and its LoRA adapters
(stage 11; vLLM's `serving_models.py`).

    GET  /v1/models                 the base model, then one card per adapter (root: its path,
                                    parent: the base model)
    POST /v1/load_lora_adapter      {"lora_name": ..., "lora_path": ...}: read, checked, listed
    POST /v1/unload_lora_adapter    {"lora_name": ...}: no new request may name it

A request picks an adapter by naming it as its `model`. Each adapter gets a fresh `lora_int_id`
when it is loaded, so an adapter unloaded and loaded again under the same name (new weights)
never meets the old one's KV blocks in the prefix cache, which are keyed by that id.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

from folovllm.engine.async_llm import AsyncLLM
from folovllm.entrypoints.openai.protocol import LoadLoRAAdapterRequest, ModelCard, UnloadLoRAAdapterRequest
from folovllm.entrypoints.openai.serving_engine import APIError
from folovllm.lora.request import LoRARequest


class OpenAIServingModels:
    def __init__(self, async_llm: AsyncLLM, base_model_name: str,
                 lora_modules: Sequence[tuple[str, str]] = ()) -> None:
        """`lora_modules` (`--lora-modules name=path`) are read now: a bad one stops start-up."""
        self.async_llm = async_llm
        self.base_model_name = base_model_name
        self.lora_requests: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        for name, path in lora_modules:
            request = self._new_request(name, path)
            async_llm.engine.lora_manager.add_lora(request)  # before the engine loop runs
            self.lora_requests[name] = request

    def lora_request(self, model: Optional[str]) -> Optional[LoRARequest]:
        """The adapter a request's `model` names (None: the base model, or no model given)."""
        return self.lora_requests.get(model) if model is not None else None

    def model_name(self, lora_request: Optional[LoRARequest]) -> str:
        """What a response's `model` says: the adapter the request ran under, else the base
        model (vLLM's `OpenAIServingModels.model_name`)."""
        return lora_request.lora_name if lora_request is not None else self.base_model_name

    def is_served(self, model: str) -> bool:
        return model == self.base_model_name or model in self.lora_requests

    def model_cards(self, max_model_len: int) -> list[ModelCard]:
        cards = [ModelCard(id=self.base_model_name, max_model_len=max_model_len)]
        cards += [ModelCard(id=name, max_model_len=max_model_len, root=r.lora_path,
                            parent=self.base_model_name) for name, r in self.lora_requests.items()]
        return cards

    def _new_request(self, name: str, path: str) -> LoRARequest:
        if not name or name == self.base_model_name or name in self.lora_requests:
            raise ValueError(f"lora_name {name!r} is already a model of this server"
                             if name else "lora_name must not be empty")
        return LoRARequest(name, next(self._ids), path)

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> str:
        try:
            request = self._new_request(body.lora_name, body.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_name") from e
        try:
            await self.async_llm.add_lora(request)
        except ValueError as e:  # the adapter's own problem: missing path, rank, DoRA, shapes
            raise APIError(400, str(e), param="lora_path") from e
        self.lora_requests[body.lora_name] = request
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> str:
        request = self.lora_requests.pop(body.lora_name, None)
        if request is None:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found; loaded: "
                                f"{sorted(self.lora_requests)}", param="lora_name", code="model_not_found")
        await self.async_llm.remove_lora(request.lora_int_id)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def parse_lora_modules(values: Sequence[str]) -> list[tuple[str, str]]:
    """`--lora-modules name=path ...` -> [(name, path)]; ValueError naming a bad one."""
    modules = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path pairs, got {value!r}")
        modules.append((name, path))
    return modules
