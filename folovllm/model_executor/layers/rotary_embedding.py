"""Rotary position embeddings (RoPE, Su et al. 2021), "rotate half" layout as in HF Llama/Qwen.

Each pair of dimensions (i, i + d/2) of a query or key is rotated by the angle
`position * theta^(-2i/d)`. Because a rotation by a then by -b is a rotation by a-b, the dot
product q·k only depends on the distance between the two positions.

The cos/sin table for every position up to `max_position` is computed once; a step looks its
rows up by the tokens' positions, so tokens of different sequences at different positions are
rotated in one call.
"""

from typing import Any, Optional

import torch

from folovllm._custom_ops import load_ops
from folovllm.model_executor.custom_op import CustomOp


class RotaryEmbedding(CustomOp):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_theta: float,
        rope_scaling: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        if rope_scaling is not None:
            inv_freq = _scale_inv_freq(inv_freq, rope_scaling)
        t = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim/2]
        # [max_position, head_dim]: cos then sin, kept in float32
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward_native(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, Hq, D]; k [T, Hkv, D] -> rotated q, k (same shapes and dtype)."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # 2 x [T, D/2]
        cos = cos.unsqueeze(1)  # [T, 1, D/2], broadcast over heads
        sin = sin.unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward_cpu(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same rotation, in place on q and k (views into the qkv projection are fine)."""
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        load_ops().rotary_embedding(positions.long().contiguous(), q, k, self.cos_sin_cache.float())
        return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # the two halves that form the rotated pairs
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _scale_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3's frequency-dependent scaling ("llama3"); "default" is no scaling."""
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported; supported: 'default', 'llama3'"
        )
    import math

    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)
