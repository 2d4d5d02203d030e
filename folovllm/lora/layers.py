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

Tensor parallelism (stage 08) splits A and B the way their base layer splits W (vLLM's
`ColumnParallelLinearWithLoRA`, `RowParallelLinearWithLoRA`)::

    column-parallel (qkv, gate_up)   y_r = x W_rᵀ            A whole, B_r = B's rows of rank r
                                     += (x Aᵀ) B_rᵀ          (each fused part's own slice)
    row-parallel (o, down)           y = all_reduce(x_r W_rᵀ + (x_r A_rᵀ) Bᵀ)
                                     A_r = A's input columns of rank r, B whole

In the row-parallel layer each rank's shrink `x_r A_rᵀ` is a partial sum of `x Aᵀ`; expanded by
the whole B, the partials still add up to `(x Aᵀ) Bᵀ` (the expand is linear), so the layer's own
all-reduce carries the LoRA term: no second collective. vLLM does the same; the other choice,
all-reducing the [T, P*R] shrink result and expanding once, costs an extra collective per layer
to save each rank an expand of `R · out` multiply-adds per token, a bad trade on a CPU (and on a
GPU, where a collective's latency dwarfs so small a matmul).

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
from folovllm.distributed.parallel_state import tensor_model_parallel_all_reduce
from folovllm.model_executor.layers.linear import ColumnParallelLinear, LinearBase, RowParallelLinear


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
        # not registered as parameters or buffers: the model's weights stay what they were.
        # Stored k-major, as the C++ kernel reads them (csrc/cpu/lora.cpp): Aᵀ [slots, in, W]
        # with each row padded to W (a multiple of 16 floats: whole vectors), Bᵀ [slots, R,
        # out_p]; the torch ops and set_lora see vLLM's layout through transposed views.
        W = -(-P * R // 16) * 16
        self.lora_at_stacked = torch.zeros(max_loras, self.input_size, W, dtype=dtype, device=device)
        self.lora_a_stacked = self.lora_at_stacked[:, :, :P * R].transpose(1, 2)  # [slots, P*R, in]
        self.lora_b_stacked = tuple(torch.zeros(max_loras, R, out, dtype=dtype, device=device).transpose(1, 2)
                                    for out in self.output_slices)  # P x [slots, out_p, R]
        # each slot's true rank per part (0: the adapter leaves the part alone): the kernel
        # computes those ranks only, not R
        self.lora_ranks = torch.zeros(max_loras, P, dtype=torch.long)

    # --8<-- [start:lora_forward]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [T, out]
        self.punica.add_lora_linear(y, x, self.lora_a_stacked, self.lora_b_stacked, self.lora_ranks)
        return y
    # --8<-- [end:lora_forward]

    def set_lora(self, slot: int, weights: list[Optional[LoRALayerWeights]]) -> None:
        """Fill `slot` with one adapter's A/B per part (None: the adapter leaves that part
        alone), this rank's slice of them, zero-padded to the slot's rank."""
        self.lora_a_stacked[slot].zero_()
        self.lora_ranks[slot].zero_()
        R = self.rank
        for p, (w, b_stacked) in enumerate(zip(weights, self.lora_b_stacked)):
            b_stacked[slot].zero_()
            if w is None:
                continue
            self.lora_ranks[slot, p] = w.rank
            self.lora_a_stacked[slot, p * R:p * R + w.rank].copy_(self.slice_lora_a(w.lora_a))  # [r, in]
            b_stacked[slot, :, :w.rank].copy_(self.slice_lora_b(w.lora_b, p))  # [out_p, r]

    def slice_lora_a(self, lora_a: torch.Tensor) -> torch.Tensor:
        """This rank's part of an adapter's A [r, in] (whole here: the input is not split)."""
        return lora_a

    def slice_lora_b(self, lora_b: torch.Tensor, part: int) -> torch.Tensor:
        """This rank's part of fused part `part`'s B [out, r] (whole here)."""
        return lora_b

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """Checkpoint module name -> (in, out) of each part (what an adapter must match): the
        whole layer's, whatever this rank holds of it."""
        base = self.base_layer
        return {m: (base.input_size, out) for m, out in zip(self.slice_modules, base.output_sizes)}

    def extra_repr(self) -> str:
        return f"slots={self.lora_a_stacked.shape[0]}, max_lora_rank={self.rank}, parts={self.slice_modules}"


class ColumnParallelLinearWithLoRA(LinearWithLoRA):
    """qkv_proj, gate_up_proj: rank r computes its output columns, so it keeps those rows of
    each part's B, cut as the base layer cuts W (q by query heads, k/v by kv heads, replicated
    ones included: `shard_rank`)."""

    def slice_lora_b(self, lora_b: torch.Tensor, part: int) -> torch.Tensor:
        base = self.base_layer
        if base.tp_size == 1:
            return lora_b
        size = self.output_slices[part]  # this part's rows on this rank
        shard = base.shard_ids[part] if base.shard_ids else None
        return lora_b[base.shard_rank(shard) * size:(base.shard_rank(shard) + 1) * size]  # [out_p / tp, r]


class RowParallelLinearWithLoRA(LinearWithLoRA):
    """o_proj, down_proj: rank r sees input features [r * in/tp, (r+1) * in/tp), so it keeps
    those columns of A and all of B; the LoRA term joins the partial sum before the layer's
    all-reduce (see the module docstring)."""

    def slice_lora_a(self, lora_a: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        size = base.input_size_per_partition
        return lora_a[:, base.tp_rank * size:(base.tp_rank + 1) * size]  # [r, in / tp]

    # --8<-- [start:row_lora_forward]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_r [T, in / tp] -> [T, out], the same on every rank (RowParallelLinear.forward with
        the LoRA term added to this rank's partial sum)."""
        base = self.base_layer
        bias = base.bias if base.tp_rank == 0 else None  # added once, not tp times
        partial = base.quant_method.apply(base, x, bias)  # [T, out]: this rank's share
        self.punica.add_lora_linear(partial, x, self.lora_a_stacked, self.lora_b_stacked,  # += (x_r A_rᵀ) Bᵀ
                                    self.lora_ranks)
        return tensor_model_parallel_all_reduce(partial)
    # --8<-- [end:row_lora_forward]


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
        kind = (RowParallelLinearWithLoRA if isinstance(module, RowParallelLinear)
                else ColumnParallelLinearWithLoRA if isinstance(module, ColumnParallelLinear)
                else LinearWithLoRA)
        wrapper = kind(module, slices, max_loras, max_lora_rank, punica, dtype)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, leaf, wrapper)
        wrappers.append(wrapper)
    return wrappers
