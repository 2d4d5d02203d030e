"""Qwen2 / Qwen2.5: the Qwen3 network with biases on q/k/v and no per-head q/k RMSNorm."""

from typing import Any

from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class Qwen2ForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def variant(cls, config: Any) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False, "mlp_bias": False}
