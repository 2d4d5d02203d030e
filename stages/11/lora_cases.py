"""Stage 11's test adapters: real PEFT checkpoints made with `peft` itself, with random non-zero
A and B (PEFT starts B at zero, which would make every adapter the base model), and the HF +
PEFT model of each as the oracle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from folovllm.lora.request import LoRARequest
from tests.helpers import hf_greedy

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Three adapters of different ranks and target sets (one rsLoRA): a batch mixing them with the
# base model runs fused parts an adapter leaves alone (B's v only, C's MLP without up_proj).
ADAPTER_SPECS = {
    "A": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "B": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS, use_rslora=True),
    "C": dict(r=16, lora_alpha=8, target_modules=["o_proj", "gate_proj", "down_proj", "k_proj"]),
}


@dataclass
class Adapter:
    name: str
    path: Path
    hf: Any  # the HF model with this adapter (PEFT), eval mode
    request: LoRARequest


def make_peft_adapter(base_path: Path, out_dir: Path, name: str, lora_int_id: int, seed: int,
                      std: float = 0.15, **lora_config: Any) -> Adapter:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_A" in param_name or "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(out_dir)
    return Adapter(name, out_dir, model.eval(), LoRARequest(name, lora_int_id, str(out_dir)))


def make_adapters(base_path: Path, root: Path) -> dict[str, Adapter]:
    return {name: make_peft_adapter(base_path, root / name, name, i + 1, seed=100 + i, **spec)
            for i, (name, spec) in enumerate(ADAPTER_SPECS.items())}


def reference_tokens(hf_base: Any, adapters: dict[str, Adapter], prompts: list[list[int]],
                     max_tokens: list[int], names: list[Optional[str]]) -> list[list[int]]:
    """HF greedy of each prompt under its adapter (None: the base model)."""
    return [hf_greedy(hf_base if n is None else adapters[n].hf, p, m)
            for p, m, n in zip(prompts, max_tokens, names)]
