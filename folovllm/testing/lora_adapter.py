"""Random LoRA adapters in PEFT's on-disk format, without `peft` (the benchmarks and the demo
use them; the tests make theirs with `peft` itself, the oracle's own writer).

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors  base_model.model.model.layers.{i}.{self_attn,mlp}.{proj}.lora_A.weight [r, in]
                                                                                   .lora_B.weight [out, r]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a Qwen3/Qwen2/Llama layer."""
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def write_random_lora(path: Path, hf_config: Any, rank: int, seed: int,
                      target_modules: Sequence[str] = ALL_PROJECTIONS, lora_alpha: float = 16.0,
                      std: float = 0.05) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = projection_shapes(hf_config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for proj in target_modules:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            n_in, n_out = shapes[proj]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * std
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules),
                  lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False, modules_to_save=None,
                  task_type="CAUSAL_LM")
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path
