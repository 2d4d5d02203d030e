"""GPTQ: linear layers whose weights are 4-bit integers with a scale and a zero per group.

The on-disk format is the one GPTQModel writes (and AutoGPTQ wrote before it): per linear layer
`qweight`, `qzeros`, `scales`, `g_idx` (and `bias` in the model's dtype). For a layer with K
inputs, N outputs, `bits` = 4 (pack factor P = 32 / bits = 8) and groups of G inputs::

    qweight  int32 [K / P, N]   eight 4-bit codes per int32, packed along the INPUT dim:
                                 qweight[r, n] bits 4j..4j+3 = code of input k = r*P + j, output n

        int32 qweight[r, n]:  | k=8r+7 | k=8r+6 | ... | k=8r+1 | k=8r+0 |
                              bit 31                               bit 0

    qzeros   int32 [K / G, N / P]  the groups' zero points, packed along the OUTPUT dim:
                                 qzeros[g, c] bits 4j..4j+3 = zero of group g, output n = c*P + j
    scales   float [K / G, N]    one scale per group and output
    g_idx    int32 [K]           group of each input: k // G, or any order with act-order

    W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]

`group_size = -1` is one group over all K inputs. With act-order (`desc_act`) the quantizer
visited the inputs by decreasing Hessian diagonal, so groups are formed in that order and
`g_idx` is not sorted; the formula above (gather by `g_idx`) is unchanged.

Two zero conventions ("checkpoint_format"):

    "gptq"     (v1, AutoGPTQ, GPTQModel's default)   qzeros word = packed real zeros - 0x11111111
    "gptq_v2"  (GPTQModel)                           qzeros word = packed real zeros

v1 is AutoGPTQ's old off-by-one, kept for compatibility: it subtracts 1 from every zero, as one
32-bit subtraction of 0x11111111 (4 bits; 0x01010101 at 8 bits). A real zero of 0 then borrows
from its neighbour, and only the word-level inverse gets both back::

    real zeros (nibbles, high to low)   0 0 0 0 0 0 3 0      word 0x00000030
    v1 word = word - 0x11111111                              0xEEEEEF1F
    nibble by nibble + 1                F F F F F 10 2 10    wrong: 0 - 1 borrowed from the 3
    word + 0x11111111 (mod 2^32)                             0x00000030: right

So a v1 checkpoint is converted to v2 once, at load (`qzeros_v1_to_v2`), as GPTQModel does, and
every kernel reads real zeros.

Kernels (`GPTQLinearMethod.apply`, picked once after loading, see `select_kernel`):

    reference    unpack + dequantize the whole matrix, then one matmul: readable, any dtype,
                 but it reads and writes a full float matrix every call (not a fast path)
    cpu_int4     torch's int4 weight-only CPU matmul (`_weight_int4pack_mm_for_cpu`): reads the
                 4-bit codes and dequantizes in registers; bfloat16 activations, 4 bits
    cpu_int4_panel  our C++ decode kernel (`csrc/cpu/int4_gemm.cpp`, `Int4PanelWeight`): the
                 codes re-laid in panels of 32 outputs and streamed once per call, float32
                 accumulation, float32 or bfloat16 activations; the CPU default where our
                 kernels run (custom_ops="all")
    cpu_int4_panel_q8  the same panels with the activations rounded to int8 per block of 32
                 inputs (llama.cpp's Q8_0) and integer dot products: 2-2.7x faster on AVX2,
                 but it changes the result by that rounding, so it is opt-in only
                 (FOLOVLLM_GPTQ_KERNEL=cpu_int4_panel_q8), never chosen by `select_kernel`
    triton       our fused dequant-matmul kernel (`gptq_triton.py`) on CUDA

With tensor parallelism (stage 08) a column-parallel layer splits `qweight`, `qzeros` and
`scales` along the outputs (the loaders follow `output_dim` / `packed_dim`); a row-parallel layer
splits the inputs, and with them the groups (`RankGroups`).

Left out: 2/3-bit weights, `dynamic` per-module overrides, quantized `lm_head`, AWQ and Marlin
(a repacked layout for fast GPU kernels), activation quantization by default (cpu_int4_panel_q8
is the opt-in).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from folovllm._custom_ops import ops_available
from folovllm.model_executor.layers import cpu_gemm
from folovllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QuantizationConfig,
    WeightLoader,
    WeightShapeError,
    default_weight_loader,
    set_weight_attrs,
)

SUPPORTED_BITS = (4, 8)
# checkpoint_format -> what was subtracted from each zero before packing (v1's off-by-one)
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
KERNELS = ("reference", "cpu_int4", "cpu_int4_panel", "cpu_int4_panel_q8", "triton")
KERNEL_ENV = "FOLOVLLM_GPTQ_KERNEL"  # force one kernel (tests, ablations); unset = select_kernel


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    """A GPTQ checkpoint's settings (`quantization_config` in config.json)."""

    bits: int = 4
    group_size: int = 128  # -1: one group over all inputs
    desc_act: bool = False  # act-order: groups follow the quantizer's column order (g_idx)
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1: stored zero = zero - 1) or "gptq_v2"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits={self.bits!r} is not supported; supported: {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"GPTQ group_size must be -1 or a positive integer, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size % self.pack_factor:
            raise ValueError(
                f"GPTQ group_size={self.group_size} must be a multiple of {self.pack_factor} "
                f"(the codes packed in one int32 at bits={self.bits})"
            )
        if self.checkpoint_format not in ZERO_OFFSETS:
            raise ValueError(
                f"GPTQ checkpoint_format={self.checkpoint_format!r} is not supported; "
                f"supported: {sorted(ZERO_OFFSETS)}"
            )

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def zero_offset(self) -> int:
        """What a writer of this format subtracts from each zero (1 for v1), word-level."""
        return ZERO_OFFSETS[self.checkpoint_format]

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str = "quantization_config") -> "GPTQConfig":
        """Read GPTQModel's / AutoGPTQ's fields; refuse, naming the field, what we cannot run."""
        # GPTQModel writes the zero convention as `checkpoint_format` (older) or `format`.
        fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
        refusals = {
            "lm_head": (raw.get("lm_head", False), "a quantized lm_head is not supported"),
            "dynamic": (raw.get("dynamic"), "per-module overrides are not supported"),
            "pack_dtype": (
                raw.get("pack_dtype", "int32") not in ("int32", "torch.int32"),
                "only int32 packing is supported",
            ),
        }
        for field, (bad, why) in refusals.items():
            if bad:
                raise ValueError(f"GPTQ {field}={raw.get(field)!r} in {source}: {why}")
        # JSON booleans and integers only: bool("false") is True, so coercing would turn
        # act-order on for `"desc_act": "false"`.
        for field, default in (("desc_act", False), ("sym", True)):
            if not isinstance(raw.get(field, default), bool):
                raise ValueError(f"GPTQ {field}={raw.get(field)!r} in {source}: must be true or false")
        for field, default in (("bits", 4), ("group_size", 128)):
            value = raw.get(field, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"GPTQ {field}={value!r} in {source}: must be an integer")
        try:
            return cls(
                bits=raw.get("bits", 4),
                group_size=raw.get("group_size", 128),
                desc_act=raw.get("desc_act", False),
                sym=raw.get("sym", True),
                checkpoint_format=fmt,
            )
        except ValueError as e:
            raise ValueError(f"{e} (in {source})") from None

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` our quantizer writes (GPTQModel's field names)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "lm_head": False,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
        }

    def get_quant_method(self, layer: LinearBase) -> Optional[LinearMethodBase]:
        return GPTQLinearMethod(self)

    def skips_checkpoint_tensor(self, name: str) -> bool:
        # AutoGPTQ writes an all-zero bias for every quantized layer, also where the model has
        # none (Qwen3, Llama); vLLM skips it too
        return name.endswith(".bias")


# -- packing ------------------------------------------------------------------------------------

# --8<-- [start:packing]
def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes into int32, 32 / bits of them per word along `dim`
    (0 for qweight: along the inputs; 1 for qzeros: along the outputs). Code j of a word goes to
    bits [j*bits, (j+1)*bits)."""
    pf = 32 // bits
    codes = codes.to(torch.int64).movedim(dim, -1)  # [..., L]
    codes = codes.reshape(*codes.shape[:-1], -1, pf)  # [..., L / pf, pf]
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    words = (codes << shifts).sum(-1)  # [..., L / pf], in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 words -> int32 codes in [0, 2^bits), `dim` grows by
    32 / bits."""
    pf = 32 // bits
    shifts = torch.arange(pf, dtype=torch.int32, device=words.device) * bits
    words = words.movedim(dim, -1).unsqueeze(-1)  # [..., W, 1]
    # `>>` on int32 copies the sign bit in from the left; the mask drops it.
    codes = (words >> shifts) & (2**bits - 1)  # [..., W, pf]
    return codes.reshape(*codes.shape[:-2], -1).movedim(-1, dim)
# --8<-- [end:packing]


# --8<-- [start:v1_to_v2]
def qzeros_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 (AutoGPTQ) qzeros -> v2: add 1 to every packed zero as ONE 32-bit addition
    (0x11111111 at 4 bits), so the borrow a zero of 0 took from its neighbour is given back,
    exactly as GPTQModel converts on load (see the module docstring)."""
    ones = sum(1 << (bits * j) for j in range(32 // bits))  # 0x11111111 / 0x01010101
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF  # mod 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
    return words.to(torch.int32)
# --8<-- [end:v1_to_v2]


def qzeros_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v2 qzeros -> v1, as GPTQModel writes them: subtract 1 from every packed zero as ONE
    32-bit subtraction (wrapping), so a zero of 0 borrows from its neighbour. The exact inverse
    of `qzeros_v1_to_v2`; a writer that subtracted nibble by nibble could not store a zero of 0."""
    ones = sum(1 << (bits * j) for j in range(32 // bits))  # 0x11111111 / 0x01010101
    words = (qzeros.to(torch.int64) - ones) & 0xFFFFFFFF  # mod 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
    return words.to(torch.int32)


# --8<-- [start:dequantize]
def dequantize_gptq(
    qweight: torch.Tensor,  # int32 [K / P, N]
    qzeros: torch.Tensor,  # int32 [groups, N / P], v2 (real zeros)
    scales: torch.Tensor,  # [groups, N]
    g_idx: torch.Tensor,  # int [K]
    bits: int,
) -> torch.Tensor:
    """-> W^T [K, N] in `scales`' dtype: (code - zero) * scale, each input row using its group."""
    codes = unpack_int32(qweight, bits, dim=0)  # [K, N]
    zeros = unpack_int32(qzeros, bits, dim=1)  # [groups, N]
    g = g_idx.long()
    # (code - zero) is a small exact integer, so the one product is the only rounding.
    return (codes - zeros[g]).to(scales.dtype) * scales[g]  # [K, N]


def gptq_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
    g_idx: torch.Tensor, bits: int, bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[..., K] -> [..., N]: the readable path every fast kernel is tested against."""
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits)  # [K, N]
    y = x.to(w.dtype) @ w
    return y + bias if bias is not None else y
# --8<-- [end:dequantize]


# -- the CPU int4 path --------------------------------------------------------------------------

INT4_CPU_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 CPU kernel takes


def cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


# --8<-- [start:cpu_int4]
@dataclass
class CpuInt4Weight:
    """A GPTQ matrix in the layout of torch's int4 weight-only CPU matmul.

    That kernel computes `x @ W^T` with W [N, K] stored as two codes per byte (its own tiled
    order) and, per group of `group_size` inputs and per output, a (scale, zero) pair with

        W[n, k] = (code - 8) * scale + zero

    GPTQ's `(code - z) * s` is the same line: zero = (8 - z) * s. Act-order is undone once here:
    sorting the inputs by `g_idx` (`perm`) makes every group contiguous, and the activations are
    permuted the same way at each call (x[:, perm] @ W^T[perm] = x @ W^T).
    """

    packed: torch.Tensor  # uint8, torch's int4 layout of W[:, perm]
    scales_and_zeros: torch.Tensor  # bfloat16 [K / group, N, 2]
    group_size: int
    perm: Optional[torch.Tensor]  # [K] long, None when g_idx is already in order

    @classmethod
    def from_gptq(
        cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
    ) -> "CpuInt4Weight":
        codes = unpack_int32(qweight, 4, dim=0)  # [K, N]
        K = codes.shape[0]
        g = g_idx.long()
        perm = torch.argsort(g, stable=True)
        in_order = bool(torch.equal(perm, torch.arange(K)))
        codes, g = codes[perm], g[perm]
        sizes = torch.bincount(g)
        group = int(sizes[0])
        if not torch.all(sizes == group):
            raise ValueError(f"cpu_int4 needs groups of equal size, got sizes {sizes.tolist()}")
        # The kernel takes groups of 32..256; a larger group (-1 = all of K) is cut into equal
        # pieces that repeat its scale and zero.
        kernel_group = next((s for s in INT4_CPU_GROUPS if group % s == 0), None)
        if kernel_group is None:
            raise ValueError(f"cpu_int4 needs a group size that is a multiple of 32, got {group}")
        zeros = unpack_int32(qzeros, 4, dim=1).float()  # [groups, N]
        s = scales.float()
        zero_term = (8 - zeros) * s  # [groups, N]
        repeat = group // kernel_group
        scales_and_zeros = torch.stack([s, zero_term], -1).repeat_interleave(repeat, 0)
        return cls(
            packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1),
            scales_and_zeros=scales_and_zeros.to(torch.bfloat16).contiguous(),  # [K / kg, N, 2]
            group_size=kernel_group,
            perm=None if in_order else perm,
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """[M, K] -> [M, N] in x's dtype (computed in bfloat16)."""
        if self.perm is not None:
            x = x[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype)
# --8<-- [end:cpu_int4]


def cpu_int4_supported(config: GPTQConfig, input_size: int, output_size: int,
                       uneven_groups: bool = False) -> Optional[str]:
    """None if the cpu_int4 kernel can run this layer (`input_size` x `output_size` on this
    rank), else why not. `uneven_groups`: an act-order layer split by input (`RankGroups`), whose
    rank holds uneven parts of the groups, which the kernel's equal groups cannot express."""
    if not cpu_int4_available():
        return "this torch has no _weight_int4pack_mm_for_cpu"
    if config.bits != 4:
        return f"bits={config.bits} (it takes 4)"
    if uneven_groups:
        return "an act-order layer split by input: this rank holds uneven parts of the groups"
    group = input_size if config.group_size == -1 else config.group_size
    if group % 32:
        return f"group size {group} (it takes multiples of 32)"
    if output_size % 16:
        return f"{output_size} outputs (it takes multiples of 16)"
    return None


# -- our int4 decode kernel -------------------------------------------------------------------

INT4_PANEL = 32  # outputs per panel of csrc/cpu/int4_gemm.cpp
INT4_BLOCK_K = 4  # inputs per 64-byte block of codes (16 words x 8 nibbles / 32 outputs)
# Nibble j of a word holds input 4b + INT4_NIBBLE_K[j] of output half j % 2: inputs k and k + 1
# sit 16 bits apart (nibbles q and q + 4), the pair one bfloat16 dot product takes.
INT4_NIBBLE_K = tuple(2 * ((j >> 1) & 1) + (j >> 2) for j in range(8))  # (0, 0, 2, 2, 1, 1, 3, 3)


# --8<-- [start:int4_panel]
@dataclass
class Int4PanelWeight:
    """A GPTQ matrix laid out for our decode kernel (`csrc/cpu/int4_gemm.cpp`), which reads it
    as one stream per panel of 32 outputs, group after group::

        packed int32 [panels, groups * (G / 4 * 16 + 64)]
          panel p, group g:  G / 4 blocks of 16 words, then 32 float scales, 32 float zeros
          block b, word i, nibble j (bits 4j .. 4j+3): the code of
              input  g * G + 4b + INT4_NIBBLE_K[j]     (inputs sorted by group: `perm`)
              output 32p + 16 (j % 2) + i

    One 64-byte block is one AVX-512 load (two AVX2 loads) of words whose nibble j, shifted down
    and masked, is a vector of consecutive outputs' codes for one input: no shuffles. Nibbles
    q and q + 4 are inputs k and k + 1 of the same output, 16 bits apart: masked together they
    are the two halves of a bfloat16 pair, what `vdpbf16ps` multiplies with (x[k], x[k + 1]). Act-order
    is undone as for `CpuInt4Weight`: the inputs sorted by `g_idx`, x gathered the same way at
    each call (inside the kernel).
    """

    packed: torch.Tensor  # int32 [ceil(N / 32), words per panel]
    group_size: int
    out_features: int
    perm: Optional[torch.Tensor]  # [K] long, None when g_idx is already in order
    # cpu_int4_panel_q8: x rounded to int8 per block of 32 inputs, integer dot products
    # (`int4_decode_linear_q8`); not exact, opt-in
    int8_activations: bool = False

    @classmethod
    def from_gptq(
        cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
        int8_activations: bool = False,
    ) -> "Int4PanelWeight":
        codes = unpack_int32(qweight, 4, dim=0)  # [K, N]
        K, N = codes.shape
        perm, group = _sorted_groups(g_idx, scales.shape[0])
        P = -(-N // INT4_PANEL)
        pad = P * INT4_PANEL - N
        # codes [K, N] -> padded [groups, G / 4, 4 (kk), P, 2 (half), 16 (i)]
        c = torch.nn.functional.pad(codes[perm] if perm is not None else codes, (0, pad)).to(torch.int64)
        c = c.view(K // group, group // INT4_BLOCK_K, INT4_BLOCK_K, P, 2, 16)
        c = c.permute(3, 0, 1, 5, 2, 4)  # [P, groups, G / 4, 16 (i), 4 (kk), 2 (half)]
        c = torch.stack([c[..., kk, j % 2] for j, kk in enumerate(INT4_NIBBLE_K)], -1)  # [..., 16, 8 (j)]
        words = (c << (4 * torch.arange(8))).sum(-1)  # [P, groups, G / 4, 16], in [0, 2^32)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same 32 bits
        words = words.reshape(P, K // group, -1)  # [P, groups, G / 4 * 16]

        def per_panel(t: torch.Tensor) -> torch.Tensor:  # [groups, N] -> [P, groups, 32] float32
            t = torch.nn.functional.pad(t.float(), (0, pad))
            return t.view(-1, P, INT4_PANEL).transpose(0, 1)

        zeros = unpack_int32(qzeros, 4, dim=1)  # [groups, N], real zeros (v2)
        meta = torch.cat([per_panel(scales), per_panel(zeros)], -1).contiguous().view(torch.int32)
        return cls(
            packed=torch.cat([words, meta], -1).reshape(P, -1).contiguous(),
            group_size=group,
            out_features=N,
            perm=perm,
            int8_activations=int8_activations,
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """[M, K] (float32 or bfloat16) -> [M, N] in x's dtype, accumulated in float32."""
        from folovllm._custom_ops import load_ops

        ops = load_ops()
        linear = ops.int4_decode_linear_q8 if self.int8_activations else ops.int4_decode_linear
        return linear(x, self.packed, self.perm, self.group_size, self.out_features)
# --8<-- [end:int4_panel]


def _sorted_groups(g_idx: torch.Tensor, num_groups: int) -> tuple[Optional[torch.Tensor], int]:
    """(perm that sorts the inputs by group, None if already sorted; the common group size),
    refusing groups of unequal size (the kernel's groups are equal blocks of inputs)."""
    g = g_idx.long()
    perm = torch.argsort(g, stable=True)
    sizes = torch.bincount(g, minlength=num_groups)
    group = int(sizes[0])
    if not torch.all(sizes == group) or group % INT4_BLOCK_K:
        raise ValueError(f"cpu_int4_panel needs groups of one size, a multiple of {INT4_BLOCK_K}, "
                         f"got sizes {sizes.tolist()}")
    return (None if torch.equal(perm, torch.arange(g.numel())) else perm), group


def int4_panel_supported(config: GPTQConfig, input_size: int, dtype: torch.dtype,
                         uneven_groups: bool = False) -> Optional[str]:
    """None if cpu_int4_panel can run this layer (`input_size` inputs on this rank), else why not."""
    if config.bits != 4:
        return f"bits={config.bits} (it takes 4)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"a {dtype} model (it takes float32 and bfloat16)"
    if uneven_groups:
        return "an act-order layer split by input: this rank holds uneven parts of the groups"
    group = input_size if config.group_size == -1 else min(config.group_size, input_size)
    if group % INT4_BLOCK_K:
        return f"group size {group} (it takes multiples of {INT4_BLOCK_K})"
    if not ops_available():
        return "folovllm's CPU kernels cannot be built here"
    return None


Q8_BLOCK = 32  # inputs per int8 activation scale of cpu_int4_panel_q8 (llama.cpp's Q8_0 block)


def int4_panel_q8_supported(config: GPTQConfig, input_size: int, dtype: torch.dtype,
                            uneven_groups: bool = False) -> Optional[str]:
    """None if cpu_int4_panel_q8 can run this layer, else why not: cpu_int4_panel's conditions
    and groups made of whole blocks of 32 inputs."""
    if why := int4_panel_supported(config, input_size, dtype, uneven_groups):
        return why
    group = input_size if config.group_size == -1 else min(config.group_size, input_size)
    if group % Q8_BLOCK:
        return f"group size {group} (it takes multiples of {Q8_BLOCK}, its activation blocks)"
    return None


def select_kernel(config: GPTQConfig, device: torch.device, dtype: torch.dtype, input_size: int,
                  output_size: int, uneven_groups: bool = False) -> str:
    """The kernel a layer uses: `FOLOVLLM_GPTQ_KERNEL` if set, else the fastest that applies.

    On CPU with our kernels on (the engine's `custom_ops="all"`, which loads the model inside
    `cpu_gemm.weight_packing(True)`): cpu_int4_panel, for float32 and bfloat16 models alike; it
    beats torch's int4 kernel at every measured row count and dtype, and dequantize-then-matmul
    by far (the per-linear table of `benchmarks/stage07_int4.py`). Without them, cpu_int4 only
    for bfloat16 models: for one token torch's kernel beats a dense matmul in bfloat16, but run
    in float32 or float16 it is some 20x slower than a dense float32 matmul (the one-matmul table
    of `benchmarks/stage07_gptq.py`), so a float32 model keeps the exact reference.
    """
    forced = os.environ.get(KERNEL_ENV)
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"{KERNEL_ENV}={forced!r}; allowed: {KERNELS}")
        if forced == "cpu_int4" and (why := cpu_int4_supported(config, input_size, output_size, uneven_groups)):
            raise ValueError(f"{KERNEL_ENV}=cpu_int4 cannot run this layer: {why}")
        if forced == "cpu_int4_panel" and (why := int4_panel_supported(config, input_size, dtype, uneven_groups)):
            raise ValueError(f"{KERNEL_ENV}=cpu_int4_panel cannot run this layer: {why}")
        if forced == "cpu_int4_panel_q8" and (why := int4_panel_q8_supported(config, input_size, dtype,
                                                                             uneven_groups)):
            raise ValueError(f"{KERNEL_ENV}=cpu_int4_panel_q8 cannot run this layer: {why}")
        return forced
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if (device.type == "cpu" and cpu_gemm.weight_packing_enabled()
            and int4_panel_supported(config, input_size, dtype, uneven_groups) is None):
        return "cpu_int4_panel"
    if dtype == torch.bfloat16 and cpu_int4_supported(config, input_size, output_size, uneven_groups) is None:
        return "cpu_int4"
    return "reference"


# -- the linear method --------------------------------------------------------------------------


class GPTQLinearMethod(LinearMethodBase):
    """Registers a GPTQ layer's four checkpoint tensors and multiplies with them."""

    def __init__(self, quant_config: GPTQConfig) -> None:
        self.quant_config = quant_config
        self.kernel = "reference"  # chosen in process_weights_after_loading
        self.cpu_weight: Optional[CpuInt4Weight | Int4PanelWeight] = None
        self.groups: Optional[RankGroups] = None  # set in create_weights

    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        cfg = self.quant_config
        pf, output_size = cfg.pack_factor, sum(output_partition_sizes)
        self.groups = groups = RankGroups.of(layer, cfg, input_size, output_partition_sizes)

        def param(shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> nn.Parameter:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, **{"weight_loader": weight_loader, **attrs})
            return p

        # Split by input, in order: scales / qzeros rows are cut per rank (dim 0 holds the groups).
        by_group = groups.loader_attrs(layer, group_dim=0)
        layer.register_parameter(  # [K / P, N]: packed along the inputs, split along the outputs
            "qweight", param((input_size // pf, output_size), torch.int32,
                             input_dim=0, output_dim=1, packed_dim=0, pack_factor=pf))
        layer.register_parameter(  # [groups, N / P]: packed along the outputs
            "qzeros", param((groups.num_groups, output_size // pf), torch.int32,
                            output_dim=1, packed_dim=1, pack_factor=pf, **by_group))
        layer.register_parameter(  # [groups, N]
            "scales", param((groups.num_groups, output_size), params_dtype, output_dim=1, **by_group))
        layer.register_parameter("g_idx", g_idx_param(layer, input_size, groups))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Check g_idx, read v1 zeros as v2, then pick the kernel and lay the weights out for it."""
        cfg = self.quant_config
        self.groups.check_g_idx(layer, layer.g_idx)
        if cfg.checkpoint_format == "gptq":
            layer.qzeros.data = qzeros_v1_to_v2(layer.qzeros.data, cfg.bits)
        K, N = layer.qweight.shape[0] * cfg.pack_factor, layer.qweight.shape[1]  # on this rank
        self.kernel = select_kernel(cfg, layer.qweight.device, layer.scales.dtype, K, N,
                                    uneven_groups=self.groups.uneven)
        if self.kernel == "cpu_int4":
            self.cpu_weight = CpuInt4Weight.from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
            # The int4 layout replaces the checkpoint tensors: keeping both would double memory.
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                delattr(layer, name)
            w = self.cpu_weight
            layer.register_buffer("int4_packed", w.packed, persistent=False)
            layer.register_buffer("int4_scales_and_zeros", w.scales_and_zeros, persistent=False)
            if w.perm is not None:
                layer.register_buffer("int4_perm", w.perm, persistent=False)
        elif self.kernel in ("cpu_int4_panel", "cpu_int4_panel_q8"):
            self.cpu_weight = Int4PanelWeight.from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                                        int8_activations=self.kernel == "cpu_int4_panel_q8")
            for name in ("qweight", "qzeros", "scales", "g_idx"):  # replaced, as for cpu_int4
                delattr(layer, name)
            layer.register_buffer("int4_panels", self.cpu_weight.packed, persistent=False)
            if self.cpu_weight.perm is not None:
                layer.register_buffer("int4_perm", self.cpu_weight.perm, persistent=False)

    # --8<-- [start:apply]
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        cfg = self.quant_config
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        if self.kernel in ("cpu_int4", "cpu_int4_panel", "cpu_int4_panel_q8"):
            y = self.cpu_weight.matmul(x2)
            y = y + bias if bias is not None else y
        elif self.kernel == "triton":
            from folovllm.model_executor.layers.quantization.gptq_triton import gptq_matmul_triton

            y = gptq_matmul_triton(x2, layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                   cfg.bits, bias)
        else:
            y = gptq_matmul_reference(x2, layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                      cfg.bits, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)  # [..., N]
    # --8<-- [end:apply]


# -- groups under tensor parallelism (stage 08) ------------------------------------------------


def layer_name(layer: nn.Module) -> str:
    """The layer's name in the model for errors (`prefix`, set by the model), else its class."""
    return getattr(layer, "prefix", "") or type(layer).__name__


# --8<-- [start:rank_groups]
@dataclass(frozen=True)
class RankGroups:
    """Which groups of a layer's scales and zeros this rank holds, and how its g_idx is read.

    A column-parallel layer (or one rank) sees every input: all groups, g_idx as saved. A
    row-parallel layer gives rank r inputs [r * K/tp, (r+1) * K/tp), and the groups follow
    (vLLM's rule)::

        o_proj, K = 128 inputs, tp = 2     0         32        64        96       128
        groups of 32, in order             |  g0     |  g1     |  g2     |  g3     |
                                           |  rank 0           |  rank 1           |
            rank 1 keeps scale / zero rows 2, 3 as its rows 0, 1, and reads g_idx - 2
        act-order: rank 1's inputs 64..127 may belong to any group, so every rank keeps all
            4 rows and the global g_idx (the scales and zeros are replicated, qweight still split)
        groups of 128, in order: the one group would straddle the two ranks: refused
        group_size -1: one group, replicated (so is a group larger than the layer's inputs, as
            GPTQModel writes it for a small layer: one row of scales, g_idx all 0)

    `first_group` is subtracted from g_idx so that it indexes this rank's rows.
    """

    num_groups: int  # rows of scales / zeros on this rank
    first_group: int  # the global number of this rank's row 0
    split: bool  # rows cut per rank (row-parallel, groups in order)
    uneven: bool  # row-parallel act-order: all rows kept, this rank's inputs fill them unevenly
    input_start: int  # this rank's first input feature
    input_size: int  # all ranks' input features (the checkpoint's g_idx length)

    @classmethod
    def of(cls, layer: nn.Module, config: GPTQConfig, input_size: int, output_partition_sizes: list[int],
           fmt: str = "GPTQ") -> "RankGroups":
        """`input_size`, `output_partition_sizes`: the layer's features on this rank; the layer
        gives the full size and the rank. Refuses, naming the layer, sizes the packing or the
        groups do not divide (`fmt` names the checkpoint format in the message)."""
        full = getattr(layer, "input_size", input_size)
        rank = getattr(layer, "tp_rank", 0)
        group_size, act_order, pf = config.group_size, config.desc_act, config.pack_factor
        if group_size > full:  # GPTQModel writes one group (one row of scales, g_idx all 0): as -1
            group_size = -1
        if input_size % pf or any(size % pf for size in output_partition_sizes):
            raise ValueError(
                f"{fmt} at bits={config.bits} packs {pf} values per int32: {layer_name(layer)} with "
                f"{input_size} inputs and outputs {output_partition_sizes} on this rank does not divide"
            )
        group = full if group_size == -1 else group_size
        if full % group:
            raise ValueError(f"{fmt} group_size={group_size} does not divide the {full} inputs of {layer_name(layer)}")
        split_inputs = input_size != full  # row-parallel with tp > 1
        split = split_inputs and group_size != -1 and not act_order
        if split and input_size % group:
            raise ValueError(
                f"{fmt} group_size={group_size} does not divide the {input_size} inputs each rank holds "
                f"of {layer_name(layer)} ({full} inputs over tensor_parallel_size={full // input_size}): "
                "a group would straddle two ranks; use a smaller tensor_parallel_size or a checkpoint "
                f"whose group size divides {input_size}"
            )
        num_groups = input_size // group if split else full // group
        return cls(
            num_groups=num_groups,
            first_group=rank * num_groups if split else 0,
            split=split,
            uneven=split_inputs and act_order and group_size != -1,
            input_start=rank * input_size if split_inputs else 0,
            input_size=full,
        )

    def loader_attrs(self, layer: nn.Module, group_dim: int) -> dict[str, Any]:
        """The loader of a scales / zeros tensor whose `group_dim` holds the groups: the layer's
        own (whole along the inputs) unless the rows are cut per rank."""
        if not self.split:
            return {}
        return {"weight_loader": _load_rank_groups, "group_dim": group_dim, "tp_rank": layer.tp_rank,
                "tp_size": layer.tp_size}

    def check_g_idx(self, layer: nn.Module, g_idx: torch.Tensor) -> None:
        """After loading: every input's group must be one of this rank's rows."""
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= self.num_groups):
            where = (f" (on this rank: groups [{self.first_group}, {self.first_group + self.num_groups}) "
                     "of a checkpoint whose g_idx is not in order, though desc_act is false)") if self.split else ""
            raise ValueError(f"g_idx holds groups outside [0, {self.num_groups}) in {layer_name(layer)}{where}")
# --8<-- [end:rank_groups]


def g_idx_param(layer: nn.Module, input_size: int, groups: RankGroups) -> nn.Parameter:
    """[K on this rank] int32, no output dim: every part of a fused layer (q, k, v) carries the
    whole g_idx, and they must agree, since one matmul serves them all."""
    g_idx = nn.Parameter(torch.empty(input_size, dtype=torch.int32), requires_grad=False)
    set_weight_attrs(g_idx, weight_loader=_load_g_idx, groups=groups, loaded=False)
    return g_idx


def _load_rank_groups(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """This rank's rows of a row-parallel layer's scales / zeros (`RankGroups.split`)."""
    if shard_id is not None:
        raise ValueError(f"a row-parallel layer has no fused shards, got shard id {shard_id!r}")
    dim, rows = param.group_dim, param.shape[param.group_dim]
    full = list(param.shape)
    full[dim] = rows * param.tp_size
    if tuple(loaded_weight.shape) != tuple(full):
        raise WeightShapeError(tuple(loaded_weight.shape), tuple(full))
    default_weight_loader(param, loaded_weight.narrow(dim, param.tp_rank * rows, rows))


def _load_g_idx(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """This rank's inputs of g_idx, as this rank's group rows (`RankGroups`). The first shard of
    a fused layer sets it; every later one must carry the same (q, k and v were quantized on the
    same inputs, so act-order gives them the same permutation)."""
    groups: RankGroups = param.groups
    if tuple(loaded_weight.shape) != (groups.input_size,):
        raise WeightShapeError(tuple(loaded_weight.shape), (groups.input_size,))
    mine = loaded_weight.narrow(0, groups.input_start, param.shape[0]).to(param.dtype) - groups.first_group
    if not param.loaded:
        param.data.copy_(mine)
        param.loaded = True
    elif not torch.equal(param.data, mine):
        raise ValueError(
            f"g_idx of shard {shard_id!r} differs from its fused neighbours': parts of one fused "
            "layer (q/k/v, gate/up) must share one act-order permutation"
        )
