"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 network with a mixture of experts
in place of the dense MLP in its sparse layers.

    DecoderLayer:  h = h + SelfAttention(RMSNorm(h))          Qwen3's, imported as is
                   h = h + FFN(RMSNorm(h))

    FFN of layer i = SparseMoeBlock  if i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
                     Qwen3MLP        otherwise (a dense layer, `intermediate_size` wide)

    SparseMoeBlock: router_logits = gate(h)                   [T, E]   (`mlp.gate`, replicated)
                    out = FusedMoE(h, router_logits)          top-k of softmax, k experts per
                                                              token, `moe_intermediate_size` wide

Everything but the FFN is `qwen3.py`'s (attention with per-head q/k norm, RoPE, the decoder
layer's residual layout, embedding and head); this file only says which FFN each layer gets and
how HF's per-expert tensors land in `FusedMoE`'s stacked ones::

    model.layers.1.mlp.experts.{e}.gate_proj.weight  -> model.layers.1.mlp.experts.w13_weight[e, :I]
    model.layers.1.mlp.experts.{e}.up_proj.weight    -> model.layers.1.mlp.experts.w13_weight[e, I:]
    model.layers.1.mlp.experts.{e}.down_proj.weight  -> model.layers.1.mlp.experts.w2_weight[e]

The config is checked before anything is allocated (`check_moe_config`): top-k within the
experts, the sparse-layer fields well formed, and what we do not implement refused by name:
shared experts (Qwen2-MoE's `shared_expert_intermediate_size`), quantized experts in a format
other than GPTQ's, a sliding window. Tensor parallelism splits each expert's intermediate
dimension, expert parallelism hands out whole experts (`layers/fused_moe.py`); GPTQ experts
(GPTQModel's per-expert `qweight`/`qzeros`/`scales`/`g_idx`) load into the same stacked layer.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from folovllm.model_executor.layers.fused_moe import FusedMoE
from folovllm.model_executor.layers.linear import QuantizationConfig, ReplicatedLinear, WeightShapeError
from folovllm.model_executor.layers.quantization.gptq import GPTQConfig
from folovllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP

# Far above any real MoE (Qwen3-235B: 128 experts of 1,536; DeepSeek-V3: 256 experts), low enough
# that a typo cannot make the first allocation take minutes.
MAX_EXPERTS = 1 << 12
MAX_MOE_INTERMEDIATE = 1 << 20


def _int_field(config: Any, name: str, low: int, high: int) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} in the model's config: must be an integer in {low}..{high}")
    return value


def check_moe_config(config: Any, quant_config: Optional[QuantizationConfig]) -> None:
    """Refuse, before any allocation, a Qwen3-MoE config we cannot run, naming the field."""
    shared = getattr(config, "shared_expert_intermediate_size", 0)
    if shared:
        raise ValueError(
            f"shared_expert_intermediate_size={shared}: a shared expert (Qwen2-MoE, DeepSeek) that "
            "every token runs beside its routed experts is not supported; folovllm runs Qwen3-MoE "
            "(no shared expert)")
    num_experts = _int_field(config, "num_experts", 1, MAX_EXPERTS)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok={top_k!r} in the model's config: each token picks "
                         f"1..num_experts={num_experts} experts")
    _int_field(config, "moe_intermediate_size", 1, MAX_MOE_INTERMEDIATE)
    _int_field(config, "decoder_sparse_step", 1, config.num_hidden_layers)
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    bad = [i for i in mlp_only if not isinstance(i, int) or isinstance(i, bool)
           or not 0 <= i < config.num_hidden_layers]
    if not isinstance(mlp_only, (list, tuple)) or bad:
        raise ValueError(f"mlp_only_layers={mlp_only!r} in the model's config: must list layer "
                         f"indices in 0..{config.num_hidden_layers - 1}")
    if not isinstance(getattr(config, "norm_topk_prob", False), bool):
        raise ValueError(f"norm_topk_prob={config.norm_topk_prob!r} in the model's config: must be "
                         "true or false")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: Qwen3-MoE's experts use 'silu'")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=true: sliding-window attention is not supported")
    if quant_config is not None and not isinstance(quant_config, GPTQConfig):
        raise ValueError(
            f"a {type(quant_config).__name__} Qwen3-MoE checkpoint: quantized experts are read in "
            "GPTQ's format only (GPTQModel's layout); load a GPTQ or a float checkpoint")


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """HF's rule: a layer is an MoE layer unless listed in `mlp_only_layers`, every
    `decoder_sparse_step`-th layer (1: all of them)."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


def layer_index(prefix: str) -> int:
    """`model.layers.7.mlp` -> 7 (vLLM's `extract_layer_index`)."""
    parts = prefix.split(".")
    return int(parts[parts.index("layers") + 1])


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__()
        # The router: tiny ([E, H]) and replicated on every rank; never quantized (GPTQModel
        # leaves it float too: a rounding error there changes which experts run).
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=config.norm_topk_prob,
            prefix=f"{prefix}.experts",
            quant_config=quant_config,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states)  # [T, E]
        return self.experts(hidden_states, router_logits)  # [T, H]


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """Qwen3's decoder layer; its FFN is sparse or dense by the layer's index."""

    def make_mlp(
        self, config: Any, variant: dict[str, bool], quant_config: Optional[QuantizationConfig], prefix: str
    ) -> nn.Module:
        if is_sparse_layer(config, layer_index(prefix)):
            return Qwen3MoeSparseMoeBlock(config, quant_config, prefix=prefix)
        return Qwen3MLP(config, bias=False, quant_config=quant_config, prefix=prefix)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    decoder_layer_cls = Qwen3MoeDecoderLayer

    @classmethod
    def variant(cls, config: Any) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "mlp_bias": False}

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None) -> None:
        check_moe_config(config, quant_config)  # before anything is allocated
        super().__init__(config, quant_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Expert tensors go to their `FusedMoE`'s loader with (shard id, expert id); every other
        tensor takes Qwen3's path."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def dense(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                match = FusedMoE.CKPT_NAME.match(name)
                if match is None:
                    yield name, tensor
                    continue
                prefix, expert_id, proj, key = match.group(1), int(match.group(2)), match.group(3), match.group(4)
                shard_id = FusedMoE.CKPT_SHARDS[proj]
                target = f"{prefix}.{'w2' if shard_id == 'w2' else 'w13'}_{key}"
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in "
                                     f"{type(self).__name__} (is this layer in mlp_only_layers? a "
                                     "GPTQ tensor in a float checkpoint, or the reverse?)")
                param = params[target]
                try:
                    param.weight_loader(param, tensor, shard_id, expert_id)
                except WeightShapeError as e:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {e.loaded_shape}, expected "
                                     f"{e.expected_shape} from config.json") from None
                loaded.add(name)

        loaded |= super().load_weights(dense(weights))
        return loaded

    def expected_weights(self) -> set[str]:
        """Qwen3's, with each stacked expert parameter replaced by the per-expert tensors that
        fill it."""
        names = super().expected_weights()
        for module_name, module in self.named_modules():
            if isinstance(module, FusedMoE):
                for stacked, parts in module.checkpoint_names(module_name).items():
                    names.discard(stacked)
                    names |= set(parts)
        return names


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Registered only to refuse it by name (rather than as an "unknown architecture"): Qwen2-MoE
    adds a shared expert with a sigmoid gate to every sparse layer, which we do not implement."""

    refused = True  # left out of the "supported" list of an unknown-architecture error

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None) -> None:
        nn.Module.__init__(self)
        raise ValueError(
            f"Qwen2MoeForCausalLM: shared_expert_intermediate_size="
            f"{getattr(config, 'shared_expert_intermediate_size', None)!r}: a shared expert that every "
            "token runs beside its routed experts is not supported; folovllm runs Qwen3-MoE")
