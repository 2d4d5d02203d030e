"""`ModelRunner`: turn one `SchedulerOutput` into model inputs, run the model, sample.

For every row it lays out the row's new tokens, their positions and the cache slots their K/V go
to, then packs all rows into one flat batch of T tokens::

    row a: computes tokens 0..2 (prefill)  row b: computes token 8 (decode)
    input_ids     [a0 a1 a2 b8]
    positions     [ 0  1  2  8]
    slot_mapping  [block_a*bs+0, +1, +2, block_b*bs+8]       (contiguous cache: one block a row)
    query_start_loc [0, 3, 4]   seq_lens [3, 9]
    logits rows   [2, 3]        (the last new token of each row that caught up)

With `pad_to` (stage 01) each row is padded with dummy tokens at the following positions, so every
row has the same length: the model computes them and nobody reads them.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from folovllm.worker.kv_cache import KVCache, KVCacheSpec
from folovllm.model_executor.layers.attention import Attention, AttentionBackend, AttentionMetadata
from folovllm.core.request import Request
from folovllm.worker.sampler import Sampler
from folovllm.core.scheduler import SchedulerOutput

PAD_TOKEN_ID = 0  # any valid id: padded tokens are computed and thrown away


class KVCacheLookup(Protocol):
    """What the runner needs from any stage's KV cache manager."""

    kv_cache: KVCache | None

    @property
    def num_reserved_tokens(self) -> int: ...

    def get_block_table(self, request: Request) -> list[int]: ...


class ModelRunner:
    def __init__(self, model: nn.Module, sampler: Sampler, device: str,
                 attn_backend: AttentionBackend | None = None) -> None:
        self.model = model
        self.sampler = sampler
        self.device = device
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        if attn_backend is not None:
            for layer in self.attn_layers:
                layer.backend = attn_backend

        self._bound_cache: KVCache | None = None

    def bind_kv_cache(self, kv_cache: KVCache) -> None:
        """Give each attention layer its layer of the cache (stage 01 makes one per batch)."""
        if kv_cache is self._bound_cache:
            return
        for layer, k, v in zip(self.attn_layers, kv_cache.key_caches, kv_cache.value_caches):
            layer.kv_cache = (k, v)
        self._bound_cache = kv_cache

    @torch.inference_mode()
    def execute_model(self, output: SchedulerOutput, kv_cache_manager: KVCacheLookup) -> list[int]:
        """Run one step; returns one sampled token per row (meaningful only for rows that
        caught up with their `num_tokens` this step)."""
        kv_cache = kv_cache_manager.kv_cache
        assert kv_cache is not None
        self.bind_kv_cache(kv_cache)
        input_ids, positions, logits_indices = self.prepare_inputs(output)
        md = self.build_metadata(output, positions, kv_cache.block_size, kv_cache_manager.get_block_table)
        hidden = self.model(input_ids, positions, md)  # [T, hidden]
        logits = self.model.compute_logits(hidden[logits_indices])  # [B, vocab]
        return self.sampler(logits, output.requests)

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, spec: KVCacheSpec) -> int:
        """CUDA: peak bytes allocated by a forward pass over `num_tokens` tokens (one sequence,
        with a throw-away cache of that length), the weights included. What the GPU has left
        is for the KV cache."""
        torch.cuda.reset_peak_memory_stats()
        try:
            scratch = KVCache(spec, num_blocks=1, block_size=num_tokens)
            self.bind_kv_cache(scratch)
            positions = torch.arange(num_tokens, device=self.device)
            md = AttentionMetadata(
                slot_mapping=positions,
                query_start_loc=torch.tensor([0, num_tokens], device=self.device),
                seq_lens=torch.tensor([num_tokens], device=self.device),
                block_tables=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                max_query_len=num_tokens,
                max_seq_len=num_tokens,
            )
            hidden = self.model(torch.zeros_like(positions), positions, md)
            self.model.compute_logits(hidden[-1:])
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as e:
            raise ValueError(
                f"a forward pass over max_num_batched_tokens={num_tokens} tokens does not fit on "
                "the GPU; lower max_num_batched_tokens / max_model_len"
            ) from e
        finally:
            self._bound_cache = None
            scratch = hidden = None  # noqa: F841
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated()

    # --8<-- [start:prepare_inputs]
    def prepare_inputs(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        for request, num_new in zip(output.requests, output.num_new_tokens):
            start = first_new_position(request)
            length = output.pad_to or num_new
            tokens = request.all_token_ids[start : start + num_new]
            logits_indices.append(len(input_ids) + num_new - 1)
            input_ids += tokens + [PAD_TOKEN_ID] * (length - num_new)
            positions += range(start, start + length)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(input_ids), as_tensor(positions), as_tensor(logits_indices)
    # --8<-- [end:prepare_inputs]

    def build_metadata(
        self,
        output: SchedulerOutput,
        positions: torch.Tensor,
        block_size: int,
        get_block_table: Callable[[Request], list[int]],
    ) -> AttentionMetadata:
        query_lens = [output.pad_to or n for n in output.num_new_tokens]
        seq_lens = [first_new_position(r) + q for r, q in zip(output.requests, query_lens)]
        tables = [get_block_table(r) for r in output.requests]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=self.device
        )  # [B, max_blocks]
        query_lens_t = torch.tensor(query_lens, dtype=torch.long, device=self.device)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.long, device=self.device)
        torch.cumsum(query_lens_t, 0, out=query_start_loc[1:])
        # Which row each token belongs to, then its slot through that row's block table.
        row = torch.repeat_interleave(torch.arange(len(query_lens), device=self.device), query_lens_t)
        slot_mapping = block_tables[row, positions // block_size] * block_size + positions % block_size
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=self.device),
            block_tables=block_tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )


def first_new_position(request: Request) -> int:
    """Where this step's tokens start. A finished request that still holds a row in a static
    batch (stage 01) recomputes its last computed token: wasted work that changes nothing."""
    if request.is_finished:
        return request.num_computed_tokens - 1
    return request.num_computed_tokens
