"""Batch-invariant mode: a request's numbers do not depend on what else the engine is doing.

    LLM(model, batch_invariant=True)      folovllm serve --batch-invariant
    FOLOVLLM_BATCH_INVARIANT=1            (vLLM's VLLM_BATCH_INVARIANT)

*Batch invariant* means: the logits (so the log-probabilities and, for a seeded request, the
tokens) of a request are bitwise the same whether it runs alone or in a batch of any size,
whether its prompt was computed in one step or in chunks, whether its prefix came from the
cache, and at any thread count. An RL trainer needs it: it samples with the engine, then
recomputes the log-probabilities of the sampled tokens in one prefill (prompt + output); with
an engine that is not invariant the two disagree in the last bits (the training/inference
mismatch), and the policy gradient is computed for a slightly different policy.

Every reduction of a forward pass, and the order it sums in, on the CPU path (`custom_ops=
"all"`), kernel by kernel (docs/logprobs.md has the measurements):

    kernel                          reduces over          its order depends on     mode
    linears, LM head: oneDNN        the input dim         nothing measured: M = 1..2,100   as is
      matmul (cpu_gemm.py)                                 rows, 1/2 threads, fp32/bf16,
                                                           both ISAs (tested)
    RMSNorm (csrc elementwise)      the hidden dim        nothing: one row per thread      as is
    attention, prefill kernel       the keys, 32 a tile   nothing: tiles from position 0   as is
    attention, decode kernel        the keys, all at once nothing by itself, but it is     never
                                                           another order than the prefill   used
                                                           kernel's for the same query
    sampler: log_softmax, softmax   the vocabulary        nothing: ATen's last-dim kernel  as is
                                                           keeps a row on one thread

So on this path the one thing that varies with the batch is *which attention kernel computes a
query*, and the mode fixes that: `BatchInvariantCPUAttentionBackend` runs every query through
the prefill kernel (attention_backends/cpu_attn_invariant.py). The rest holds by construction
and is checked by tests (tests/test_batch_invariance.py) rather than assumed. What is *not* on
this path and does vary: MKL's sgemm (`F.linear`, the torch path `custom_ops="none"`, ~5e-6),
torch's SDPA (`attention_backend="sdpa"`), a plain `tensor.sum(-1)` over one long row (ATen
splits it across threads when there are few rows): the mode refuses the first two, and the
sampler does not use the third on floats.

The mode is picked once, at start-up: `batch_invariance(config)` returns the object the worker
asks for its attention backend. Off, it is a do-nothing `BatchVariant` that hands back the
backend unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from folovllm.model_executor.layers.attention import AttentionBackend

if TYPE_CHECKING:
    from folovllm.config import EngineConfig


def verify_batch_invariant_config(config: "EngineConfig") -> None:
    """Refuse, naming the field, the settings under which the mode cannot promise anything:
    kernels it has not checked (MKL's sgemm, SDPA, Triton), several ranks."""
    why = " (batch_invariant=True, e.g. from FOLOVLLM_BATCH_INVARIANT=1)"
    if torch.device(config.device).type != "cpu":
        raise ValueError(f"batch_invariant=True is built for device='cpu' only, got {config.device!r}" + why)
    if config.attention_backend not in ("auto", "cpu_attn"):
        raise ValueError(
            "batch_invariant=True needs attention_backend 'auto' or 'cpu_attn' (stage 04 or "
            f"later; our kernels), got {config.attention_backend!r}" + why)
    if config.custom_ops == "none":
        raise ValueError(
            "batch_invariant=True needs custom_ops 'auto' or 'all' (our CPU kernels and oneDNN "
            "linears); custom_ops='none' multiplies with MKL's sgemm, whose order depends on the "
            "number of rows" + why)
    if config.tensor_parallel_size != 1:
        raise ValueError(
            "batch_invariant=True is checked with tensor_parallel_size=1 only, got "
            f"{config.tensor_parallel_size}" + why)


# --8<-- [start:batch_invariance]
class BatchVariant:
    """The default: every kernel as the speed measurements chose it."""

    enabled = False

    def attention_backend(self, backend: AttentionBackend) -> AttentionBackend:
        return backend


class BatchInvariant(BatchVariant):
    """The mode: one attention kernel for decodes and prefills (everything else on the path is
    invariant as it is; tests/test_batch_invariance.py checks each kernel)."""

    enabled = True

    def attention_backend(self, backend: AttentionBackend) -> AttentionBackend:
        from folovllm.model_executor.attention_backends.cpu_attn_invariant import (
            BatchInvariantCPUAttentionBackend)

        assert backend.name == "cpu_attn", "verify_batch_invariant_config lets only cpu_attn through"
        return BatchInvariantCPUAttentionBackend()


def batch_invariance(config: "EngineConfig") -> BatchVariant:
    """The kernel choices of `config`, picked once when the worker starts."""
    return BatchInvariant() if config.batch_invariant else BatchVariant()
# --8<-- [end:batch_invariance]
