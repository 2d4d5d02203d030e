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


# A step whose adapters have at most this many tokens each (decodes, small chunks) runs SGMV as
# one padded batched matmul: a handful of ops whatever the number of adapters, where a loop over
# segments pays the per-op cost (tens of microseconds on a CPU) 1 + P times per adapter.
PADDED_MAX_TOKENS = 16


@dataclass
class PaddedSegments:
    """The segments as one [segments, longest, ...] batch for `torch.bmm`::

        token slots [ 1  0  1  1  0 ]    slots = [0, 1] (None when every slot is used in order)
        src         [ 1  4  1 | 0  2  3 ]   the tokens of each segment, padded with its first
        valid_pos   [ 0  1  3  4  5 ]      the real rows of the padded batch ...
        valid_tok   [ 1  4  0  2  3 ]      ... and the token each one is
    """

    slots: Optional[torch.Tensor]
    longest: int
    src: torch.Tensor
    valid_pos: torch.Tensor
    valid_tok: torch.Tensor


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
    padded: Optional[PaddedSegments] = None

    def table(self) -> torch.Tensor:
        """[K, 3] int64 (slot, start, end) per segment: the C++ kernel's form of the layout."""
        rows = list(zip(self.slots, self.starts, self.ends))
        return torch.tensor(rows, dtype=torch.long).view(-1, 3)

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device,
                         num_slots: Optional[int] = None) -> "SGMVSegments":
        """The layout of `token_slots`; with `num_slots` (the stacks' first dimension), also
        the padded one when every adapter has at most `PADDED_MAX_TOKENS` tokens."""
        segments = cls._grouped(token_slots, device)
        by_slot: dict[int, list[int]] = {}
        for t, slot in enumerate(token_slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append(t)
        if num_slots is None or len(by_slot) < 2 or max(map(len, by_slot.values())) > PADDED_MAX_TOKENS:
            return segments
        slots = sorted(by_slot)
        longest = max(map(len, by_slot.values()))
        src, valid_pos, valid_tok = [], [], []
        for k, slot in enumerate(slots):
            tokens = by_slot[slot]
            valid_pos += range(k * longest, k * longest + len(tokens))
            valid_tok += tokens
            src += tokens + [tokens[0]] * (longest - len(tokens))
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        segments.padded = PaddedSegments(None if slots == list(range(num_slots)) else as_long(slots),
                                         longest, as_long(src), as_long(valid_pos), as_long(valid_tok))
        return segments

    @classmethod
    def _grouped(cls, token_slots: list[int], device: torch.device) -> "SGMVSegments":
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
    tokens as a block: matrix-matrix products, as many as adapters in the step. When every
    segment is short (decodes), the segments go padded into one batched matmul instead."""
    if segments.padded is not None:
        return _padded_sgmv(y, x, lora_a, lora_b, segments.padded, scales)
    rank = lora_b[0].shape[-1]
    order = segments.order
    xs = x if order is None else x.index_select(0, order)  # [T', in] grouped by slot
    for slot, s, e in zip(segments.slots, segments.starts, segments.ends):
        h = xs[s:e] @ lora_a[slot].T  # shrink: [n, P*R]
        if scales is not None:
            h.mul_(scales[slot])
        if order is None:  # the segment is rows s:e of y: expand in place, part by part
            offset = 0
            for p, b in enumerate(lora_b):
                y[s:e, offset:offset + b.shape[1]].addmm_(h[:, p * rank:(p + 1) * rank], b[slot].T)
                offset += b.shape[1]
        else:  # scattered rows: expand, then add to them
            parts = [h[:, p * rank:(p + 1) * rank] @ b[slot].T for p, b in enumerate(lora_b)]
            y.index_add_(0, order[s:e], parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
# --8<-- [end:sgmv]


def _padded_sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: Sequence[torch.Tensor],
                 pad: PaddedSegments, scales: Optional[torch.Tensor]) -> None:
    """SGMV as one bmm per step: [S', n, in] x [S', in, P*R] -> [S', n, P*R] (shrink), then one
    bmm per part (expand), n = the longest segment; padding rows are computed and dropped."""
    rank = lora_b[0].shape[-1]
    pick = (lambda w: w) if pad.slots is None else (lambda w: w.index_select(0, pad.slots))  # noqa: E731
    xs = x.index_select(0, pad.src).view(-1, pad.longest, x.shape[1])  # [S', n, in]
    h = torch.bmm(xs, pick(lora_a).transpose(1, 2))  # shrink: [S', n, P*R]
    if scales is not None:
        h.mul_(pick(scales).view(-1, 1, 1))
    parts = [torch.bmm(h[..., p * rank:(p + 1) * rank], pick(b).transpose(1, 2))  # [S', n, out_p]
             for p, b in enumerate(lora_b)]
    delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    y.index_add_(0, pad.valid_tok, delta.view(-1, y.shape[1]).index_select(0, pad.valid_pos))


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


# --8<-- [start:kernels]
def kernel_stacks(lora_a: torch.Tensor, lora_b: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stacks as the C++ kernels read them, k-major: Aᵀ [S, in, P*R] (rows may be padded
    in memory: each row's stride W >= P*R) and P x Bᵀ [S, R, out_p]. The layers store the slots
    this way (`LinearWithLoRA`), so for them these are views, not copies."""
    at = lora_a.transpose(1, 2)  # [S, in, P*R]
    if not (at.stride(2) == 1 and at.stride(1) >= at.shape[2] and at.stride(0) == at.shape[1] * at.stride(1)):
        at = torch.empty(at.shape, dtype=at.dtype, device=at.device).copy_(at)
    bts = [b.transpose(1, 2) for b in lora_b]  # [S, R, out_p]
    return at, [bt if bt.is_contiguous() else bt.contiguous() for bt in bts]


def full_ranks(lora_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """[S, P] int64, every part of every slot at the stacks' rank R (the padded computation)."""
    return torch.full((lora_b[0].shape[0], len(lora_b)), lora_b[0].shape[2], dtype=torch.long)


def sgmv_add_lora_cpu(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: Sequence[torch.Tensor], segment_table: torch.Tensor,
                      order: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                      ranks: Optional[torch.Tensor] = None) -> None:
    """`sgmv_add_lora` in one C++ call (folovllm/csrc/cpu/lora.cpp): blocks of a segment's
    tokens share each vector of Aᵀ and Bᵀ; no gather, no temporaries, one call per layer
    whatever the number of adapters. `segment_table` is `SGMVSegments.table()`; `ranks` [S, P]
    each slot's true rank per part (None: all R), the only ranks computed."""
    from folovllm._custom_ops import load_ops

    at, bts = kernel_stacks(lora_a, lora_b)
    load_ops().sgmv_add_lora(y, x, at, bts, full_ranks(lora_b) if ranks is None else ranks,
                             segment_table, order, scales)


def bgmv_add_lora_cpu(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: Sequence[torch.Tensor], token_slots: torch.Tensor,
                      scales: Optional[torch.Tensor] = None, ranks: Optional[torch.Tensor] = None) -> None:
    """`bgmv_add_lora` in one C++ call: each token [T] reads its slot's Aᵀ and Bᵀ in place (no
    [T, out, R] gather, which is what made BGMV in torch slow on a CPU); slot -1 rows are
    skipped. `token_slots` covers every token, base ones included. The same sums in the same
    order as `sgmv_add_lora_cpu`: bitwise the same y."""
    from folovllm._custom_ops import load_ops

    at, bts = kernel_stacks(lora_a, lora_b)
    load_ops().bgmv_add_lora(y, x, at, bts, full_ranks(lora_b) if ranks is None else ranks,
                             token_slots, scales)
# --8<-- [end:kernels]


class PunicaWrapper:
    """One step's token -> slot layout, shared by every LoRA layer of the model (set once per
    step by the worker's LoRA manager, read by each layer's `add_lora_linear`).

    A step with a prompt or a chunk in it takes SGMV, whose per-adapter blocks are the efficient
    shape when an adapter has many tokens. A decode step (every row one token) is where vLLM's
    GPU path takes BGMV: one kernel for any mix of adapters. On a CPU it is the slower of the
    two, measured both in torch ops (gathering each token's B copies out x R floats per token
    per layer, where SGMV reads each slot's B once) and in our C++ kernels (a token on its own
    re-reads its slot's A and B and cannot share them with the slot's other tokens: 8x the
    time of the C++ SGMV on a decode step; docs/stages/11-multi-lora.md), so `decode_kernel`
    defaults to "sgmv"; "bgmv" runs the Punica layout, for the lesson and for comparison.
    `use_kernel` (on when `custom_ops` resolves to "all") runs both as C++ calls
    (`csrc/cpu/lora.cpp`), one per layer whatever the number of adapters."""

    def __init__(self, device: torch.device, decode_kernel: str = "sgmv",
                 num_slots: Optional[int] = None, use_kernel: bool = False) -> None:
        if decode_kernel not in ("sgmv", "bgmv"):
            raise ValueError(f"decode_kernel must be 'sgmv' or 'bgmv', got {decode_kernel!r}")
        self.device = device
        self.decode_kernel = decode_kernel
        self.num_slots = num_slots  # max_loras: lets short segments run as one padded bmm
        self.use_kernel = use_kernel
        self.no_lora = True
        self.use_bgmv = False
        self.segments: Optional[SGMVSegments] = None
        self.segment_table: Optional[torch.Tensor] = None  # the kernel's [K, 3] layout
        self.token_idx: Optional[torch.Tensor] = None
        self.token_slots: Optional[torch.Tensor] = None

    # --8<-- [start:update_metadata]
    def update_metadata(self, row_slots: Sequence[int], query_lens: Sequence[int]) -> None:
        """Row slots (-1: base) and each row's token count -> the step's layout."""
        self.no_lora = all(slot < 0 for slot in row_slots)
        if self.no_lora:
            return
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
        decode = all(q == 1 for q in query_lens)
        self.use_bgmv = self.decode_kernel == "bgmv" and decode
        if self.use_kernel:  # the C++ kernels skip base tokens themselves
            if self.use_bgmv:
                self.token_slots = as_long(list(row_slots))
            else:
                token_slots = [slot for slot, q in zip(row_slots, query_lens) for _ in range(q)]
                self.segments = SGMVSegments.from_token_slots(token_slots, self.device)
                self.segment_table = self.segments.table()
            return
        if self.use_bgmv:  # one token per row: the row's slot is the token's
            adapted = [t for t, slot in enumerate(row_slots) if slot >= 0]
            self.token_idx = None if len(adapted) == len(row_slots) else as_long(adapted)
            self.token_slots = as_long([row_slots[t] for t in adapted])
        else:
            token_slots = [slot for slot, q in zip(row_slots, query_lens) for _ in range(q)]
            self.segments = SGMVSegments.from_token_slots(token_slots, self.device, self.num_slots)
    # --8<-- [end:update_metadata]

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                        lora_b: Sequence[torch.Tensor], ranks: Optional[torch.Tensor] = None) -> None:
        """y [T, out] += each token's adapter term; `ranks` [S, P] each slot's true rank per part
        (the C++ kernels compute only those; the torch ops compute R and add the padding's zeros)."""
        if self.no_lora:
            return
        if self.use_kernel:
            if self.use_bgmv:
                bgmv_add_lora_cpu(y, x, lora_a, lora_b, self.token_slots, ranks=ranks)
            else:
                sgmv_add_lora_cpu(y, x, lora_a, lora_b, self.segment_table, self.segments.order, ranks=ranks)
        elif self.use_bgmv:
            bgmv_add_lora(y, x, lora_a, lora_b, self.token_idx, self.token_slots)
        else:
            sgmv_add_lora(y, x, lora_a, lora_b, self.segments)
