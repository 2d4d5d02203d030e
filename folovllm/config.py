"""`EngineConfig`: every flag and size of the engine in one frozen, validated dataclass.

Each optimisation stage of folovllm is one flag here. `EngineConfig.for_stage(n)` turns the
stages on cumulatively (stage 2 = stage 1 + continuous batching, ...), and each flag can still be
set on its own for ablations. A stage that is off is never an `if flag:` spread through the code:
the engine picks a do-nothing or simpler object with the same interface once, at start-up
(see `LLMEngine.__init__`).

Stages and their flags::

    01 naive generation      (always on: the baseline)
    02 continuous batching   enable_continuous_batching
    03 paged KV cache        enable_paged_kv
    04 FlashAttention        attention_backend != "naive" ("auto" = triton on CUDA; on CPU
                             cpu_attn with our compiled kernels, else sdpa)
    05 chunked prefill       enable_chunked_prefill (+ long_prefill_token_threshold)
    06 prefix caching        enable_prefix_caching    (needs enable_paged_kv)

The ladder is 01-06: each stage one more flag, `for_stage(n)` all of them up to n. Stages 07
and 08 are built, but they are axes beside the ladder, not rungs on it, and `for_stage` says so
rather than returning stage 06's engine under another number:

    07 GPTQ                  a GPTQ checkpoint's 4-bit weights, at any stage (quantization:
                             None = the checkpoint's quantization_config, as vLLM; "gptq"
                             insists on it)
    08 tensor parallel       tensor_parallel_size > 1, at any stage
    09 speculative decoding  speculative_config (n-gram or draft model), at any stage from 02
    10 structured outputs    per request (SamplingParams.structured_outputs), at any stage;
                             structured_outputs_backend picks the compiler
    11 multi-LoRA            enable_lora (max_loras, max_lora_rank, max_cpu_loras), at any
                             stage from 02; a LoRARequest per prompt

Beside them, not stages either: `custom_ops` (our compiled CPU kernels and packed weights,
model_executor/custom_op.py; "auto" turns them on at every stage, like the dtype: the ladder's
measured gains compare stages with the same setting) and `trace` (the step trace).
`describe_engine` says in one line what an engine actually runs: the stage, the axes, the
kernels.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from folovllm import envs
from folovllm.model_executor.attention_backends import ATTENTION_BACKENDS, default_backend
from folovllm.spec_decode.config import SpeculativeConfig

# The top of the ladder of cumulative stage flags: `for_stage(1..LATEST_STAGE)`, the default of
# `LLM` and of the CLI. `for_stage` refuses anything else with a clear message (the axes 07 and 08
# say how to turn them on; a stage not built yet says so) instead of silently running another.
LATEST_STAGE = 6
STAGE_NAMES = {
    1: "naive generation",
    2: "continuous batching",
    3: "paged KV cache",
    4: "FlashAttention",
    5: "chunked prefill",
    6: "prefix caching",
    7: "GPTQ",
    8: "tensor parallel",
    9: "speculative decoding",
    10: "structured outputs",
    11: "multi-LoRA",
}
# Built, but not rungs of the ladder: how to turn each one on.
AXES = {
    7: "quantization is a property of the checkpoint, as in vLLM: load a GPTQ checkpoint at any "
       "stage (quantization='gptq' refuses one that is not), e.g. LLM(gptq_checkpoint, stage=6)",
    8: "it composes with any stage, so pass tensor_parallel_size=N with the stage you want "
       "(e.g. for_stage(6, tensor_parallel_size=2))",
    9: "it composes with any stage from 02 on, so pass speculative_config with the stage you want "
       "(e.g. for_stage(6, speculative_config={'method': 'ngram', 'num_speculative_tokens': 3}))",
    10: "structured outputs are per request, at any stage: SamplingParams(structured_outputs="
        "StructuredOutputsParams(json=... | regex=... | choice=[...] | grammar=... | "
        "json_object=True)); the engine's structured_outputs_backend picks who compiles them "
        "('auto', 'folovllm' or 'xgrammar')",
    11: "it composes with any stage from 02: pass enable_lora=True (and max_loras, max_lora_rank, "
        "max_cpu_loras) with the stage you want, e.g. LLM(model, stage=6, enable_lora=True, "
        "max_loras=4), and a LoRARequest per prompt to generate(..., lora_request=...)",
}

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
DISTRIBUTED_EXECUTOR_BACKENDS = (None, "uni", "mp", "external_launcher")
# "auto" is stage 04's default, resolved per device by `attention_backends.default_backend`.
_ATTENTION_BACKEND_CHOICES = ("auto", *ATTENTION_BACKENDS)


@dataclass(frozen=True)
class EngineConfig:
    """All engine settings. Build it with `EngineConfig.for_stage(n, **overrides)`.

    Sizes:
        max_num_seqs: most requests in one batch (stage 01) or running at once (stage 02+).
        max_model_len: most tokens (prompt + output) in one sequence; None = the model's
            `max_position_embeddings`, filled in when the model is loaded.
        max_num_batched_tokens: most tokens computed in one engine step (stage 02+); None =
            `max(max_model_len, 2048)` (a prompt must fit in one step), or 2048 with chunked
            prefill (stage 05), filled in when the model is loaded.
        long_prefill_token_threshold: stage 05: most prompt tokens one request computes in a
            step, so several prompts progress together; 0 = no cap but the budget.
        kv_cache_memory: bytes of KV cache (stage 02 slots and stage 03 blocks are cut from it).
            None = on CUDA `gpu_memory_utilization` of the GPU minus the model's measured peak;
            on CPU enough for `max_num_seqs` full-length sequences, at most 4 GiB.
        block_size: tokens per KV block (stage 03).
        tensor_parallel_size: stage 08: ranks (worker processes) the model is split across;
            1 = the model runs in the engine's process. Not part of `for_stage`: it goes on top
            of any stage. `kv_cache_memory` is then per rank.
        distributed_executor_backend: stage 08: None/"mp" (spawned worker processes), "uni"
            (one rank, in process), "external_launcher" (ranks started by `torchrun`, on one
            node or several; rank 0 runs the engine).
    """

    # model
    dtype: str = "auto"  # "auto" = the checkpoint's dtype; or float32 / float16 / bfloat16
    device: str = "cpu"
    seed: int = 0
    # sizes
    max_num_seqs: int = 16
    max_model_len: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    kv_cache_memory: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    # stage flags
    enable_continuous_batching: bool = False  # stage 02
    enable_paged_kv: bool = False  # stage 03
    attention_backend: str = "naive"  # stage 04
    enable_chunked_prefill: bool = False  # stage 05
    long_prefill_token_threshold: int = 0  # stage 05: 0 = a chunk is capped by the budget only
    enable_prefix_caching: bool = False  # stage 06
    # stage 07, an axis. Quantization is a property of the checkpoint, as in vLLM: None loads
    # whatever its config.json says (4-bit GPTQ layers for a GPTQ checkpoint, at any stage);
    # "gptq" refuses a checkpoint that is not GPTQ (the worker passes it to `load_model`).
    quantization: Optional[str] = None
    tensor_parallel_size: int = 1  # stage 08, an axis
    # stage 08: who starts the ranks (vLLM's names). None: "uni" at tensor_parallel_size=1,
    # else "mp" (MultiprocExecutor spawns them on this machine); "external_launcher": torchrun
    # started them, on one machine or several (executor/external_launcher.py)
    distributed_executor_backend: Optional[str] = None
    # mixture of experts (docs/moe.md): vLLM's switch from slicing every expert across the
    # tensor-parallel ranks to giving each rank num_experts / tensor_parallel_size whole experts.
    enable_expert_parallel: bool = False
    # stage 09, an axis: draft tokens (n-gram lookup or a draft model) verified by the target,
    # `1 + k` tokens per decoding request per step. None = off. A dict is checked and turned
    # into a `SpeculativeConfig` (spec_decode/config.py) here.
    speculative_config: Optional[SpeculativeConfig] = None
    # observability, not a stage: `LLM` and `folovllm serve` attach a step tracer (folovllm/trace/)
    # to the engine's per-step record; the engine itself never reads this flag
    trace: bool = False
    # performance, not a stage: our compiled CPU kernels for RMSNorm, RoPE, SiLU-and-mul and
    # paged decode attention (model_executor/custom_op.py, csrc/cpu/). "all": use them (they
    # are built on first use), "none": the torch code only, "auto": "all" on a CPU where they
    # build, else "none". Every layer keeps its torch version as the reference.
    custom_ops: str = "auto"
    # performance, not a stage: each request's tokens and block ids are kept on the workers
    # and each step sends only what changed (worker/persistent_batch.py); False: the whole
    # `InputBatch` every step, the plain reference
    persistent_input_batch: bool = True
    # log-probabilities (docs/logprobs.md), vLLM's two settings: the most `logprobs` /
    # `prompt_logprobs` a request may ask for (-1 = no limit), and what they are computed from:
    # "raw_logprobs" (the model's, the default), "processed_logprobs" (after the sampler's
    # penalties, biases, temperature and top-k/top-p: the distribution the token was drawn
    # from), or the logits themselves ("raw_logits", "processed_logits")
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"
    # stage 11, an axis: multi-LoRA serving (folovllm/lora/). At most `max_loras` distinct
    # adapters run at once (the slots), each of rank <= `max_lora_rank` (the slots' padded
    # rank); `max_cpu_loras` adapters stay read on the CPU (None = max_loras), an LRU
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    # stage 10, beside the ladder: who compiles the requests' structured outputs (folovllm/
    # structured_output/). "folovllm": our regex -> DFA backend (regex, choice, a JSON-schema
    # subset); "xgrammar": the xgrammar package (everything); "auto": ours for what it
    # supports, xgrammar for the rest when installed
    structured_outputs_backend: str = "auto"
    # batch-invariant mode (folovllm/batch_invariant.py, docs/logprobs.md): a request's logits
    # and log-probabilities do not depend, bitwise, on the rest of the batch, the chunking, the
    # prefix cache or the thread count. CPU, our kernels (cpu_attn), one rank. Default: the
    # FOLOVLLM_BATCH_INVARIANT environment variable (vLLM's VLLM_BATCH_INVARIANT), else off.
    batch_invariant: bool = dataclasses.field(default_factory=envs.batch_invariant)

    def __post_init__(self) -> None:
        if self.speculative_config is not None:  # the dict form users write
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        self._validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def for_stage(cls, stage: int, **overrides: Any) -> "EngineConfig":
        """The config of stage `stage` with every earlier stage on; `overrides` win."""
        if not isinstance(stage, int) or isinstance(stage, bool) or stage not in STAGE_NAMES:
            raise ValueError(f"stage must be an integer in 1..{LATEST_STAGE}, got {stage!r}")
        if stage in AXES:
            raise ValueError(f"stage {stage} ({STAGE_NAMES[stage]}) is not a for_stage flag: {AXES[stage]}")
        if stage > LATEST_STAGE:
            raise ValueError(
                f"stage {stage} ({STAGE_NAMES[stage]}) is not built yet; "
                f"stages 1..{LATEST_STAGE} are available"
            )
        flags: dict[str, Any] = {
            "enable_continuous_batching": stage >= 2,
            "enable_paged_kv": stage >= 3,
            "attention_backend": "auto" if stage >= 4 else "naive",
            "enable_chunked_prefill": stage >= 5,
            "enable_prefix_caching": stage >= 6,
        }
        flags.update(overrides)
        return cls(**flags)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @property
    def stage(self) -> int:
        """The highest stage whose flag is on (flags can be mixed for ablations)."""
        if self.enable_prefix_caching:
            return 6
        if self.enable_chunked_prefill:
            return 5
        if self.attention_backend != "naive":
            return 4
        if self.enable_paged_kv:
            return 3
        return 2 if self.enable_continuous_batching else 1

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        """None for "auto" (resolved from the checkpoint by the loader)."""
        return None if self.dtype == "auto" else _DTYPES[self.dtype]

    # -- validation ---------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        try:
            device = torch.device(self.device) if isinstance(self.device, str) else None
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available here; use device='cpu'")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        _positive_int("max_num_seqs", self.max_num_seqs)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
            if self.max_num_batched_tokens < self.max_num_seqs:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                    f"max_num_seqs ({self.max_num_seqs}): every running request decodes one "
                    "token per step"
                )
        if self.attention_backend not in _ATTENTION_BACKEND_CHOICES:
            raise ValueError(
                f"attention_backend must be one of {_ATTENTION_BACKEND_CHOICES}, got {self.attention_backend!r}"
            )
        on_cuda = torch.device(self.device).type == "cuda"
        if self.attention_backend == "flash_attn" and not on_cuda:
            raise ValueError("attention_backend='flash_attn' needs device='cuda'")
        if self.attention_backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "attention_backend='triton' needs device='cuda' (or TRITON_INTERPRET=1 to run the "
                "kernels in Triton's CPU interpreter, slowly, as the tests do)"
            )
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel must be true or false, got {self.enable_expert_parallel!r}")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {DISTRIBUTED_EXECUTOR_BACKENDS}, "
                f"got {self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs the model in this process only, but "
                f"tensor_parallel_size={self.tensor_parallel_size}: use 'mp' or 'external_launcher'")
        # Under torchrun the ranks span nodes: each node's GPUs are checked there (LOCAL_RANK).
        if on_cuda and self.distributed_executor_backend != "external_launcher" and \
                self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs one GPU per rank, but "
                f"{torch.cuda.device_count()} are visible"
            )
        if self.kv_cache_memory is not None:
            _positive_int("kv_cache_memory", self.kv_cache_memory)
        _positive_int("block_size", self.block_size)
        utilization = self.gpu_memory_utilization
        if not isinstance(utilization, (int, float)) or isinstance(utilization, bool) or not 0 < utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        for flag in ("enable_continuous_batching", "enable_paged_kv", "enable_chunked_prefill",
                     "enable_prefix_caching"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.enable_paged_kv and not self.enable_continuous_batching:
            raise ValueError(
                "enable_paged_kv=True needs enable_continuous_batching=True: the paged cache "
                "hands out blocks per step, which only the continuous scheduler does"
            )
        if not isinstance(self.long_prefill_token_threshold, int) or isinstance(
            self.long_prefill_token_threshold, bool
        ) or self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be an integer >= 0 (0 = no cap), got "
                f"{self.long_prefill_token_threshold!r}"
            )
        if self.enable_chunked_prefill and not self.enable_continuous_batching:
            raise ValueError(
                "enable_chunked_prefill=True needs enable_continuous_batching=True: chunks of a "
                "prompt join the running batch step by step, which a static batch cannot do"
            )
        if self.enable_prefix_caching and not self.enable_paged_kv:
            raise ValueError(
                "prefix caching needs enable_paged_kv=True: it shares and finds KV by block "
                "(full blocks of block_size tokens), which only the paged cache has"
            )
        if self.speculative_config is not None and not self.enable_continuous_batching:
            raise ValueError(
                "speculative_config needs enable_continuous_batching=True (stage 2 or later): a "
                "request's accepted drafts move it ahead of the others, which a static batch "
                "(stage 1) cannot do"
            )
        if self.custom_ops not in ("auto", "all", "none"):
            raise ValueError(f"custom_ops must be 'auto', 'all' or 'none', got {self.custom_ops!r}")
        if on_cuda and (self.custom_ops == "all" or self.attention_backend == "cpu_attn"):
            raise ValueError(
                "custom_ops='all' and attention_backend='cpu_attn' are CPU kernels; on "
                "device='cuda' use custom_ops='auto' or 'none' and another backend"
            )
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer >= 0, or -1 for no limit, got {self.max_logprobs!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        self._validate_lora()
        if self.structured_outputs_backend not in ("auto", "folovllm", "xgrammar"):
            raise ValueError("structured_outputs_backend must be 'auto', 'folovllm' or 'xgrammar', "
                             f"got {self.structured_outputs_backend!r}")
        if self.batch_invariant:
            from folovllm.batch_invariant import verify_batch_invariant_config

            verify_batch_invariant_config(self)
        if self.quantization not in (None, "gptq", "compressed-tensors"):
            raise ValueError(
                "quantization must be None (the checkpoint's own), 'gptq' or 'compressed-tensors', "
                f"got {self.quantization!r}"
            )

    def _validate_lora(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora must be True or False, got {self.enable_lora!r}")
        _positive_int("max_loras", self.max_loras)
        _positive_int("max_lora_rank", self.max_lora_rank)
        if self.max_cpu_loras is not None:
            _positive_int("max_cpu_loras", self.max_cpu_loras)
            if self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                                 f"({self.max_loras}): every adapter in a slot is also kept on the CPU")
        if not self.enable_lora:
            return
        if not self.enable_continuous_batching:
            raise ValueError("enable_lora=True needs enable_continuous_batching=True (stage 02 or "
                             "later): the adapters of a static batch cannot change as it runs")
        if getattr(self, "speculative_config", None) is not None:
            raise ValueError("enable_lora=True with a speculative_config is not supported: the "
                             "draft model would run without the target's adapters")

    def resolve(self, max_position_embeddings: int) -> "EngineConfig":
        """Fill the sizes left as None from the model, and check them against it."""
        max_model_len = self.max_model_len or max_position_embeddings
        if max_model_len > max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's "
                f"max_position_embeddings ({max_position_embeddings})"
            )
        default_budget = 2048 if self.enable_chunked_prefill else max(max_model_len, 2048)
        budget = self.max_num_batched_tokens or default_budget
        if self.enable_paged_kv and not self.enable_chunked_prefill and budget < max_model_len:
            # A preempted request is recomputed in one step: prompt and output together.
            raise ValueError(
                f"with paged KV (preemption by recompute), max_num_batched_tokens ({budget}) "
                f"must be >= max_model_len ({max_model_len}), or turn on enable_chunked_prefill "
                "(stage 5) to compute it over several steps"
            )
        custom_ops = self._resolve_custom_ops()
        backend = self.attention_backend
        if backend == "auto":
            backend = default_backend(self.device, custom_ops)
        return self.replace(
            max_model_len=max_model_len, max_num_batched_tokens=budget, attention_backend=backend,
            custom_ops=custom_ops,
        )

    def _resolve_custom_ops(self) -> str:
        """"all" or "none". The kernels are built (on first use) when something asks for them:
        required by custom_ops="all" or attention_backend="cpu_attn" (an error if they cannot
        be built), wanted by "auto" on a CPU (a warning and the torch code if they cannot)."""
        from folovllm._custom_ops import load_ops

        required = self.custom_ops == "all" or self.attention_backend == "cpu_attn" or self.batch_invariant
        wanted = self.custom_ops == "all" or self.batch_invariant or (
            self.custom_ops == "auto" and torch.device(self.device).type == "cpu")
        if not (required or wanted):
            return "none"
        try:
            load_ops()
        except RuntimeError as e:
            if required:
                raise ValueError(str(e)) from e
            logger.warning("%s Falling back to the torch code (custom_ops='none').", e)
            return "none"
        return "all" if wanted else "none"


# --8<-- [start:describe_engine]
def describe_engine(config: "EngineConfig", hf_config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """What an engine actually runs, for the start-up line, the trace, the live page and
    `/metrics`: the ladder's stage (the highest flag on) with the flags below it that are off
    (an ablation), and the axes beside the ladder: the checkpoint's quantization, the tensor-
    parallel size, the attention backend, the CPU kernels, the weights' dtype. `config` is
    resolved.

    `summary` reads e.g. "stage 06 prefix caching + GPTQ 4-bit, attention cpu_attn, CPU kernels
    (avx512), float32".
    """
    flags = {2: config.enable_continuous_batching, 3: config.enable_paged_kv,
             4: config.attention_backend != "naive", 5: config.enable_chunked_prefill,
             6: config.enable_prefix_caching}
    stage = config.stage
    off = [s for s, on in flags.items() if s < stage and not on]
    quant = getattr(hf_config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict()
    bits = quant.get("bits", "?")
    for group in (quant.get("config_groups") or {}).values():  # compressed-tensors: per config group
        bits = (group.get("weights") or {}).get("num_bits", bits)
    quantization = f"{quant.get('quant_method', '?').upper()} {bits}-bit" if quant else None
    kernels = "off"
    if config.custom_ops == "all":
        from folovllm.platforms.cpu import kernel_isa

        kernels = kernel_isa()
    dtype_name = str(dtype).replace("torch.", "")
    parts = [f"stage {stage:02d} {STAGE_NAMES[stage]}"]
    if off:
        parts[0] += " without " + ", ".join(f"{s:02d}" for s in off)
    if quantization:
        parts[0] += f" + {quantization}"
    if config.tensor_parallel_size > 1:
        parts[0] += f" + tensor parallel x{config.tensor_parallel_size}"
        if config.enable_expert_parallel:
            parts[0] += " (experts: expert parallel)"
    if config.enable_lora:
        parts[0] += f" + LoRA (max_loras={config.max_loras})"
    spec = config.speculative_config
    if spec is not None:
        parts[0] += f" + {spec.describe()}"
    parts += [f"attention {config.attention_backend}" + (" (batch-invariant)" if config.batch_invariant else ""),
              f"CPU kernels ({kernels})" if kernels != "off" else "CPU kernels off", dtype_name]
    return dict(stage=stage, stage_name=STAGE_NAMES[stage], stages_off=off,
                quantization=quantization, tensor_parallel_size=config.tensor_parallel_size,
                attention_backend=config.attention_backend, cpu_kernels=kernels, dtype=dtype_name,
                speculative=None if spec is None else spec.describe(),
                batch_invariant=config.batch_invariant, summary=", ".join(parts))
# --8<-- [end:describe_engine]


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def verify_tensor_parallel(hf_config: Any, tensor_parallel_size: int, enable_expert_parallel: bool = False) -> None:
    """Refuse a split the model's shapes do not allow (vLLM's `verify_with_parallel_config`):
    every rank needs whole query heads and an equal share of the MLP; key/value heads are split
    when there are at least as many as ranks and replicated when there are fewer. A MoE's
    experts are split by their intermediate dimension, or with `enable_expert_parallel` handed
    out whole, the same number to each rank."""
    tp = tensor_parallel_size
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's {heads} attention heads"
        )
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} and the model's {kv_heads} key/value heads: one must "
            "divide the other (kv heads are split across ranks, or replicated when fewer)"
        )
    if hf_config.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's intermediate_size "
            f"({hf_config.intermediate_size})"
        )
    num_experts = getattr(hf_config, "num_experts", None)
    if enable_expert_parallel and num_experts:  # MoE with EP: whole experts per rank
        if num_experts % tp:
            raise ValueError(
                f"enable_expert_parallel=True with tensor_parallel_size={tp}: each rank holds "
                f"num_experts / {tp} whole experts, but the model's num_experts={num_experts} does "
                f"not divide by {tp}; pick a tensor_parallel_size that divides it, or leave "
                "enable_expert_parallel off (each rank then holds a slice of every expert)")
        return
    moe_inter = getattr(hf_config, "moe_intermediate_size", None)  # MoE: each expert is split
    if moe_inter and moe_inter % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the model's moe_intermediate_size ({moe_inter})")
