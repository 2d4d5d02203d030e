"""folovllm: a small LLM inference engine in the vLLM family, built one optimisation at a time."""

from folovllm.config import EngineConfig
from folovllm.entrypoints.llm import LLM
from folovllm.engine.llm_engine import LLMEngine
from folovllm.outputs import CompletionOutput, RequestOutput
from folovllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "RequestOutputKind"]
