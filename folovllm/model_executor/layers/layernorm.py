"""RMSNorm (Zhang & Sennrich, 2019): scale by 1/rms(x), no mean subtraction, no bias.

With `residual` (vLLM's convention), the residual add that precedes every norm of a decoder
layer is done here too, so the kernel makes one pass for both::

    h, residual = norm(h, residual)     # residual = h + residual; h = norm(residual)
"""

from typing import Optional, Union

import torch
from torch import nn

from folovllm._custom_ops import load_ops
from folovllm.model_executor.custom_op import CustomOp


class RMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    # --8<-- [start:rms_norm_native]
    def forward_native(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is not None:
            residual = x + residual
            x = residual
        # Compute in float32 like the reference implementation: the mean of squares of a
        # float16 activation overflows/underflows easily.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x.to(dtype)
        return out if residual is None else (out, residual)
    # --8<-- [end:rms_norm_native]

    def forward_cpu(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The kernels. With `residual`, both tensors are updated in place (vLLM's
        fused_add_rms_norm): x becomes the norm, residual the sum; callers pass tensors that
        nothing else reads afterwards, as the decoder layer does."""
        ops = load_ops()
        if residual is not None:
            x, residual = x.contiguous(), residual.contiguous()
            ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ops.rms_norm(out, x, self.weight, self.eps)
        return out
