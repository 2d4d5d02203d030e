"""`ModelRunner`: turn one step's `InputBatch` into model inputs, run the model, return the
logits of the rows that sample.

For every row it lays out the row's new tokens, their positions and the cache slots their K/V go
to, then packs all rows into one flat batch of T tokens::

    row a: computes tokens 0..2 (prefill)  row b: computes token 8 (decode)
    input_ids     [a0 a1 a2 b8]
    positions     [ 0  1  2  8]
    slot_mapping  [block_a*bs+0, +1, +2, block_b*bs+8]       (contiguous cache: one block a row)
    query_start_loc [0, 3, 4]   seq_lens [3, 9]
    logits rows   [2, 3]        (the last new token of each row that caught up)

A row verifying k drafts (stage 09) feeds its last committed token and the drafts, and returns
the logits of all 1 + k of them, in order (`InputBatch.num_draft_tokens`)::

    row b: decode with drafts d1 d2       input_ids [a0 a1 a2 b8 d1 d2]
    logits rows   [2, 3, 4, 5]            b's 3 positions: after b8, after d1, after d2

Only the rows that sample (`InputBatch.sampling_rows`, which is `SchedulerOutput.sampling_rows`)
go through the LM head; the engine samples their logits. A row that computes part of a prompt
has no next token yet and draws no random numbers. A request that asks for prompt
log-probabilities adds the prompt positions of its rows (`InputBatch.prompt_logits`) after
them::

    row a (prompt_logprobs, whole prompt of 3) and row b (decode)
    logits rows   [2, 3, 0, 1]   = a's last, b's last | a's positions 0 and 1 (they score a1, a2)

A row with `query_lens` longer than its tokens (stage 01 pads every prompt to the longest of its
batch) is filled with dummy tokens at the following positions: the model computes them and
nobody reads them.

`prepare_inputs` and `build_metadata` below are the plain version, row by row. Each step runs
the same numbers in bulk instead: `InputBuffers.prepare_inputs` (input_buffers.py) fills
preallocated host tensors in place with numpy, with no Python loop over tokens and no tensor
allocated per step (the Python floor of a decode step, docs/performance.md); tests compare the
two on random batches. With the persistent input batch (the default) a step arrives as an
`InputBatchDiff`: the runner patches its `PersistentInputBatch` and gathers the step's token
ids and block tables from it (`InputBuffers.prepare_inputs_from_table`, persistent_batch.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec
from folovllm.model_executor.layers.attention import (
    Attention, AttentionBackend, AttentionMetadata, NaiveAttentionBackend)
from folovllm.config import EngineConfig
from folovllm.lora.worker_manager import NoWorkerLoRAManager
from folovllm.worker.input_batch import InputBatch
from folovllm.worker.input_buffers import PAD_TOKEN_ID, InputBuffers
from folovllm.worker.persistent_batch import InputBatchDiff, PersistentInputBatch, StepBatch
from folovllm.worker.kv_cache import KVCache, cpu_default_kv_cache_memory


class ModelRunner:
    def __init__(self, model: nn.Module, device: str, attn_backend: AttentionBackend | None = None) -> None:
        self.model = model
        self.device = device
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.attn_backend = attn_backend or NaiveAttentionBackend()
        for layer in self.attn_layers:
            layer.backend = self.attn_backend

        self.kv_cache: KVCache | None = None
        # the host tensors each step's inputs are written into (sized by the KV cache's blocks)
        self.input_buffers: InputBuffers | None = None
        # the requests' tokens and block ids, patched by each step's InputBatchDiff
        self.persistent_batch = PersistentInputBatch()
        # stage 11: fills LoRA slots and lays out each step's adapters (the worker installs the
        # real one with enable_lora; this one does nothing)
        self.lora_manager = NoWorkerLoRAManager()

    def initialize_kv_cache(self, spec: KVCacheSpec, kv_cache_config: KVCacheConfig) -> None:
        """Allocate the KV tensors once and give each attention layer its layer of them."""
        self.kv_cache = KVCache(spec, kv_cache_config)
        self._bind(self.kv_cache)
        self.input_buffers = InputBuffers(kv_cache_config.block_size, self.device)

    def _bind(self, kv_cache: KVCache) -> None:
        for layer, k, v in zip(self.attn_layers, kv_cache.key_caches, kv_cache.value_caches):
            layer.kv_cache = (k, v)

    # --8<-- [start:execute_model]
    @torch.inference_mode()
    def execute_model(self, batch: StepBatch) -> Optional[torch.Tensor]:
        """Run the model on one step -> float32 logits [S + P, vocab]: the S rows that sample,
        in `batch.sampling_rows` order, then the P prompt positions of `batch.prompt_logits`;
        None when there are none, and on tensor-parallel ranks other than 0 (the LM head
        gathers the vocabulary on rank 0)."""
        assert self.kv_cache is not None and self.input_buffers is not None, "initialize_kv_cache() first"
        # prepare_inputs + build_metadata below, in bulk into preallocated tensors; a diff
        # (persistent_input_batch) patches this runner's table first and gathers from it
        if isinstance(batch, InputBatchDiff):
            self.persistent_batch.apply(batch)
            inputs = self.input_buffers.prepare_inputs_from_table(self.persistent_batch, batch)
        else:
            inputs = self.input_buffers.prepare_inputs(batch)
        input_ids, positions, logits_indices = inputs.input_ids, inputs.positions, inputs.logits_indices
        self.lora_manager.set_active_adapters(batch)
        md = self.attn_backend.build_metadata(inputs.attn_metadata, self.kv_cache.key_caches[0])
        hidden = self.model(input_ids, positions, md)  # [T, hidden]
        if logits_indices.shape[0] == 0:  # the same on every rank: all skip the LM head's gather
            return None
        if not inputs.logits_of_every_token:
            hidden = hidden[logits_indices]  # [S + P, hidden]
        return self.model.compute_logits(hidden)  # [S + P, vocab]
    # --8<-- [end:execute_model]

    # --8<-- [start:determine_available_memory]
    def determine_available_memory(self, config: EngineConfig, spec: KVCacheSpec) -> int:
        """Bytes of KV cache when `kv_cache_memory` is not given. On CUDA:
        `gpu_memory_utilization` of the GPU minus the peak memory of one full-size forward pass
        (weights + activations), measured. On CPU: room for `max_num_seqs` sequences of
        `max_model_len` tokens, at most 4 GiB."""
        if torch.device(config.device).type != "cuda":
            return cpu_default_kv_cache_memory(config, spec)
        peak = self.profile_peak_memory(config.max_num_batched_tokens, spec)
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        budget = int(total * config.gpu_memory_utilization) - peak
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache: the model's peak is {peak / 2**30:.2f} GiB "
                f"of {total * config.gpu_memory_utilization / 2**30:.2f} GiB allowed by "
                f"gpu_memory_utilization={config.gpu_memory_utilization}"
            )
        return budget
    # --8<-- [end:determine_available_memory]

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, spec: KVCacheSpec) -> int:
        """CUDA: peak bytes allocated by a forward pass over `num_tokens` tokens (one sequence,
        with a throw-away cache of that length), the weights included. What the GPU has left
        is for the KV cache."""
        torch.cuda.reset_peak_memory_stats()
        try:
            scratch = KVCache(spec, KVCacheConfig(num_blocks=1, block_size=num_tokens))
            self._bind(scratch)
            positions = torch.arange(num_tokens, device=self.device)
            common = AttentionMetadata.from_lists([num_tokens], [num_tokens], [[0]], positions, num_tokens)
            md = self.attn_backend.build_metadata(common, scratch.key_caches[0])
            hidden = self.model(torch.zeros_like(positions), positions, md)
            self.model.compute_logits(hidden[-1:])
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as e:
            raise ValueError(
                f"a forward pass over max_num_batched_tokens={num_tokens} tokens does not fit on "
                "the GPU; lower max_num_batched_tokens / max_model_len"
            ) from e
        finally:
            scratch = hidden = None  # noqa: F841
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated()

    # --8<-- [start:prepare_inputs]
    def prepare_inputs(self, batch: InputBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input_ids [T], positions [T], logits_indices [S + P]: where the last token of
        each row that samples sits in the flat batch (a row that samples ends at its request's
        last token; stage 01's padding comes after it; with drafts, stage 09, its last 1 + k
        tokens), then the first tokens of the rows in `batch.prompt_logits` (real tokens only:
        padding never reaches the LM head)."""
        input_ids: list[int] = []
        positions: list[int] = []
        first_token: list[int] = []  # flat index of each row's first token
        for tokens, start, query_len in zip(batch.token_ids, batch.num_computed_tokens, batch.query_lens):
            first_token.append(len(input_ids))
            input_ids += tokens + [PAD_TOKEN_ID] * (query_len - len(tokens))
            positions += range(start, start + query_len)
        logits_indices = []
        for row in batch.sampling_rows:
            end = first_token[row] + len(batch.token_ids[row])  # one past the row's last real token
            logits_indices += range(end - batch.num_logits(row), end)
        for row, count in sorted(batch.prompt_logits.items()):
            logits_indices += range(first_token[row], first_token[row] + count)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(input_ids), as_tensor(positions), as_tensor(logits_indices)
    # --8<-- [end:prepare_inputs]

    def build_metadata(
        self, output: InputBatch, positions: torch.Tensor, block_size: int
    ) -> AttentionMetadata:
        """The step's attention metadata, once for every layer: the common part from the rows'
        host lists, then what the backend derives from it (`AttentionBackend.build_metadata`)."""
        assert self.kv_cache is not None, "initialize_kv_cache() first"
        query_lens = [output.query_len(row) for row in range(output.num_rows)]
        seq_lens = [start + q for start, q in zip(output.num_computed_tokens, query_lens)]
        common = AttentionMetadata.from_lists(query_lens, seq_lens, output.block_tables, positions, block_size)
        return self.attn_backend.build_metadata(common, self.kv_cache.key_caches[0])
