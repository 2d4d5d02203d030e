"""Attention backends (stage 04), chosen by `EngineConfig.attention_backend`.

    naive        gather K/V, materialise the scores (the reference; stages 01-03)
    torch_flash  FlashAttention's tiled online softmax in plain torch (the readable version)
    sdpa         torch.nn.functional.scaled_dot_product_attention (fused kernels on CPU and CUDA)
    cpu_attn     our C++ kernels, prefills and decodes, reading the paged cache in place (CPU)
    triton       our Triton kernels: varlen prefill over paged context, paged decode (CUDA)
    flash_attn   the flash-attn package, when installed (CUDA)

Each one's `build_metadata` runs once per step (the model runner calls it), its `forward` once
per layer. Every backend is tested against `naive` on random inputs (stages/04).
"""

from __future__ import annotations

import importlib

from folovllm.model_executor.layers.attention import AttentionBackend, NaiveAttentionBackend

# --8<-- [start:backend_registry]
# name -> "module:class", imported only when asked for (triton and flash_attn are optional)
_BACKENDS = {
    "torch_flash": "folovllm.model_executor.attention_backends.torch_flash:TorchFlashAttentionBackend",
    "sdpa": "folovllm.model_executor.attention_backends.sdpa:SDPAAttentionBackend",
    "cpu_attn": "folovllm.model_executor.attention_backends.cpu_attn:CPUAttentionBackend",
    "triton": "folovllm.model_executor.attention_backends.triton_attn:TritonAttentionBackend",
    "flash_attn": "folovllm.model_executor.attention_backends.flash_attn:FlashAttnBackend",
}
ATTENTION_BACKENDS = ("naive", *_BACKENDS)


def default_backend(device: str, custom_ops: str = "none") -> str:
    """Stage 04's default: our Triton kernels on CUDA; on CPU the fastest one we measured, which
    needs our compiled kernels (`custom_ops="all"`), else SDPA."""
    if device.startswith("cuda"):
        return "triton"
    return "cpu_attn" if custom_ops == "all" else "sdpa"


def get_attn_backend(name: str) -> AttentionBackend:
    if name == "naive":
        return NaiveAttentionBackend()
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    module_name, class_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"attention_backend={name!r} needs a package that is not installed ({e})"
        ) from e
    return getattr(module, class_name)()
# --8<-- [end:backend_registry]
