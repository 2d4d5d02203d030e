"""The batched LoRA operation: every token adds its own adapter's low-rank update to a linear
layer's output, in one pass over a batch that mixes adapters (Punica, S-LoRA; vLLM's
`vllm/lora/punica_wrapper/` and `vllm/lora/ops/torch_ops/lora_ops.py`).

For the tokens t of adapter i (slot i), over one linear layer::

    y[t] += ((x[t] · A_iᵀ) · B_iᵀ) · scale_i        x [T, in], A_i [r, in], B_i [out, r]
             \_ shrink _/  \_ expand _/             base tokens (slot -1): nothing added

Each slot's A and B sit in stacked tensors zero-padded to the largest rank R (a rank-8 adapter
in a rank-16 slot has 8 zero rows of A and 8 zero columns of B, which add exactly zero), so one
indexing of the stack finds any adapter::

    lora_a  [slots, P*R, in]   the P fused parts' A side by side along the rank: one shrink for
                               q, k and v together (P = 3; gate/up: 2; o, down: 1)
    lora_b  P x [slots, out_p, R]   one expand per part, into its columns of y

Three ways to compute the same sum, all here:

    add_lora_reference   the lesson: a loop over the adapters present, boolean masks
    sgmv_add_lora        prefill: tokens grouped by slot (Segmented Gather Matrix-Vector), one
                         shrink and P expands per segment; no gather at all when each slot's
                         tokens are already one contiguous run
    bgmv_add_lora        decode: each token gathers its own A and B (Batched Gather
                         Matrix-Vector) and one bmm does every token at once, whatever the mix

A step is laid out once (`PunicaWrapper.update_metadata`) and read by every LoRA layer.
Tokens of the base model are in no segment and gather nothing: they cost nothing extra, and a
step with no adapter skips the whole thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


# --8<-- [start:reference]
def add_lora_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: Sequence[torch.Tensor], token_slots: torch.Tensor,
                       scales: Optional[torch.Tensor] = None) -> None:
    """y [T, sum(out_p)] += each token's adapter update, one adapter at a time (in place).

    lora_a [S, P*R, in], lora_b P x [S, out_p, R], token_slots [T] (-1: base), scales [S]."""
    rank = lora_b[0].shape[-1]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue  # the base model: no update
        rows = token_slots == slot  # [T] bool: this adapter's tokens
        h = x[rows] @ lora_a[slot].T  # shrink: [n, P*R]
        if scales is not None:
            h = h * scales[slot]
        offset = 0
        for p, b in enumerate(lora_b):  # expand each fused part into its columns of y
            y[rows, offset:offset + b.shape[1]] += h[:, p * rank:(p + 1) * rank] @ b[slot].T
            offset += b.shape[1]
# --8<-- [end:reference]


@dataclass
class SGMVSegments:
    """Tokens grouped by slot: segment k is rows [starts[k], ends[k]) of the grouped tokens,
    all of adapter `slots[k]`. `order` [T'] lists the non-base tokens grouped by slot (None:
    every slot's tokens are already one contiguous run of x, and the bounds index x itself).

        token slots  [ 1  1  1 -1 -1  0  0  1 ]      order = [5 6 0 1 2 7]
        grouped      [ 0  0 | 1  1  1  1 ]          slots = [0, 1], bounds (0,2) (2,6)
    """

    slots: list[int]
    starts: list[int]
    ends: list[int]
    order: Optional[torch.Tensor]

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device) -> "SGMVSegments":
        runs: list[tuple[int, int, int]] = []  # (slot, start, end) of equal slots in token order
        for t, slot in enumerate(token_slots):
            if runs and runs[-1][0] == slot and runs[-1][2] == t:
                runs[-1] = (slot, runs[-1][1], t + 1)
            else:
                runs.append((slot, t, t + 1))
        runs = [r for r in runs if r[0] >= 0]
        if len(runs) == len({r[0] for r in runs}):  # one run per slot: read x in place
            return cls([r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs], None)
        by_slot: dict[int, list[int]] = {}
        for t, slot in enumerate(token_slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append(t)
        slots, starts, ends, order = [], [], [], []
        for slot in sorted(by_slot):
            slots.append(slot)
            starts.append(len(order))
            order += by_slot[slot]
            ends.append(len(order))
        return cls(slots, starts, ends, torch.tensor(order, dtype=torch.long, device=device))


# --8<-- [start:sgmv]
def sgmv_add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: Sequence[torch.Tensor], segments: SGMVSegments,
                  scales: Optional[torch.Tensor] = None) -> None:
    """Prefill: one shrink [n, in] x [in, P*R] and P expands per segment (adapter), on its
    tokens as a block: matrix-matrix products, as many as adapters in the step."""
    rank = lora_b[0].shape[-1]
    gathered = segments.order is not None
    xs = x.index_select(0, segments.order) if gathered else x  # [T', in] grouped by slot
    out = y.new_zeros(xs.shape[0], y.shape[1]) if gathered else y
    for slot, s, e in zip(segments.slots, segments.starts, segments.ends):
        h = xs[s:e] @ lora_a[slot].T  # shrink: [n, P*R]
        if scales is not None:
            h.mul_(scales[slot])
        offset = 0
        for p, b in enumerate(lora_b):  # expand, added in place into y's columns of part p
            out[s:e, offset:offset + b.shape[1]].addmm_(h[:, p * rank:(p + 1) * rank], b[slot].T)
            offset += b.shape[1]
    if gathered:
        y.index_add_(0, segments.order, out)
# --8<-- [end:sgmv]


# --8<-- [start:bgmv]
def bgmv_add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: Sequence[torch.Tensor], token_idx: Optional[torch.Tensor],
                  token_slots: torch.Tensor, scales: Optional[torch.Tensor] = None) -> None:
    """Decode: every adapted token t gathers A[slot_t] and B[slot_t]; one batched matrix-vector
    product per part does all tokens, however many adapters they use. `token_idx` [T'] are the
    adapted tokens (None: all of them), `token_slots` [T'] their slots."""
    rank = lora_b[0].shape[-1]
    xs = x if token_idx is None else x.index_select(0, token_idx)  # [T', in]
    a = lora_a.index_select(0, token_slots)  # [T', P*R, in]
    h = torch.bmm(a, xs.unsqueeze(-1))  # shrink: [T', P*R, 1]
    if scales is not None:
        h.mul_(scales.index_select(0, token_slots).view(-1, 1, 1))
    parts = []
    for p, b in enumerate(lora_b):
        b_t = b.index_select(0, token_slots)  # [T', out_p, R]
        parts.append(torch.bmm(b_t, h[:, p * rank:(p + 1) * rank]).squeeze(-1))  # expand: [T', out_p]
    delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [T', out]
    if token_idx is None:
        y.add_(delta)
    else:
        y.index_add_(0, token_idx, delta)
# --8<-- [end:bgmv]


class PunicaWrapper:
    """One step's token -> slot layout, shared by every LoRA layer of the model (set once per
    step by the worker's LoRA manager, read by each layer's `add_lora_linear`).

    A step with a prompt or a chunk in it takes SGMV, whose per-adapter blocks are the efficient
    shape when an adapter has many tokens. A decode step (every row one token) is where vLLM's
    GPU path takes BGMV: one kernel for any mix of adapters. On a CPU it is the slower of the
    two, measured (docs/stages/11-multi-lora.md: gathering each token's B copies out x R floats
    per token per layer, where SGMV reads each slot's B once), so `decode_kernel` defaults to
    "sgmv"; "bgmv" runs the Punica layout, for the lesson and for comparison."""

    def __init__(self, device: torch.device, decode_kernel: str = "sgmv") -> None:
        if decode_kernel not in ("sgmv", "bgmv"):
            raise ValueError(f"decode_kernel must be 'sgmv' or 'bgmv', got {decode_kernel!r}")
        self.device = device
        self.decode_kernel = decode_kernel
        self.no_lora = True
        self.use_bgmv = False
        self.segments: Optional[SGMVSegments] = None
        self.token_idx: Optional[torch.Tensor] = None
        self.token_slots: Optional[torch.Tensor] = None

    # --8<-- [start:update_metadata]
    def update_metadata(self, row_slots: Sequence[int], query_lens: Sequence[int]) -> None:
        """Row slots (-1: base) and each row's token count -> the step's layout."""
        self.no_lora = all(slot < 0 for slot in row_slots)
        if self.no_lora:
            return
        self.use_bgmv = self.decode_kernel == "bgmv" and all(q == 1 for q in query_lens)
        if self.use_bgmv:  # one token per row: the row's slot is the token's
            adapted = [t for t, slot in enumerate(row_slots) if slot >= 0]
            as_long = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
            self.token_idx = None if len(adapted) == len(row_slots) else as_long(adapted)
            self.token_slots = as_long([row_slots[t] for t in adapted])
        else:
            token_slots = [slot for slot, q in zip(row_slots, query_lens) for _ in range(q)]
            self.segments = SGMVSegments.from_token_slots(token_slots, self.device)
    # --8<-- [end:update_metadata]

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                        lora_b: Sequence[torch.Tensor]) -> None:
        if self.no_lora:
            return
        if self.use_bgmv:
            bgmv_add_lora(y, x, lora_a, lora_b, self.token_idx, self.token_slots)
        else:
            sgmv_add_lora(y, x, lora_a, lora_b, self.segments)
