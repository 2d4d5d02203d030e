"""Llama 2 / 3: the Qwen3 network without the per-head q/k RMSNorm; optional biases from config.

Llama 3.x checkpoints scale RoPE frequencies ("llama3" rope scaling), handled in
`layers/rotary_embedding.py`.
"""

from typing import Any

from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class LlamaForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def variant(cls, config: Any) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {
            "qkv_bias": bias,
            "o_bias": bias,
            "qk_norm": False,
            "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        }
