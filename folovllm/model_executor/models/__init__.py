"""Model registry: the `architectures` name in config.json -> our model class."""

from folovllm.model_executor.models.llama import LlamaForCausalLM
from folovllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from folovllm.model_executor.models.qwen3_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,  # refused by name: its shared expert
}

__all__ = ["MODEL_REGISTRY", "Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM"]
