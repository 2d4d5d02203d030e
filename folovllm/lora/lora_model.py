"""`LoRAModel`: one adapter's weights, by module, checked against the base model (vLLM's
`LoRAModel` in `vllm/lora/models.py`, `LoRALayerWeights` in `vllm/lora/lora.py`).

Loading is where every refusal happens, so a bad adapter fails the request that names it (at
`add_request`) and never a step: the config (`PEFTHelper`), then each tensor's name (a
projection we have a slot for), its shape against the base layer (an adapter of another base
model), its rank against `max_lora_rank`. The scaling is folded into B here, once, as vLLM
does (`LoRALayerWeights.optimize`): the batched op then computes `y += (x A^T) B'^T`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from folovllm.lora.peft_helper import SUPPORTED_TARGETS, WEIGHTS_FILE, PEFTHelper
from folovllm.lora.request import LoRARequest

# base_model.model.<module>.lora_A.weight  (PEFT may keep the adapter name: lora_A.default.weight)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRALayerWeights:
    """One adapted projection: A [r, in], B [out, r] with the scaling folded in."""

    module_name: str  # the checkpoint's name: model.layers.0.self_attn.q_proj
    rank: int
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r], already times scaling


@dataclass
class LoRAModel:
    lora_int_id: int
    rank: int
    scaling: float
    loras: dict[str, LoRALayerWeights]  # by checkpoint module name

    @classmethod
    def from_local_checkpoint(cls, request: LoRARequest, expected: dict[str, tuple[int, int]],
                              max_lora_rank: int, dtype: torch.dtype) -> "LoRAModel":
        """`expected`: checkpoint module name -> (in, out) of the base projection it adapts."""
        from safetensors.torch import load_file

        name = request.lora_name
        peft = PEFTHelper.from_local_dir(request.lora_path, name)
        if peft.r > max_lora_rank:
            raise ValueError(f"adapter {name!r} has rank r={peft.r} (adapter_config.json 'r'), "
                             f"more than max_lora_rank={max_lora_rank}; raise max_lora_rank")
        file = Path(request.lora_path).expanduser() / WEIGHTS_FILE
        try:
            tensors = load_file(str(file))
        except Exception as e:  # safetensors' own error type for a corrupt file
            raise ValueError(f"adapter {name!r}: {file} is corrupt or unreadable ({e})") from e
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a "
                                 f"projection (embeddings, lm_head and saved modules are not served)")
            module = match["module"]
            if module not in expected:
                leaf = module.rsplit(".", 1)[-1]
                why = (f"this base model has no module {module!r}" if leaf in SUPPORTED_TARGETS
                       else f"target module {leaf!r} is not served; supported: {list(SUPPORTED_TARGETS)}")
                raise ValueError(f"adapter {name!r}: tensor {key!r}: {why}")
            pairs.setdefault(module, {})[match["ab"]] = tensor
        if not pairs:
            raise ValueError(f"adapter {name!r}: {file} holds no LoRA weights")
        loras = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"adapter {name!r}: module {module!r} has lora_{''.join(ab)} "
                                 "but not both lora_A and lora_B")
            a, b = ab["A"], ab["B"]
            n_in, n_out = expected[module]
            if a.shape != (peft.r, n_in) or b.shape != (n_out, peft.r):
                raise ValueError(
                    f"adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)}, but this base model with r={peft.r} needs "
                    f"({peft.r}, {n_in}) and ({n_out}, {peft.r}): an adapter trained on another "
                    "base model?"
                )
            loras[module] = LoRALayerWeights(module, peft.r, a.to(dtype).contiguous(),
                                             (b.float() * peft.scaling).to(dtype).contiguous())
        return cls(request.lora_int_id, peft.r, peft.scaling, loras)
