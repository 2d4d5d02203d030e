"""SwiGLU's activation on a fused gate|up projection."""

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """`silu(gate) * up`, where the input is the concatenation `[gate | up]` on the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [T, 2I] -> 2 x [T, I]
        return F.silu(gate) * up
