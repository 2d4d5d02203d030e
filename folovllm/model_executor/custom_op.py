"""`CustomOp`: a layer with a readable torch version and a compiled kernel (vLLM's `CustomOp`).

    forward_native   the torch code: the definition, what the docs show, what tests compare to
    forward_cpu      the same result from one of our C++ kernels (folovllm/_custom_ops.py)

`forward` calls one of the two, chosen once when the model is loaded (`set_custom_ops`) from
`EngineConfig.custom_ops`: "all" = the kernels, "none" = torch only ("auto" resolves to "all" on
a CPU where the kernels build). vLLM does the same per platform (`forward_cuda`, `forward_cpu`,
...), with `compilation_config.custom_ops` as the switch.

Why a kernel at all: `weight * x * rsqrt(mean(x^2) + eps)` in torch is six aten ops, each a
pass over memory and a temporary, plus Python dispatch per op; the kernel is one pass. Across
the ~15 small ops of a decoder layer that is what torch.compile would fuse (measured on
docs/performance.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._forward_method = self.forward_native

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_method(*args, **kwargs)

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_cpu(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def use_kernel(self, enabled: bool) -> None:
        self._forward_method = self.forward_cpu if enabled else self.forward_native


def set_custom_ops(model: nn.Module, custom_ops: str) -> int:
    """Point every `CustomOp` of the model at its kernel ("all") or its torch code ("none").
    Returns how many layers were switched to kernels."""
    if custom_ops not in ("all", "none"):
        raise ValueError(f"custom_ops must be resolved to 'all' or 'none' here, got {custom_ops!r}")
    ops = [m for m in model.modules() if isinstance(m, CustomOp)]
    for op in ops:
        op.use_kernel(custom_ops == "all")
    return len(ops) if custom_ops == "all" else 0
