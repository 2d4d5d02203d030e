"""The CPU matmul of a plain (unquantized) weight: oneDNN, packed or not, or `F.linear` (vLLM's
`dispatch_cpu_unquantized_gemm` in `model_executor/layers/utils.py`).

`linear.py` keeps what a linear layer *is* (the tensor-parallel split, the quantization seam);
this file is only how its `x @ W^T` runs on a CPU:

    dense_linear        every plain projection and the LM head call it: oneDNN's matmul where
                        it takes the dtype, `F.linear` (the reference) everywhere else
    pack_linear_weight  called once per layer after loading (`process_weights_after_loading`,
                        and `ParallelLMHead`'s): stores the weight in the layout of the matmul
                        the measured table picks for its shape (`choose_gemm`) when weight
                        packing is on: oneDNN's blocked layout, or (float32, bfloat16) the
                        panels our streaming kernel reads (`csrc/cpu/decode_gemm.cpp`,
                        `decode_linear`)

Weight packing is on when the engine runs our CPU kernels (`custom_ops="all"`, the CPU default):
the worker loads the model inside `weight_packing(True)`. `custom_ops="none"` keeps every weight
plain, the readable torch path.

Why a kernel of our own for float32 and bfloat16: a decode step multiplies 1-16 rows by every
weight, so it is bound by how fast the weights stream from memory, not by arithmetic (docs/performance.md,
"Decode at the bandwidth limit"). oneDNN pads 1-3 rows to 4 and reads its blocked layout at
60-85% of what one sequential stream gets; `decode_linear` reads each weight once per call, a
few panels side by side (several sequential streams, which is what the memory needs to deliver
its full bandwidth to one core), and applies it to all rows in registers; on the same bytes it
is within 0-18% of oneDNN at prefill.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from folovllm import envs
from folovllm._custom_ops import load_ops, ops_available
from folovllm.platforms.cpu import kernel_isa, onednn_bf16_supported

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_packing = False  # set by `weight_packing` while a model loads
_packing_gemm: Optional[str] = None  # "decode": `weight_packing(True, gemm="decode")` (a draft model)


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
    if weight.dim() == 3:  # our streaming kernel's panels (`pack_linear_weight`)
        return _decode_linear(x, weight, bias)
    if (_ONEDNN and x.device.type == "cpu" and x.dim() == 2 and onednn_takes(x.dtype)
            and weight.dtype == x.dtype and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
# --8<-- [end:dense_linear]


def onednn_takes(dtype: torch.dtype) -> bool:
    """oneDNN multiplies float32 on every x86 CPU, bfloat16 only where it has bf16 kernels
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere it fails to create the primitive)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16_supported())


def weight_packing_enabled() -> bool:
    """Whether the layers loading now should re-lay their weights for our kernels."""
    return _packing


@contextlib.contextmanager
def weight_packing(enabled: bool, gemm: Optional[str] = None) -> Iterator[None]:
    """Pack the plain weights of the layers loaded inside this block (or not). `gemm="decode"`:
    every float32 weight takes our streaming kernel where it is built (unless
    `FOLOVLLM_CPU_GEMM=onednn`), whatever the measured table says for its shape: for a model
    that only ever runs a few rows a pass (stage 09's draft model), where the table's rule also
    weighs prefill at 512 rows."""
    global _packing, _packing_gemm
    before, _packing = _packing, enabled
    gemm_before, _packing_gemm = _packing_gemm, gemm
    try:
        yield
    finally:
        _packing, _packing_gemm = before, gemm_before


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
    """Store `module.weight` in the layout of the matmul `choose_gemm` picks for its shape and
    dtype, in place of the plain one, when weight packing is on: our streaming kernel's panels
    (the kernels built; float32 [ceil(out / 32), in, 32], bfloat16 [ceil(out / 32), ceil(in / 2),
    64]), else oneDNN's blocked layout (CPU, float32, bfloat16 where oneDNN has bf16 kernels).
    Same values either way; `unpack_weight` gives the plain [out, in] back. A weight shared with
    another module (an LM head tied to the embedding) is not touched: the module gets a packed
    copy of its own. Returns whether it packed."""
    weight = getattr(module, "weight", None)
    if not (_packing and isinstance(weight, torch.Tensor) and not weight.is_mkldnn
            and weight.dim() == 2 and weight.device.type == "cpu"):
        return False
    decode = (_packing_gemm == "decode" and ops_available() and envs.cpu_gemm() != "onednn")
    if weight.dtype in DECODE_DTYPES and (decode or choose_gemm(*weight.shape, dtype=weight.dtype) == "decode"):
        with torch.inference_mode():
            panels = load_ops().pack_decode_weight(weight.detach().contiguous())
        module.weight = nn.Parameter(panels, requires_grad=False)
        # the panels hold them rounded up (outputs to 32, bf16's inputs to pairs)
        module.weight.out_features, module.weight.in_features = weight.shape
        return True
    if not (_ONEDNN and onednn_takes(weight.dtype)):
        return False
    with torch.inference_mode():
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)
    module.weight = nn.Parameter(blocked, requires_grad=False)
    return True


def logical_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape a weight has in the checkpoint ([out, in] for panels [ceil(out / 32), ..])."""
    if weight.dim() == 3 and hasattr(weight, "out_features"):
        return (weight.out_features, getattr(weight, "in_features", weight.shape[1]))
    return tuple(weight.shape)


def unpack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The plain [out, in] values of a weight in any of the layouts here."""
    if weight.is_mkldnn:
        return weight.to_dense()
    if weight.dim() == 3 and weight.dtype == torch.bfloat16:
        # [panels, in / 2, 64] -> [panels, in / 2, 32, 2] -> [panels, 32, in / 2, 2] -> [panels * 32, in]
        panels, pairs = weight.shape[:2]
        plain = weight.view(panels, pairs, 32, 2).permute(0, 2, 1, 3).reshape(panels * 32, 2 * pairs)
        return plain[: weight.out_features, : weight.in_features]
    if weight.dim() == 3:  # [panels, in, 32] -> [panels * 32, in] -> the first out rows
        return weight.transpose(1, 2).reshape(-1, weight.shape[1])[: weight.out_features]
    return weight


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


# --8<-- [start:choose_gemm]
# The measured table: for each weight shape, our kernel and oneDNN's packed matmul timed side by
# side at 1-16 rows (decode) and at 64 and 512 (prefill), one thread, per ISA path and weight dtype
# (float32 under "avx512"/"avx2", bfloat16 under "avx512-bf16"/"avx2-bf16"), written by
# `python -m benchmarks.decode_linear --write-table` (`--dtype bfloat16` for the bf16 rows).
# Committed rather than timed at load: a load-time timing on a busy machine would pick
# differently from one start to the next (and change the last bits of the logits with it); the
# table makes the choice reviewable and reproducible, and is re-measured with one command on a
# new machine.
TABLE_PATH = Path(__file__).with_name("cpu_gemm_table.json")
# The rule applied to each row of the table: the kernel where it is at least as fast as oneDNN at
# every decode row count and at most PREFILL_SLACK slower at 64 and 512 rows (prefill shares the
# layout). 1.25, not 1.10 (round 3, AVX2): on the AVX2 Zen 3 the kernel's prefill tile ran
# 0.82-0.99x oneDNN at 64-512 rows (load 12-17) while decode ran 1.2-4.3x at 1-16 rows; at 1.10
# three of Qwen3-0.6B's five shapes would fall back to oneDNN and lose 2.4-4.3x on every
# one-row decode step to save at most 18% of a prefill's linear time.
PREFILL_SLACK = 1.25
DECODE_DTYPES = (torch.float32, torch.bfloat16)  # what `decode_linear` multiplies


def choose_gemm(out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> str:
    """"decode" (our streaming kernel, `decode_linear`) or "onednn" for a float32 or bfloat16
    weight [out, in]: `FOLOVLLM_CPU_GEMM` when it names one, else the measured table's choice for
    the nearest measured shape on this ISA path and dtype (oneDNN where the table has no row for
    it, or the kernels cannot be built; for bfloat16 "onednn" means the path `dense_linear` takes
    without panels: oneDNN where it has bf16 kernels, else `F.linear`)."""
    forced = envs.cpu_gemm()
    if forced == "onednn" or not ops_available():
        return "onednn"
    if forced == "decode":
        return "decode"
    rows = _table().get(table_key(dtype), [])
    if not rows:
        return "onednn"
    # nearest in log-space: a shape twice as wide behaves like its neighbour, not like one 100x
    dist = lambda r: abs(math.log2(r["out"] / out_features)) + abs(math.log2(r["in"] / in_features))  # noqa: E731
    return min(rows, key=dist)["gemm"]


def table_key(dtype: torch.dtype) -> str:
    """The table's section for this ISA path and weight dtype: "avx512", "avx2-bf16", ..."""
    return kernel_isa() + ("-bf16" if dtype == torch.bfloat16 else "")


def table_choice(row: dict[str, Any]) -> str:
    """The rule above for one measured shape: {"1": [kernel_ms, onednn_ms], ..., "512": [...]}."""
    times = row["ms"]
    decode_ok = all(times[m][0] <= times[m][1] for m in times if int(m) <= 16)
    prefill_ok = all(times[m][0] <= PREFILL_SLACK * times[m][1] for m in times if int(m) > 16)
    return "decode" if decode_ok and prefill_ok else "onednn"


@functools.cache
def _table() -> dict[str, list[dict[str, Any]]]:
    try:
        return json.loads(TABLE_PATH.read_text())["shapes"]
    except (OSError, ValueError, KeyError):
        return {}


def _decode_linear(x: torch.Tensor, panels: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) through our kernel, W in panels [ceil(out / 32), in, 32]."""
    x2 = x.reshape(-1, x.shape[-1])  # [T, in]
    y = load_ops().decode_linear(x2, panels, panels.out_features, bias)  # [T, out]
    return y.reshape(*x.shape[:-1], panels.out_features)
# --8<-- [end:choose_gemm]
