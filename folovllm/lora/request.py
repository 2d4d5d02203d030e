"""`LoRARequest`: the adapter a request runs under (vLLM's `vllm/lora/request.py`).

The engine knows an adapter by `lora_int_id` (a positive integer, unique per adapter): the
prefix cache keys blocks by it, the slots are assigned by it. `lora_name` is what people call
it (the server's `model` field), `lora_path` the PEFT folder its weights are read from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(
                f"lora_int_id must be a positive integer (0 and below mean no adapter), got "
                f"{self.lora_int_id!r}"
            )
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(
                f"lora_path must be the path of a PEFT adapter folder, got {self.lora_path!r}"
            )
