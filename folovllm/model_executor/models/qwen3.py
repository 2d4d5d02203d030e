"""Qwen3 decoder-only transformer (the architecture of Qwen/Qwen3-0.6B), written like the paper.

    input_ids -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits

    DecoderLayer:  h = h + SelfAttention(RMSNorm(h))
                   h = h + MLP(RMSNorm(h))           MLP = down(silu(gate(h)) * up(h))

    SelfAttention: q, k, v = split(qkv_proj(h))       grouped-query: Hq query heads share
                   q, k   = RMSNorm per head (Qwen3)   Hkv key/value heads (Hq % Hkv == 0)
                   q, k   = RoPE(q, k, positions)
                   o      = Attention(q, k, v)  <- the only place the KV cache is touched
                   out    = o_proj(o)

Tokens arrive flattened, [T] ids with their [T] positions, whatever sequence they belong to; the
`AttentionMetadata` tells the attention layer which tokens form which sequence. So the same
forward serves a padded static batch, a packed prefill and a batch of decodes.

q_proj/k_proj/v_proj are fused into one `qkv_proj` matmul and gate_proj/up_proj into
`gate_up_proj` (one larger matmul is faster than three small ones). The projections are the
linear layers of `layers/linear.py`: each parameter carries its own `weight_loader`, which puts
a checkpoint tensor where it belongs (`k_proj` into the k rows of `qkv_proj`), so `load_weights`
here only maps names, and a quantization method (stage 07) or a tensor-parallel split (stage 08)
changes the layers, not this file. With tensor parallelism (stage 08) each rank builds the same
network with its share of the heads (`qkv_proj.num_heads` / `num_kv_heads` are per rank) and of
the vocabulary (`VocabParallelEmbedding`, `ParallelLMHead`). Qwen2 (`qwen2.py`) and Llama (`llama.py`) are the same
network with q/k/v biases instead of the per-head q/k norm.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm.model_executor.layers.attention import Attention, AttentionMetadata
from folovllm.model_executor.layers.layernorm import RMSNorm
from folovllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    QuantizationConfig,
    RowParallelLinear,
    WeightShapeError,
    check_weight_dtype,
    default_weight_loader,
)
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding


def get_rope_config(config: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from an HF config, old style (`rope_theta`) or new
    (`rope_parameters`, transformers >= 5)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        rope_type = params.get("rope_type", "default")
        return float(params["rope_theta"]), (None if rope_type == "default" else params)
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


class Qwen3Attention(nn.Module):
    def __init__(
        self,
        config: Any,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        total_num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_num_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_num_heads, config.num_key_value_heads,
            bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads (all of them on one rank)
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_num_heads * self.head_dim, config.hidden_size, bias=o_bias, quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.qk_norm = qk_norm
        if qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    # --8<-- [start:qwen3_attention_forward]
    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        T = hidden_states.shape[0]
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v, attn_metadata)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))
    # --8<-- [end:qwen3_attention_forward]


class Qwen3MLP(nn.Module):
    def __init__(
        self, config: Any, bias: bool = False, quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, H] -> [T, 2I] -> [T, H]


class Qwen3DecoderLayer(nn.Module):
    def __init__(
        self,
        config: Any,
        rotary_emb: RotaryEmbedding,
        variant: dict[str, bool],
        quant_config: Optional[QuantizationConfig] = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(
            config,
            rotary_emb,
            qkv_bias=variant["qkv_bias"],
            o_bias=variant["o_bias"],
            qk_norm=variant["qk_norm"],
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = self.make_mlp(config, variant, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_mlp(
        self, config: Any, variant: dict[str, bool], quant_config: Optional[QuantizationConfig], prefix: str
    ) -> nn.Module:
        """The feed-forward block; a mixture-of-experts model (`qwen3_moe.py`) overrides it."""
        return Qwen3MLP(config, bias=variant["mlp_bias"], quant_config=quant_config, prefix=prefix)

    # --8<-- [start:decoder_layer_forward]
    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: Optional[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried beside h and added inside each norm (vLLM's layout):
        #   residual = h + residual; h = norm(residual)   is one kernel (fused_add_rms_norm)
        # and the same two lines as `h = h + f(norm(h))` written out.
        if residual is None:  # the first layer: the embeddings are the residual stream
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, attn_metadata)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual
    # --8<-- [end:decoder_layer_forward]


class Qwen3Model(nn.Module):
    def __init__(
        self, config: Any, variant: dict[str, bool], quant_config: Optional[QuantizationConfig] = None,
        layer_cls: type[Qwen3DecoderLayer] = Qwen3DecoderLayer,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_theta, rope_scaling = get_rope_config(config)
        # One rotary table shared by every layer: it only depends on positions.
        rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_theta, rope_scaling)
        self.layers = nn.ModuleList(
            layer_cls(config, rotary_emb, variant, quant_config, prefix=f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, attn_metadata)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    # Checkpoint tensors that are one part of a fused parameter: checkpoint module name ->
    # (fused module name, shard id). The shard id tells the fused layer's `weight_loader` which
    # rows are the tensor's (see `QKVParallelLinear`, `MergedColumnParallelLinear`).
    stacked_params_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    decoder_layer_cls: type[Qwen3DecoderLayer] = Qwen3DecoderLayer  # Qwen3-MoE swaps in its own

    @classmethod
    def variant(cls, config: Any) -> dict[str, bool]:
        """What distinguishes this architecture inside the Qwen3/Qwen2/Llama family."""
        return {"qkv_bias": False, "o_bias": False, "qk_norm": True, "mlp_bias": False}

    def __init__(self, config: Any, quant_config: Optional[QuantizationConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = Qwen3Model(config, self.variant(config), quant_config, self.decoder_layer_cls)
        # Never quantized (as in GPTQ checkpoints); split by vocabulary like the embedding.
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """[N, hidden] -> float32 logits [N, vocab]; called only on the rows that sample.
        With tensor parallelism only rank 0 gets them (None elsewhere)."""
        logits = self.lm_head(hidden_states)
        return None if logits is None else logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Hand each checkpoint tensor (HF name) to its parameter's `weight_loader`; returns the
        checkpoint names used (so a missing tensor is reported under the name the user's
        checkpoint would have).

        `model.layers.0.self_attn.k_proj.weight` goes to `...qkv_proj.weight` with shard id "k";
        the layer knows that means rows [q_size, q_size + kv_size). Parameters outside the linear
        layers (norms, embedding, head) have no loader of their own and are copied whole.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                continue  # the embedding is the head
            target, shard_id = name, None
            for ckpt_name, (fused_name, fused_shard) in self.stacked_params_mapping.items():
                if f".{ckpt_name}." in name:
                    target, shard_id = name.replace(f".{ckpt_name}.", f".{fused_name}."), fused_shard
                    break
            if target not in params and self.quant_config is not None and \
                    self.quant_config.skips_checkpoint_tensor(name):
                continue  # e.g. AutoGPTQ's all-zero bias of a layer that has none
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            param = params[target]
            check_weight_dtype(name, param, tensor)
            try:
                if shard_id is None:
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard_id)
            except WeightShapeError as e:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {e.loaded_shape}, expected "
                    f"{e.expected_shape} from config.json"
                ) from None
            loaded.add(name)
        return loaded

    def expected_weights(self) -> set[str]:
        """Every checkpoint tensor (HF name) `load_weights` needs for the model to be complete:
        our fused `qkv_proj` needs `q_proj`, `k_proj` and `v_proj`, and so on."""
        names = set()
        for name, _ in self.named_parameters():  # tied parameters appear once
            parts = [
                name.replace(f".{fused}.", f".{ckpt}.")
                for ckpt, (fused, _) in self.stacked_params_mapping.items()
                if f".{fused}." in name
            ]
            names |= set(parts) if parts else {name}
        return names
