"""SwiGLU's activation on a fused gate|up projection."""

import torch
import torch.nn.functional as F

from folovllm._custom_ops import load_ops
from folovllm.model_executor.custom_op import CustomOp


class SiluAndMul(CustomOp):
    """`silu(gate) * up`, where the input is the concatenation `[gate | up]` on the last dim."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return F.silu(gate) * up

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
        load_ops().silu_and_mul(out, x.contiguous())
        return out
