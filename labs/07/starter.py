"""Lab 07: GPTQ's int4 packing (eight 4-bit codes in one int32) and GPTQ's column update.

Part 1: fill in `pack_int32` and `unpack_int32` below; `FOLOVLLM_LAB=starter pytest stages/07` grades
them (they replace the functions of the same name in
`folovllm/model_executor/layers/quantization/gptq.py`, in every module that imported them: the
quantizer that writes checkpoints and the kernels that read them, while stage 07's tests run).
Read labs/07/README.md first.

    int32 qweight[r, n]:  | k=8r+7 | k=8r+6 | ... | k=8r+1 | k=8r+0 |       (bits = 4)
                          bit 31                               bit 0
"""

from __future__ import annotations

import torch

from folovllm.tools.gptq_quantizer import QuantizedWeight, minmax_params, quantize_column

# The engine functions these replace (module:function).
REPLACES = {
    "pack_int32": "folovllm.model_executor.layers.quantization.gptq:pack_int32",
    "unpack_int32": "folovllm.model_executor.layers.quantization.gptq:unpack_int32",
    "quantize": "folovllm.tools.gptq_quantizer:GPTQ.quantize",
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


# -- part 2: GPTQ's column update ------------------------------------------------------------------


def quantize(
    self, bits: int, group_size: int, sym: bool, desc_act: bool,
    damp: float = 0.01, block_size: int = 128,
) -> QuantizedWeight:
    """`GPTQ.quantize` (folovllm/tools/gptq_quantizer.py): round the [N, K] weight `self.weight`
    column by column, each column's rounding error spread over the columns not rounded yet,
    weighted by the inverse Hessian of the layer's inputs (`self.H`, accumulated by
    `add_batch`). The preparation and the packing of the result are given; the loop is yours.

        columns (in `perm` order), blocks of `block_size`, groups of `group_size`:

        | block 0                 | block 1                 | ...
        | q=0 q=1 ...             |                         |
          round q, err = (w_q - deq_q) / U[q, q]
          inside the block:  W1[:, q:] -= err * U[q, q:b1]         (now)
          right of the block: W[:, b1:] -= Err @ U[b0:b1, b1:]     (once, after the block)
    """
    W = self.weight.clone()  # [N, K], rounded column by column in place
    N, K = W.shape
    H = self.H.clone().float()
    dead = torch.diag(H) == 0  # inputs that were always 0: any weight is exact there
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]  # visit the columns in `perm` order
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    # U: upper Cholesky factor of H^-1. Row q of U (from q on) is the inverse Hessian row the
    # update needs once the columns before q are fixed, divided by sqrt([H_F^-1]_qq) = U[q, q].
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    group = K if group_size == -1 else group_size
    if group < K:  # blocks made of whole groups, so a group's grid sees its current weights
        block_size = max(block_size // group, 1) * group
    codes = torch.zeros(N, K, dtype=torch.long)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []

    # TODO 1: for each block [b0, b1) of columns: W1 = a copy of W[:, b0:b1] and Err = zeros
    #         like it.
    # TODO 2: for each column q of the block (i = q - b0): when q starts a group, the group's grid
    #         `scale, zero = minmax_params(next `group` columns of the weights *as updated so
    #         far*, bits, sym)` (they may run past b1: take them from W1[:, i:] then W[:, b1:]),
    #         appended to `scales` / `zeros`.
    # TODO 3: `c, deq = quantize_column(W1[:, i], scale, zero, bits)`; codes[:, q] = c;
    #         err = (W1[:, i] - deq) / U[q, q]; subtract err x U[q, q:b1] from W1[:, i:]; then
    #         W1[:, i] = deq and Err[:, i] = err.
    # TODO 4: after the block: W[:, b0:b1] = W1, and the lazy update of every column to its
    #         right, W[:, b1:] -= Err @ U[b0:b1, b1:].
    raise NotImplementedError("not implemented: see labs/07/README.md")

    inv = torch.argsort(perm)  # noqa: unreachable until the TODOs are done
    g_idx = (torch.arange(K) // group)[inv]  # group of each original input
    return QuantizedWeight(
        codes=codes[:, inv].t().contiguous(),  # [K, N]
        scales=torch.stack(scales).half(),  # [groups, N]
        zeros=torch.stack(zeros),
        g_idx=g_idx.to(torch.int32),
        dequantized=W[:, inv],
    )
