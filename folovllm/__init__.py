"""folovllm: a small LLM inference engine in the vLLM family, built one optimisation at a time."""

# Before anything imports torch: FOLOVLLM_CPU_ISA=avx2 caps oneDNN and ATen, which read their
# caps once, and oneDNN's caches of compiled matmuls get their bound (folovllm/envs.py);
# folovllm's log lines get their handler (folovllm/logger.py).
from folovllm import envs as _envs

_envs.apply_cpu_isa()
_envs.apply_onednn_cache_capacity()

from folovllm.logger import configure_root_logger as _configure_root_logger  # noqa: E402

_configure_root_logger()

from folovllm.config import EngineConfig  # noqa: E402
from folovllm.entrypoints.llm import LLM  # noqa: E402
from folovllm.engine.llm_engine import LLMEngine  # noqa: E402
from folovllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from folovllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "RequestOutputKind",
           "StructuredOutputsParams"]
