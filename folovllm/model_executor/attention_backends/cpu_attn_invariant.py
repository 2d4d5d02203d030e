"""`cpu_attn` with one kernel for every query: the attention of the batch-invariant mode
(`EngineConfig.batch_invariant`, folovllm/batch_invariant.py).

`cpu_attn` computes a decode (a sequence with one new token) with `paged_attention_decode` and
everything else with `paged_attention_prefill`. Both are exact attention, but they sum the same
terms in a different order:

    decode kernel   all L logits of a head, one softmax over them, then sum_t p[t] * v[t]
    prefill kernel  tiles of 32 keys counted from position 0, an online softmax (running max
                    m, rescale O and l when m moves), O += exp(S - m) . V per tile

So the same query at position p gets a result that differs by a few float32 roundings
depending on which kernel computed it (measured ~3e-6 on a log-probability at the end of the
model, docs/logprobs.md). Which kernel that is depends on the *batch*, not on the request:

    a token sampled at step t            decode kernel (its sequence had one new token)
    the same token in a trainer's        prefill kernel (a prompt of many tokens)
      recomputation (prompt + output)
    a chunk of one token left over by    decode kernel (one new token looks like a decode)
      chunked prefill

This backend routes every row through the prefill kernel: a decode is a prefill of one query.
The prefill kernel's order for a query at position p does not depend on how many queries share
its call (each row keeps its own m, l and O; the tiles are counted from position 0, so a chunk
boundary or a prefix-cache hit does not move them; keys past p add exact zeros), nor on the
thread count (threads split the work by (KV head, tile of queries), never inside one query's
sum). `tests/test_batch_invariance.py` checks all of it bitwise.

The cost: one kernel call per decoding sequence per layer instead of one per layer for all of
them (a Python loop over the step's decodes), measured in docs/logprobs.md.
"""

from __future__ import annotations

import torch

from folovllm.model_executor.attention_backends.cpu_attn import CPUAttentionBackend, CPUAttnMetadata
from folovllm.model_executor.layers.attention import AttentionMetadata, split_prefills_decodes


class BatchInvariantCPUAttentionBackend(CPUAttentionBackend):
    """`cpu_attn` whose metadata has no decode rows: each one is a one-query `PrefillRow`."""

    name = "cpu_attn"

    # --8<-- [start:invariant_build_metadata]
    def build_metadata(self, common: AttentionMetadata, key_cache: torch.Tensor) -> CPUAttnMetadata:
        # every sequence, decodes included, becomes a PrefillRow (one call of the prefill
        # kernel each); no decode rows, so `forward` never calls the decode kernel
        prefills, _ = split_prefills_decodes(common, key_cache.shape[1], one_query_is_decode=False)
        return CPUAttnMetadata(**common.common_fields(), prefills=prefills,
                               decode_rows=None, decode_tables=None, decode_lens=None)
    # --8<-- [end:invariant_build_metadata]
