"""The token embedding and the LM head, split along the vocabulary across tensor-parallel ranks
(vLLM's `VocabParallelEmbedding` and `ParallelLMHead`, stage 08).

Both hold the same [V, hidden] matrix (tied in Qwen3-0.6B), 16% of Qwen3-0.6B's weights, so
replicating them would waste much of what tensor parallelism saves. Rank r keeps rows
[r * Vp, (r+1) * Vp) with Vp = ceil(V / tp); the last rank's rows past V are zero padding::

    V = 10, tp = 2:   rank 0: tokens 0..4        rank 1: tokens 5..9

    embedding (ids -> [T, hidden]):  each rank looks up the ids it owns, writes zeros for the
        others, and an all-reduce sums the ranks: exactly one rank contributed each row.
    LM head ([N, hidden] -> [N, V]):  each rank computes the logits of its own tokens,
        [N, Vp], and a gather concatenates them on rank 0, which samples.

With one rank (no stage 08) both are a plain `nn.Embedding` lookup and `nn.Linear` matmul.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
)
from folovllm.model_executor.layers.cpu_gemm import dense_linear, pack_linear_weight
from folovllm.model_executor.layers.linear import WeightShapeError, default_weight_loader, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    """`nn.Embedding(num_embeddings, embedding_dim)` whose rows are split across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_size = get_tensor_model_parallel_world_size()
        tp_rank = get_tensor_model_parallel_rank()
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start_index = tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype or torch.get_default_dtype()),
            requires_grad=False,
        )  # [Vp, hidden]
        set_weight_attrs(self.weight, output_dim=0, weight_loader=self.weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's rows of the checkpoint's [V, hidden]; zero the padding rows."""
        if self.tp_size == 1:
            default_weight_loader(param, loaded_weight)
            return
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise WeightShapeError(tuple(loaded_weight.shape), (self.num_embeddings, self.embedding_dim))
        n = self.vocab_end_index - self.vocab_start_index
        param.data[:n].copy_(loaded_weight[self.vocab_start_index : self.vocab_end_index])
        param.data[n:].zero_()

    # --8<-- [start:embedding_forward]
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)  # [T]
        local_ids = (input_ids - self.vocab_start_index) * mine  # other ranks' ids -> row 0
        h = F.embedding(local_ids, self.weight)  # [T, hidden]
        h.masked_fill_(~mine[:, None], 0.0)  # ... whose lookup is then zeroed
        return tensor_model_parallel_all_reduce(h)  # exactly one rank wrote each row
    # --8<-- [end:embedding_forward]

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"rows=[{self.vocab_start_index}, {self.vocab_end_index}), tp_size={self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection [hidden] -> [V], split like the embedding, so the two can share one
    tensor when the checkpoint ties them (`tie_weights`)."""

    def process_weights_after_loading(self) -> None:
        """On CPU with weight packing on, a packed copy for the matmul (`cpu_gemm.py`); a tied
        embedding keeps the plain rows its lookup needs (vocab x hidden more bytes, as vLLM)."""
        pack_linear_weight(self)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> None:
        self.weight = embed_tokens.weight

    # --8<-- [start:lm_head_forward]
    def forward(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """[N, hidden] -> logits [N, V] on rank 0; None on the other ranks."""
        local = dense_linear(hidden_states, self.weight)  # [N, Vp]: this rank's tokens (oneDNN on CPU)
        logits = tensor_model_parallel_gather(local, dim=-1)  # rank 0: [N, tp * Vp]
        return None if logits is None else logits[..., : self.num_embeddings]  # drop padding
    # --8<-- [end:lm_head_forward]
