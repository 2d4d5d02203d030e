"""The LoRA wrappers of the model's linear layers (vLLM's `vllm/lora/layers/`).

`LinearWithLoRA` wraps one of `layers/linear.py`'s projections, keeps it as `base_layer`, and
adds each token's adapter update to its output::

    y = base_layer(x)                              the plain (or fused, or quantized) matmul
    punica.add_lora_linear(y, x, lora_a, lora_b)   += (x A_slotᵀ) B_slotᵀ per adapted token

A fused base layer stays fused: `qkv_proj` holds q, k and v's A side by side (one shrink) and
one B per part, whose expand lands in that part's columns of y, the columns
`QKVParallelLinear` gives q, k and v (`output_partition_sizes`)::

    lora_a  [slots, 3R, in]:  rows [0,R) q_proj's A | [R,2R) k_proj's A | [2R,3R) v_proj's A
    y       [T, q+k+v]:       cols [0,q) += ..B_q   | [q,q+k) += ..B_k  | [q+k, q+2k) += ..B_v

An adapter that does not target a part (k_proj only, say) leaves that part's rows of A zero.

The wrappers are installed by `install_lora_layers` only when `enable_lora` is on; otherwise
the model keeps its plain layers and the forward pass has not one extra operation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from folovllm.lora.lora_model import LoRALayerWeights
from folovllm.lora.peft_helper import SUPPORTED_TARGETS
from folovllm.lora.punica_wrapper import PunicaWrapper
from folovllm.model_executor.layers.linear import LinearBase


class LinearWithLoRA(nn.Module):
    """A linear layer plus `max_loras` slots of stacked, rank-padded A and B."""

    def __init__(self, base_layer: LinearBase, slice_names: list[str], max_loras: int,
                 max_lora_rank: int, punica: PunicaWrapper, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.punica = punica
        self.rank = max_lora_rank
        parent = base_layer.prefix.rsplit(".", 1)[0]  # model.layers.0.self_attn
        # the checkpoint module name of each fused part, in output order
        self.slice_modules = [f"{parent}.{name}" for name in slice_names]
        self.input_size = base_layer.input_size_per_partition
        self.output_slices = list(base_layer.output_partition_sizes)
        device = _device_of(base_layer)
        P, R = len(self.output_slices), max_lora_rank
        # not registered as parameters or buffers: the model's weights stay what they were
        self.lora_a_stacked = torch.zeros(max_loras, P * R, self.input_size, dtype=dtype, device=device)
        self.lora_b_stacked = tuple(torch.zeros(max_loras, out, R, dtype=dtype, device=device)
                                    for out in self.output_slices)

    # --8<-- [start:lora_forward]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [T, out]
        self.punica.add_lora_linear(y, x, self.lora_a_stacked, self.lora_b_stacked)
        return y
    # --8<-- [end:lora_forward]

    def set_lora(self, slot: int, weights: list[Optional[LoRALayerWeights]]) -> None:
        """Fill `slot` with one adapter's A/B per part (None: the adapter leaves that part
        alone), zero-padded to the slot's rank."""
        self.lora_a_stacked[slot].zero_()
        R = self.rank
        for p, (w, b_stacked) in enumerate(zip(weights, self.lora_b_stacked)):
            b_stacked[slot].zero_()
            if w is None:
                continue
            self.lora_a_stacked[slot, p * R:p * R + w.rank].copy_(w.lora_a)  # [r, in]
            b_stacked[slot, :, :w.rank].copy_(w.lora_b)  # [out_p, r]

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """Checkpoint module name -> (in, out) of each part (what an adapter must match)."""
        return {m: (self.input_size, out) for m, out in zip(self.slice_modules, self.output_slices)}

    def extra_repr(self) -> str:
        return f"slots={self.lora_a_stacked.shape[0]}, max_lora_rank={self.rank}, parts={self.slice_modules}"


def _device_of(layer: nn.Module) -> torch.device:
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        return tensor.device
    return torch.device("cpu")


def install_lora_layers(model: nn.Module, max_loras: int, max_lora_rank: int,
                        punica: PunicaWrapper, dtype: torch.dtype) -> list[LinearWithLoRA]:
    """Replace every projection LoRA can target (qkv_proj, o_proj, gate_up_proj, down_proj) by
    its wrapper, in place; returns the wrappers. The fused layers' parts come from the model's
    `stacked_params_mapping` (q_proj -> qkv_proj shard "q", ...), ordered by the layer's shards."""
    fused_parts: dict[str, dict[object, str]] = {}
    for ckpt, (fused, shard) in getattr(model, "stacked_params_mapping", {}).items():
        fused_parts.setdefault(fused, {})[shard] = ckpt
    wrappers = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LinearBase):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in fused_parts:
            parts = fused_parts[leaf]
            slices = [parts[shard] for shard in module.shard_ids]
        else:
            slices = [leaf]
        if not all(s in SUPPORTED_TARGETS for s in slices):
            continue
        wrapper = LinearWithLoRA(module, slices, max_loras, max_lora_rank, punica, dtype)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, leaf, wrapper)
        wrappers.append(wrapper)
    return wrappers
