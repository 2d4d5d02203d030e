"""Lab 07: GPTQ's int4 packing: eight 4-bit codes in one int32.

Fill in `pack_int32` and `unpack_int32` below; `FOLOVLLM_LAB=starter pytest stages/07` grades
them (they replace the functions of the same name in
`folovllm/model_executor/layers/quantization/gptq.py`, in every module that imported them: the
quantizer that writes checkpoints and the kernels that read them, while stage 07's tests run).
Read labs/07/README.md first.

    int32 qweight[r, n]:  | k=8r+7 | k=8r+6 | ... | k=8r+1 | k=8r+0 |       (bits = 4)
                          bit 31                               bit 0
"""

from __future__ import annotations

import torch

# The engine functions these replace (module:function).
REPLACES = {
    "pack_int32": "folovllm.model_executor.layers.quantization.gptq:pack_int32",
    "unpack_int32": "folovllm.model_executor.layers.quantization.gptq:unpack_int32",
}


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes into int32, 32 / bits of them per word along `dim`
    (0 for qweight: along the inputs; 1 for qzeros: along the outputs). Code j of a word goes to
    bits [j*bits, (j+1)*bits)."""
    # TODO 1: move `dim` last and group it by 32 / bits: [..., L] -> [..., L / pf, pf].
    # TODO 2: shift code j left by j * bits and add the codes of each word up (no bits overlap,
    #         so + is |). Work in int64: code 7 of a 4-bit word lands in bit 31, the int32 sign.
    # TODO 3: the same 32 bits as an int32 (a word >= 2^31 is negative in int32), moved back to
    #         `dim`, contiguous.
    raise NotImplementedError("not implemented: see labs/07/README.md")


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 words -> int32 codes in [0, 2^bits), `dim` grows by
    32 / bits."""
    # TODO 1: move `dim` last, and give each word a new last axis of 32 / bits shifts.
    # TODO 2: shift right by j * bits and keep the low `bits` bits (`>>` on a negative int32
    #         copies the sign bit in from the left: the mask drops it).
    # TODO 3: flatten the two last axes ([..., W, pf] -> [..., W * pf]) and move it back to `dim`.
    raise NotImplementedError("not implemented: see labs/07/README.md")
