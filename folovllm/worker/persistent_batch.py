"""The persistent input batch: each request's tokens and block ids kept *on the worker*, and
each step sent as a diff of it (vLLM v1's `NewRequestData` / `CachedRequestData` and its
worker-side `InputBatch`, `v1/core/sched/output.py` and `v1/worker/gpu_input_batch.py`).

The plain path (`InputBatch`, input_batch.py) sends every row's block table every step, and the
runner converts those Python lists to tensors every step: O(rows x blocks) a step, 4,096 block
ids at 16 rows of 4,096 tokens (block size 16), pickled once per tensor-parallel rank. Here the
engine's `InputBatchSender` remembers what the workers were sent and sends each request once in
full, then only what changed::

    step 1   new    A: tokens a0..a4, blocks [3 4]        (NewRequestData)
    step 2   cached A: new tokens [a5], new blocks []     (CachedRequestData: the sampled token)
    ...
    step 9   cached A: new tokens [a12], new blocks [9]   (A crossed a block boundary)
    step 10  finished [A]

and each worker's `PersistentInputBatch` patches its table with it (every tensor-parallel rank
the same way, from the same message)::

    req_id_to_index {"A": 0, "B": 1}
    token_ids_cpu  [max_num_reqs, max_model_len]   row 0: a0 a1 ... a12 0 0 ...
    block_table    [max_num_reqs, max_blocks]      row 0: 3 4 9 0 0 ...

`InputBuffers.prepare_inputs_from_table` then gathers the step's rows, in the step's order, from
it: the same numbers as `InputBuffers.prepare_inputs` on the whole `InputBatch` (the reference,
kept; `tests/test_persistent_batch.py` drives both through random steps and compares them).

Safety. The sender numbers its messages (`generation`); a diff says which generation it applies
on (`base_generation`) and a worker that holds another one refuses it with an error instead of
computing on a table that differs from the engine's. Any exception while a step runs (the
engine's fault guard then reruns its rows one by one) makes the sender forget what it sent: the
next message starts from an empty table (`base_generation = -1`) with every row in full. A
preempted request comes back with `resumed_from_preemption` and its whole block table (its old
blocks were freed); a prefix hit is a new request's full block table. The draft model's runner
(stage 09) keeps sending plain `InputBatch`es to its own runner: the table is per runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch

from folovllm.worker.input_batch import InputBatch

if TYPE_CHECKING:
    from folovllm.config import EngineConfig
    from folovllm.core.request import Request
    from folovllm.lora.request import LoRARequest


class _PickledAsTuple:
    """Pickled as its class and its field values, in order (no field names): the message is
    pickled once per tensor-parallel rank every step, and a name costs as much as a number."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]


class StaleInputBatchError(RuntimeError):
    """A diff was built on a table this worker does not hold (it missed or failed a step)."""


@dataclass
class NewRequestData(_PickledAsTuple):
    """A request the worker has not seen (or must see again in full): its tokens up to the end
    of this step's real tokens (a prompt chunk's end, or the whole prompt) and all its block
    ids (a prefix hit's cached blocks included)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class CachedRequestData(_PickledAsTuple):
    """The rows of requests the worker holds, column by column (vLLM's layout): the tokens
    appended since it was last sent (a decode: the one token the engine sampled; the worker
    samples nothing, so it cannot know it) and the block ids allocated since; with
    `resumed_from_preemption`, `new_block_ids` is the whole table, replacing the old one."""

    req_ids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    resumed_from_preemption: list[bool] = field(default_factory=list)


@dataclass
class InputBatchDiff(_PickledAsTuple):
    """One step for a worker holding a `PersistentInputBatch`: the per-row fields of
    `InputBatch` (O(rows)), with `token_ids` and `block_tables` replaced by what changed.

    Attributes:
        req_ids, num_computed_tokens, query_lens, sampling_rows, prompt_logits,
            num_draft_tokens, lora_slots, lora_requests: as in `InputBatch`, the step's rows
            in the step's order.
        scheduled_new_reqs: requests sent in full (added before the cached ones are patched).
        scheduled_cached_reqs: what changed for requests the worker holds.
        finished_req_ids: requests to drop (finished, aborted, failed), before anything else.
        spec_token_ids: row -> its draft tokens (stage 09), written after its real tokens;
            never kept as the request's tokens (a rejected draft is overwritten later).
        unpadded_lens: row -> its real tokens, for stage 01's padded rows only (the rest of
            the row is filled with a dummy id, as the reference does).
        generation: this message's number.
        base_generation: the generation the worker must hold to apply it; -1: start from an
            empty table (the first message, and every message after a failed step).
    """

    req_ids: list[str]
    num_computed_tokens: list[int]
    query_lens: list[int]
    sampling_rows: list[int]
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    finished_req_ids: list[str]
    generation: int
    base_generation: int
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)
    unpadded_lens: dict[int, int] = field(default_factory=dict)
    prompt_logits: dict[int, int] = field(default_factory=dict)
    num_draft_tokens: dict[int, int] = field(default_factory=dict)
    lora_slots: list[int] = field(default_factory=list)
    lora_requests: dict[int, "LoRARequest"] = field(default_factory=dict)

    # the same questions `InputBatch` answers (the runner, LoRA and the logits indices ask them)
    num_logits = InputBatch.num_logits
    num_rows = InputBatch.num_rows
    query_len = InputBatch.query_len


StepBatch = Union[InputBatch, InputBatchDiff]  # what `ModelRunner.execute_model` accepts


# -- the engine's side ------------------------------------------------------------------------

@dataclass
class _Sent:
    """What the workers hold of one request, as far as the sender knows."""

    request: "Request"
    num_tokens: int  # its tokens [0, num_tokens) are in the worker's row
    num_blocks: int
    last_block: int  # the id of its last block sent (-1: none): a cheap check that the table only grew
    num_preemptions: int


class NoInputBatchSender:
    """persistent_input_batch off: every step goes as the whole `InputBatch` (the reference)."""

    def make_message(self, batch: InputBatch, requests: Sequence["Request"]) -> StepBatch:
        return batch

    def invalidate(self) -> None:
        pass


class InputBatchSender(NoInputBatchSender):
    """Turns each step's `InputBatch` into the diff against what the workers were sent."""

    def __init__(self) -> None:
        self.generation = 0
        self.sent: dict[str, _Sent] = {}
        self.in_sync = False  # False: the next message resets the workers' tables

    def invalidate(self) -> None:
        """A step failed somewhere between here and the workers: send everything next time."""
        self.in_sync = False

    # --8<-- [start:make_message]
    def make_message(self, batch: InputBatch, requests: Sequence["Request"]) -> InputBatchDiff:
        """The diff that brings the workers' tables to this step: O(rows + new tokens + new
        blocks). `requests` are the rows' requests, in row order."""
        reset = not self.in_sync
        if reset:
            self.sent.clear()
        # finished requests leave the table; a finished row still in the step (a stage-01 idle
        # row of a static batch) stays until it is not
        finished = [rid for rid, s in self.sent.items() if s.request.is_finished]
        if finished:
            in_step = {r.request_id: r for r in requests}
            finished = [rid for rid in finished if in_step.get(rid) is not self.sent[rid].request]
            for rid in finished:
                del self.sent[rid]
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData()
        spec: dict[int, list[int]] = {}
        unpadded: dict[int, int] = {}
        drafts_of, query_lens, sent_of = batch.num_draft_tokens, batch.query_lens, self.sent
        for row, (request, tokens, start, table) in enumerate(
                zip(requests, batch.token_ids, batch.num_computed_tokens, batch.block_tables)):
            num_drafts = drafts_of.get(row, 0) if drafts_of else 0
            if num_drafts:
                spec[row] = tokens[-num_drafts:]
            num_fed = len(tokens)
            if num_fed < query_lens[row]:
                unpadded[row] = num_fed  # stage 01's padding follows
            end = start + num_fed - num_drafts  # one past the row's last real token
            rid = request.request_id
            sent = sent_of.get(rid)
            last_block = table[-1] if table else -1
            if sent is None or sent.request is not request:  # (a request id can be reused)
                new_reqs.append(NewRequestData(rid, request.all_token_ids[:end], list(table)))
                sent_of[rid] = _Sent(request, end, len(table), last_block, request.num_preemptions)
                continue
            n = sent.num_blocks
            resumed = (request.num_preemptions != sent.num_preemptions or len(table) < n
                       or (n > 0 and table[n - 1] != sent.last_block))
            cached.req_ids.append(rid)
            cached.new_token_ids.append(request.all_token_ids[sent.num_tokens:end] if end > sent.num_tokens else [])
            cached.new_block_ids.append(list(table) if resumed else table[n:])
            cached.resumed_from_preemption.append(resumed)
            if end > sent.num_tokens:
                sent.num_tokens = end
            sent.num_blocks, sent.num_preemptions, sent.last_block = len(table), request.num_preemptions, last_block
        base, self.generation, self.in_sync = (-1 if reset else self.generation), self.generation + 1, True
        return InputBatchDiff(
            req_ids=batch.req_ids, num_computed_tokens=batch.num_computed_tokens,
            query_lens=batch.query_lens, sampling_rows=batch.sampling_rows,
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached, finished_req_ids=finished,
            generation=self.generation, base_generation=base, spec_token_ids=spec,
            unpadded_lens=unpadded, prompt_logits=batch.prompt_logits,
            num_draft_tokens=batch.num_draft_tokens, lora_slots=batch.lora_slots,
            lora_requests=batch.lora_requests,
        )
    # --8<-- [end:make_message]


def make_input_batch_sender(config: "EngineConfig") -> NoInputBatchSender:
    return InputBatchSender() if config.persistent_input_batch else NoInputBatchSender()


# -- the worker's side ------------------------------------------------------------------------

def _grown(array: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, np.ndarray]:
    """A zeroed int64 [rows, cols] tensor and its numpy view, `array` copied into its corner."""
    tensor = torch.zeros((rows, cols), dtype=torch.long)
    view = tensor.numpy()
    view[: array.shape[0], : array.shape[1]] = array
    return tensor, view


class PersistentInputBatch:
    """The worker's table of requests (vLLM's worker `InputBatch` with its `BlockTable`): one
    row per request it holds, rows [0, num_reqs) dense after `condense`. Token ids and block
    ids live in preallocated int64 tensors, patched in place through numpy views; both grow
    by doubling (rows, columns) when a request needs more. Invariant: a row's block ids past its
    `num_blocks` are 0 (so a gathered block table is zero-padded as the reference's). Token
    ids past `num_tokens` may hold an earlier step's drafts: only positions the step writes or
    knows are read."""

    def __init__(self, max_num_reqs: int = 16, max_model_len: int = 512, max_num_blocks: int = 32) -> None:
        self.token_ids_cpu_tensor, self.token_ids_cpu = _grown(np.zeros((0, 0), np.int64), max_num_reqs, max_model_len)
        self.block_table_cpu_tensor, self.block_table_cpu = _grown(np.zeros((0, 0), np.int64), max_num_reqs,
                                                                   max_num_blocks)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)  # tokens known per row
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.req_ids: list[Optional[str]] = [None] * max_num_reqs  # row -> request (None: empty)
        self.req_id_to_index: dict[str, int] = {}
        self.num_reqs = 0  # rows in use: [0, num_reqs) after condense
        self.generation = -1  # of the last diff applied; -1: none (or one failed half-way)
        self._rows_of: tuple[list[str], np.ndarray] | None = None  # row_indices' last answer

    @property
    def max_num_reqs(self) -> int:
        return self.token_ids_cpu.shape[0]

    def _ensure(self, rows: int = 0, tokens: int = 0, blocks: int = 0) -> None:
        """Room for `rows` rows, `tokens` tokens and `blocks` blocks a row (doubling)."""
        r, t, b = self.max_num_reqs, self.token_ids_cpu.shape[1], self.block_table_cpu.shape[1]
        if rows > r:
            r = max(rows, 2 * r)
            self.num_tokens = np.concatenate([self.num_tokens, np.zeros(r - len(self.num_tokens), np.int64)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros(r - len(self.num_blocks), np.int64)])
            self.req_ids += [None] * (r - len(self.req_ids))
        if rows > self.token_ids_cpu.shape[0] or tokens > t:
            self.token_ids_cpu_tensor, self.token_ids_cpu = _grown(self.token_ids_cpu, r, max(tokens, 2 * t) if tokens > t else t)
        if rows > self.block_table_cpu.shape[0] or blocks > b:
            self.block_table_cpu_tensor, self.block_table_cpu = _grown(self.block_table_cpu, r, max(blocks, 2 * b) if blocks > b else b)

    def clear(self) -> None:
        self._rows_of = None  # rows move
        self.token_ids_cpu[: self.num_reqs] = 0
        self.block_table_cpu[: self.num_reqs] = 0
        self.num_tokens[:] = 0
        self.num_blocks[:] = 0
        self.req_ids = [None] * self.max_num_reqs
        self.req_id_to_index.clear()
        self.num_reqs = 0

    # --8<-- [start:apply]
    def apply(self, diff: InputBatchDiff) -> None:
        """Patch the table to the step `diff` describes: drop finished requests (and condense),
        add new ones, append the rest's new tokens and blocks, write this step's drafts."""
        if diff.base_generation < 0:
            self.clear()
        elif diff.base_generation != self.generation:
            raise StaleInputBatchError(
                f"this worker's input batch is at generation {self.generation}, the step's diff "
                f"applies to generation {diff.base_generation}: a step was missed or failed here; "
                "the engine sends the whole batch again after a failed step")
        self.generation = -1  # until this diff is fully applied
        if diff.finished_req_ids:
            self.condense([self.remove_request(rid) for rid in diff.finished_req_ids])
        for new in diff.scheduled_new_reqs:
            self.add_request(new)
        cached = diff.scheduled_cached_reqs
        index = self.req_id_to_index
        # a decode row's one new token, for all of them at once (the common case, every step)
        one_rows: list[int] = []
        one_tokens: list[int] = []
        for rid, tokens, blocks, resumed in zip(cached.req_ids, cached.new_token_ids, cached.new_block_ids,
                                                cached.resumed_from_preemption):
            row = index[rid]
            if len(tokens) == 1:
                one_rows.append(row)
                one_tokens.append(tokens[0])
            elif tokens:
                self._append_tokens(row, tokens)
            if resumed:  # its old blocks were freed: a new table
                self.block_table_cpu[row, : self.num_blocks[row]] = 0
                self.num_blocks[row] = 0
            if blocks:
                self._append_blocks(row, blocks)
        if one_rows:
            rows = np.array(one_rows, dtype=np.int64)  # [n] distinct rows
            ends = self.num_tokens[rows]  # [n] where each token goes
            self._ensure(tokens=int(ends.max()) + 1)
            self.token_ids_cpu[rows, ends] = one_tokens
            self.num_tokens[rows] = ends + 1
        for row, drafts in diff.spec_token_ids.items():  # after the row's real tokens, not kept
            end = diff.num_computed_tokens[row] + diff.query_lens[row]
            self._ensure(tokens=end)
            self.token_ids_cpu[self.req_id_to_index[diff.req_ids[row]], end - len(drafts) : end] = drafts
        self.generation = diff.generation
    # --8<-- [end:apply]

    def add_request(self, new: NewRequestData) -> None:
        self._rows_of = None  # rows move
        row = self.req_id_to_index.get(new.req_id)
        if row is None:  # a request sent in full again (after a reset) keeps its row
            row = self.num_reqs
            self._ensure(rows=row + 1)
            self.num_reqs += 1
            self.req_ids[row] = new.req_id
            self.req_id_to_index[new.req_id] = row
        self.token_ids_cpu[row, : self.num_tokens[row]] = 0
        self.block_table_cpu[row, : self.num_blocks[row]] = 0
        self.num_tokens[row] = self.num_blocks[row] = 0
        self._append_tokens(row, new.token_ids)
        self._append_blocks(row, new.block_ids)

    def _append_tokens(self, row: int, tokens: list[int]) -> None:
        start = int(self.num_tokens[row])
        self._ensure(tokens=start + len(tokens))
        self.token_ids_cpu[row, start : start + len(tokens)] = tokens
        self.num_tokens[row] = start + len(tokens)

    def _append_blocks(self, row: int, blocks: list[int]) -> None:
        start = int(self.num_blocks[row])
        self._ensure(blocks=start + len(blocks))
        self.block_table_cpu[row, start : start + len(blocks)] = blocks
        self.num_blocks[row] = start + len(blocks)

    def remove_request(self, req_id: str) -> int:
        """Empty the request's row (zeroed: the invariant) -> its index, a hole until
        `condense`."""
        row = self.req_id_to_index.pop(req_id)
        self._rows_of = None
        self.token_ids_cpu[row, : self.num_tokens[row]] = 0
        self.block_table_cpu[row, : self.num_blocks[row]] = 0
        self.num_tokens[row] = self.num_blocks[row] = 0
        self.req_ids[row] = None
        return row

    def condense(self, empty_req_indices: list[int]) -> None:
        """Move the last rows into the holes so the rows in use are [0, num_reqs) again
        (vLLM's `InputBatch.condense`): O(holes x row width), only when requests leave."""
        holes = sorted(empty_req_indices)
        self._rows_of = None
        last = self.num_reqs - 1
        for hole in holes:
            while last >= 0 and self.req_ids[last] is None:
                last -= 1
            if last <= hole:
                break
            rid = self.req_ids[last]
            assert rid is not None
            nt, nb = int(self.num_tokens[last]), int(self.num_blocks[last])
            self.token_ids_cpu[hole, :nt] = self.token_ids_cpu[last, :nt]
            self.block_table_cpu[hole, :nb] = self.block_table_cpu[last, :nb]
            self.token_ids_cpu[last, :nt] = 0
            self.block_table_cpu[last, :nb] = 0
            self.num_tokens[hole], self.num_blocks[hole] = nt, nb
            self.num_tokens[last] = self.num_blocks[last] = 0
            self.req_ids[hole], self.req_ids[last] = rid, None
            self.req_id_to_index[rid] = hole
            last -= 1
        self.num_reqs = len(self.req_id_to_index)

    def row_indices(self, req_ids: list[str]) -> np.ndarray:
        """The table rows of a step's rows, in the step's order: [B]. Kept while the rows are
        the same requests in the same order and no row moved (most decode steps)."""
        if self._rows_of is not None and self._rows_of[0] == req_ids:
            return self._rows_of[1]
        index = self.req_id_to_index
        rows = np.fromiter((index[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        self._rows_of = (list(req_ids), rows)
        return rows
