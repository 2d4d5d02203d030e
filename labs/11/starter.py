"""Lab 11: the batched LoRA op: each token adds its own adapter's low-rank update.

Fill in `add_lora_reference` and `bgmv_add_lora` below; `FOLOVLLM_LAB=starter pytest stages/11`
grades them (they replace the functions of the same name in `folovllm/lora/punica_wrapper.py`,
in every module that imported them, while stage 11's tests run). Read labs/11/README.md first.

    y[t] += ((x[t] · A_iᵀ) · B_iᵀ) · scale_i      for the tokens t of adapter (slot) i
             \\_ shrink _/  \\_ expand _/            slot -1: the base model, nothing added

    lora_a  [S, P*R, in]      the P fused parts' A side by side along the rank
    lora_b  P x [S, out_p, R] one B per part; part p's output is columns
                              [sum(out_0..out_{p-1}), + out_p) of y
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# The engine functions these replace (module:function).
REPLACES = {
    "add_lora_reference": "folovllm.lora.punica_wrapper:add_lora_reference",
    "bgmv_add_lora": "folovllm.lora.punica_wrapper:bgmv_add_lora",
}


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: Sequence[torch.Tensor], token_slots: torch.Tensor,
                       scales: Optional[torch.Tensor] = None) -> None:
    """y [T, sum(out_p)] += each token's adapter update, one adapter at a time (in place).

    lora_a [S, P*R, in], lora_b P x [S, out_p, R], token_slots [T] (-1: base), scales [S]."""
    # TODO 1: for each slot present in token_slots (skip -1), the boolean mask of its tokens.
    # TODO 2: shrink: h = x[rows] @ A[slot]ᵀ -> [n, P*R], times scales[slot] if scales is given.
    # TODO 3: expand part by part: h's columns [p*R, (p+1)*R) @ B_p[slot]ᵀ, added in place to
    #         y's columns of part p (they follow each other: offset += out_p).
    raise NotImplementedError("not implemented: see labs/11/README.md")


def bgmv_add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: Sequence[torch.Tensor], token_idx: Optional[torch.Tensor],
                  token_slots: torch.Tensor, scales: Optional[torch.Tensor] = None) -> None:
    """Decode: every adapted token t gathers A[slot_t] and B[slot_t]; one batched matrix-vector
    product per part does all tokens, however many adapters they use. `token_idx` [T'] are the
    adapted tokens (None: all of them), `token_slots` [T'] their slots."""
    # TODO 1: the adapted tokens' inputs xs [T', in] (all of x when token_idx is None).
    # TODO 2: gather each token's A: lora_a.index_select(0, token_slots) -> [T', P*R, in]; one
    #         bmm with xs as [T', in, 1] -> h [T', P*R, 1]; times each token's scale if given.
    # TODO 3: per part, gather B_p per token [T', out_p, R], bmm with h's rows of the part ->
    #         [T', out_p]; put the parts side by side -> [T', out].
    # TODO 4: add to y: in place for all tokens, or index_add_ at token_idx.
    raise NotImplementedError("not implemented: see labs/11/README.md")
