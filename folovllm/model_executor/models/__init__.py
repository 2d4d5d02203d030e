"""Model registry: the `architectures` name in config.json -> our model class."""

from folovllm.model_executor.models.llama import LlamaForCausalLM
from folovllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"]
