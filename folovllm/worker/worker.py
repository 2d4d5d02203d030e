"""`Worker`: one rank's share of the model, its KV cache and its model runner (vLLM's
`Worker` in `v1/worker/gpu_worker.py`).

    UniProcExecutor   one Worker in the engine's process (tensor_parallel_size = 1)
    MultiprocExecutor one Worker per rank, each in its own process; the ranks run the same step
                      on their own slices and meet in the collectives of `parallel_state`

A worker is built after its process joined the tensor-parallel group, so the layers it builds
read the right rank and size and load only their slices of the checkpoint. Every method here is
something an executor calls on all ranks at once (`collective_rpc`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from folovllm.batch_invariant import batch_invariance
from folovllm.config import EngineConfig
from folovllm.distributed import parallel_state
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec
from folovllm.model_executor.attention_backends import get_attn_backend
from folovllm.model_executor.custom_op import set_custom_ops
from folovllm.model_executor.layers import cpu_gemm
from folovllm.model_executor.layers.cpu_gemm import weight_packing
from folovllm.model_executor.layers.fused_moe import ExpertLoadRecorder
from folovllm.model_executor.model_loader import load_model
from folovllm.platforms import cpu as cpu_platform
from folovllm.worker.persistent_batch import StepBatch
from folovllm.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from folovllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        self.config = config
        # custom_ops="all" (the CPU fast path) also stores the plain linear weights in oneDNN's
        # layout, as each layer finishes loading (layers/cpu_gemm.py)
        # enable_expert_parallel: each rank builds num_experts / tp whole experts (layers/fused_moe.py)
        with weight_packing(config.custom_ops == "all"), parallel_state.expert_parallel(config.enable_expert_parallel):
            self.model, self.hf_config, _ = load_model(str(model_path), config.torch_dtype, config.device,
                                                        quantization=config.quantization)
        set_custom_ops(self.model, config.custom_ops)  # resolved: "all" or "none"
        if torch.device(config.device).type == "cpu" and parallel_state.get_tensor_model_parallel_rank() == 0:
            cpu_platform.check_isa_override()
            logger.info("%s; custom_ops=%s", cpu_platform.describe(), config.custom_ops)
        # batch_invariant=True swaps in the kernels whose order ignores the batch (batch_invariant.py)
        backend = batch_invariance(config).attention_backend(get_attn_backend(config.attention_backend))
        self.model_runner = ModelRunner(self.model, config.device, backend)
        # MoE: tokens routed to each expert, returned with each step's logits (dense: nothing)
        self.expert_load = ExpertLoadRecorder.for_model(self.model)
        if config.enable_lora:  # stage 11: the LoRA wrappers go around the projections
            from folovllm.lora.worker_manager import WorkerLoRAManager

            self.model_runner.lora_manager = WorkerLoRAManager(self.model, config)

    def kv_cache_spec(self) -> KVCacheSpec:
        """One token's K/V on this rank: this rank's kv heads only."""
        attn = self.model.model.layers[0].self_attn
        return KVCacheSpec(
            num_layers=self.hf_config.num_hidden_layers,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            dtype=next(self.model.parameters()).dtype,
            device=self.config.device,
        )

    def determine_available_memory(self, spec: KVCacheSpec) -> int:
        budget = self.model_runner.determine_available_memory(self.config, spec)
        self.expert_load.take()  # CUDA's profiling pass routed dummy tokens: not a step's
        return budget

    def initialize_kv_cache(self, spec: KVCacheSpec, kv_cache_config: KVCacheConfig) -> None:
        self.model_runner.initialize_kv_cache(spec, kv_cache_config)

    def execute_model(self, batch: StepBatch) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Run the step on this rank's shard -> (logits, expert load): rank 0 returns the logits
        of the rows that sample (the engine samples them), the other ranks None; a MoE model
        also the tokens routed to each expert of each MoE layer ([L, E] int64, CPU), a dense
        one None."""
        logits = self.model_runner.execute_model(batch)
        return logits, self.expert_load.take()

    def add_lora(self, lora_request: "LoRARequest") -> None:
        """Stage 11: read and check an adapter into the CPU cache (ValueError if it is bad)."""
        self.model_runner.lora_manager.add_adapter(lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        self.model_runner.lora_manager.remove_adapter(lora_int_id)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """This rank's parameter shapes, by name (what the docs' shard table says)."""
        return {name: cpu_gemm.logical_shape(p) for name, p in self.model.named_parameters()}  # not the panels

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def comm_stats(self, reset: bool = False) -> parallel_state.CommStats:
        return parallel_state.comm_stats(reset)
