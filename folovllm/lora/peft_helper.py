"""`PEFTHelper`: read a PEFT adapter's `adapter_config.json` and refuse what we do not serve
(vLLM's `vllm/lora/peft_helper.py`).

A PEFT LoRA checkpoint is a folder::

    adapter_config.json          r, lora_alpha, target_modules, use_rslora, use_dora, ...
    adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]
                                 base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight [out, r]

and the adapted layer computes `y = x W^T + scaling * (x A^T) B^T`, with
`scaling = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`, which keeps the update's size
steady as r grows). Everything else PEFT can write changes that formula or adds weights the
engine has no slot for, so it is refused here, by name, before any weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

# The projections a LoRA slot exists for: the attention's and the MLP's linear layers. The
# embedding and the LM head are vocabulary-sized (another kind of layer, left out).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_VOCAB_TARGETS = ("embed_tokens", "lm_head")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class PEFTHelper:
    r: int
    lora_alpha: float
    target_modules: Union[list[str], str]
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[list[str]] = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """What multiplies (x A^T) B^T: lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_local_dir(cls, lora_path: Union[str, Path], lora_name: str) -> "PEFTHelper":
        path = Path(lora_path).expanduser()
        if not path.is_dir():
            raise ValueError(f"lora_path {str(lora_path)!r} of adapter {lora_name!r} does not exist "
                             "(expected a PEFT folder with adapter_config.json)")
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise ValueError(f"adapter {lora_name!r}: no {CONFIG_FILE} in lora_path {str(path)!r}")
        if not (path / WEIGHTS_FILE).is_file():
            raise ValueError(f"adapter {lora_name!r}: no {WEIGHTS_FILE} in lora_path {str(path)!r} "
                             "(only safetensors adapters are read)")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter {lora_name!r}: {config_file} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"adapter {lora_name!r}: {config_file} must hold a JSON object")
        peft_type = raw.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"adapter {lora_name!r}: peft_type {peft_type!r} is not served, only 'LORA'")
        for name in ("r", "lora_alpha", "target_modules"):
            if raw.get(name) is None:
                raise ValueError(f"adapter {lora_name!r}: {CONFIG_FILE} has no {name!r}")
        known = {f for f in cls.__dataclass_fields__}
        helper = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        helper.check(lora_name)
        return helper

    def check(self, lora_name: str) -> None:
        """Refuse, naming the field, what would change the LoRA formula or need other slots."""
        where = f"adapter {lora_name!r}: {CONFIG_FILE}"
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"{where} 'r' must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"{where} 'lora_alpha' must be a number, got {self.lora_alpha!r}")
        if self.use_dora:
            raise ValueError(f"{where} sets 'use_dora': DoRA adapters (a learned magnitude per "
                             "output) are not served, only plain LoRA")
        if self.modules_to_save:
            raise ValueError(f"{where} sets 'modules_to_save' {self.modules_to_save}: fully "
                             "trained copies of base modules are not served, only LoRA A/B pairs")
        if self.bias != "none":
            raise ValueError(f"{where} sets 'bias' {self.bias!r}: LoRA biases are not served")
        if self.fan_in_fan_out:
            raise ValueError(f"{where} sets 'fan_in_fan_out' (GPT-2 Conv1D layout): not served")
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                raise ValueError(f"{where} sets {name!r}: per-module ranks or alphas are not served")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        for target in targets:
            leaf = target.rsplit(".", 1)[-1]
            if leaf in _VOCAB_TARGETS:
                raise ValueError(f"{where} 'target_modules' names {target!r}: embedding and "
                                 f"lm_head adapters are not served; supported: {list(SUPPORTED_TARGETS)}")
            if isinstance(self.target_modules, list) and leaf not in SUPPORTED_TARGETS:
                raise ValueError(f"{where} 'target_modules' names {target!r}, not a projection "
                                 f"of this model; supported: {list(SUPPORTED_TARGETS)}")
