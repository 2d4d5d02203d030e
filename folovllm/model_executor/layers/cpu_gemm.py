"""The CPU matmul of a plain (unquantized) weight: oneDNN, packed or not, or `F.linear` (vLLM's
`dispatch_cpu_unquantized_gemm` in `model_executor/layers/utils.py`).

`linear.py` keeps what a linear layer *is* (the tensor-parallel split, the quantization seam);
this file is only how its `x @ W^T` runs on a CPU:

    dense_linear        every plain projection and the LM head call it: oneDNN's matmul where
                        it takes the dtype, `F.linear` (the reference) everywhere else
    pack_linear_weight  called once per layer after loading (`process_weights_after_loading`,
                        and `ParallelLMHead`'s): stores the weight in oneDNN's blocked layout
                        when weight packing is on

Weight packing is on when the engine runs our CPU kernels (`custom_ops="all"`, the CPU default):
the worker loads the model inside `weight_packing(True)`. `custom_ops="none"` keeps every weight
plain, the readable torch path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.platforms.cpu import onednn_bf16_supported

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_packing = False  # set by `weight_packing` while a model loads


# --8<-- [start:dense_linear]
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, x [T, in] @ weight [out, in]^T, through oneDNN on CPU.

    On CPU, `F.linear` calls MKL's sgemm, which on this AMD EPYC runs 1.2-1.8x slower than
    oneDNN's matmul on the shapes of Qwen3-0.6B (one thread, T = 1..512; 2.1x for the LM head at
    T = 8), and ties on small shapes at small T; docs/performance.md has the measurements and
    the end-to-end effect. vLLM's CPU backend uses oneDNN matmuls too. Same math, a different
    summation order: results differ from `F.linear` by float32 rounding (~1e-6), which
    `tests/test_linear.py` checks. Everything else (CUDA, float16, a 3-D input, a build without
    oneDNN, bfloat16 on a CPU without oneDNN's bf16 kernels, platforms/cpu.py) takes `F.linear`,
    the reference.
    """
    if weight.is_mkldnn:  # packed by `pack_linear_weight`: only oneDNN can read it
        return _packed_linear(x, weight, bias)
    if (_ONEDNN and x.device.type == "cpu" and x.dim() == 2 and onednn_takes(x.dtype)
            and weight.dtype == x.dtype and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
# --8<-- [end:dense_linear]


def onednn_takes(dtype: torch.dtype) -> bool:
    """oneDNN multiplies float32 on every x86 CPU, bfloat16 only where it has bf16 kernels
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere it fails to create the primitive)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16_supported())


@contextlib.contextmanager
def weight_packing(enabled: bool) -> Iterator[None]:
    """Pack the plain weights of the layers loaded inside this block (or not)."""
    global _packing
    before, _packing = _packing, enabled
    try:
        yield
    finally:
        _packing = before


# --8<-- [start:pack_linear_weight]
# oneDNN re-lays a weight [out, in] into the blocked layout its matmul kernel reads (tiles of
# rows and columns that fit the vector registers), chosen for a batch of PACK_BATCH rows; any
# batch can use it. Unpacked, oneDNN does that reordering on every call: at 4-48 rows it is a
# third of the matmul's time (measured on docs/performance.md: 1.4-1.7x faster packed at 16
# rows, ~5% at 128 and more). Below MIN_ROWS oneDNN switches to a kernel that is slower on the
# packed layout than the plain one, so a batch of 1-2 rows is padded to MIN_ROWS.
PACK_BATCH = 16
MIN_ROWS = 4


def pack_linear_weight(module: nn.Module) -> bool:
    """Store `module.weight` in oneDNN's layout in place of the plain one (same bytes;
    `weight.to_dense()` gives it back) when weight packing is on and oneDNN takes it (CPU,
    float32, bfloat16 where oneDNN has bf16 kernels). A weight shared with another module (an LM
    head tied to the embedding) is not touched: the module gets a packed copy of its own. Returns
    whether it packed."""
    weight = getattr(module, "weight", None)
    if not (_packing and _ONEDNN and isinstance(weight, torch.Tensor) and not weight.is_mkldnn
            and weight.device.type == "cpu" and onednn_takes(weight.dtype)):
        return False
    with torch.inference_mode():
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)
    module.weight = nn.Parameter(blocked, requires_grad=False)
    return True


def pack_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """`weight` [out, in] in oneDNN's layout, or None where `pack_linear_weight` would not pack
    (packing off, no oneDNN, not CPU, a dtype oneDNN does not take). For weights that are not
    one module's `weight`: each expert of a `FusedMoE`."""
    if not (_packing and _ONEDNN and not weight.is_mkldnn and weight.device.type == "cpu"
            and onednn_takes(weight.dtype)):
        return None
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH)


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] >= MIN_ROWS:  # the engine's case: [T, in], nothing to reshape
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if rows < MIN_ROWS:
        x2 = F.pad(x2, (0, 0, 0, MIN_ROWS - rows))
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return y[:rows].reshape(*x.shape[:-1], weight.shape[0])
# --8<-- [end:pack_linear_weight]
