"""The `triton` attention backend: our own kernels (in `triton_kernels.py`), launched from here.

    store_kv_cache   store_kvcache_kernel          one program per new token
    forward          prefill_attention_kernel      rows with query_len > 1 (prefills, chunks of
                                                   prefills over cached context)
                     paged_decode_kernel           rows with query_len == 1 (decodes)
                     (+ decode_reduce_kernel)      when a long context is split (flash-decoding)

Both attention kernels look at every sequence of the batch and skip the rows that belong to the
other one, so `forward` never reads the query lengths back from the GPU: no `.item()`, no
`.tolist()`. The grids are sized from shapes and the two python ints of `AttentionMetadata`;
the one branch, "is any row longer than one token?", is `md.max_query_len > 1`.

Tile sizes are fixed per (dtype, head_dim), not autotuned: autotuning would run several configs
at the first call of every new shape, which under `TRITON_INTERPRET=1` (the CPU tests) costs
minutes, and the fixed ones are the usual FlashAttention-2 choices for an H100.
`benchmarks/gpu_attention.py` times them against torch SDPA on a GPU.

Left out: CUDA graphs capture (stage 04 runs eagerly), fp8 KV caches, non-causal attention.
"""

from __future__ import annotations

import os

import torch
import triton

from folovllm.attention_backends.triton_kernels import store_kvcache_kernel
from folovllm.layers.attention import AttentionBackend, AttentionMetadata, naive_attention

# Read once, as triton.jit does when it wraps the kernels: under the interpreter the kernels run
# on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRET:
        raise ValueError(
            "the triton attention backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing it, to run the kernels on CPU); got a tensor on {t.device}"
        )



# --8<-- [start:store_kv_cache_triton]
def store_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`store_kv_cache` as one kernel launch: k, v [T, Hkv, D] -> their slots of the caches."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_device(k)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k and v need a contiguous head_dim"
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key_cache.shape[-2:] == (num_kv_heads, head_dim)
    store_kvcache_kernel[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
    )
# --8<-- [end:store_kv_cache_triton]


# --8<-- [start:triton_backend]
class TritonAttentionBackend(AttentionBackend):
    """Stage 04 on CUDA: the KV store as one kernel; attention still the reference (the prefill
    and decode kernels come next)."""

    name = "triton"

    def store_kv_cache(
        self, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> None:
        store_kv_cache_triton(k, v, key_cache, value_cache, slot_mapping)

    def forward(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        md: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        return naive_attention(q, key_cache, value_cache, md, scale)
# --8<-- [end:triton_backend]
