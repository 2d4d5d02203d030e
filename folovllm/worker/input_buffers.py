"""`InputBuffers`: the model runner's preallocated host tensors, filled in place each step by
bulk numpy operations (vLLM's `CpuGpuBuffer`s in `v1/worker/gpu_model_runner.py`).

`ModelRunner.prepare_inputs` and `AttentionMetadata.from_lists` are the plain reference: a
Python loop over rows building lists, then `torch.tensor(list)` for every input, a dozen small
tensor ops for the slot mapping, each step. That is cheap per row but not per step: on a
16-row decode it was about 0.2 ms of the step's host time, more than the scheduler. Here the
same numbers come from a few numpy calls over whole arrays, written into buffers allocated
once (grown by doubling when a step needs more, so a steady run allocates no tensor at all),
and the tensors handed to the model are views of those buffers::

    rows (decode, decode, a 3-token chunk):  query_lens [1 1 3]   num_computed [8 4 0]
    query_start_loc  = [0 1 2 5]                       cumsum of query_lens
    row of token     = [0 1 2 2 2]                     repeat(arange(B), query_lens)
    positions        = [8 4 0 1 2]                     num_computed[row] + (token - query_start[row])
    slot_mapping     = block_tables[row, pos // bs] * bs + pos % bs

`tests/test_input_buffers.py` compares every tensor with the reference on random batches (rows
reordered and removed between steps, block tables longer than the buffers, padding, drafts,
prompt logits). The buffers belong to one runner and are overwritten by its next step: nothing
may keep a step's inputs or metadata past the step (nothing does: each step builds its own).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from folovllm.model_executor.layers.attention import AttentionMetadata
from folovllm.worker.input_batch import InputBatch
from folovllm.worker.persistent_batch import InputBatchDiff, PersistentInputBatch

PAD_TOKEN_ID = 0  # any valid id: padded tokens are computed and thrown away (stage 01)


class CpuGpuBuffer:
    """One int64 buffer: a host tensor and its numpy view (the same memory), and on a GPU a
    device twin that the filled part is copied to. Grows by doubling; `grow_count` says how
    often it had to (a steady run: never after its first steps). The last view handed out is
    kept and handed out again while the step's size does not change (a decode step after a
    decode step of as many rows): a torch slice costs microseconds, as much as filling it."""

    def __init__(self, size: int, device: str) -> None:
        self.device = torch.device(device)
        self.grow_count = 0
        self._allocate(max(size, 1))

    def _allocate(self, size: int) -> None:
        self.cpu = torch.zeros(size, dtype=torch.long)
        self.np = self.cpu.numpy()  # shares cpu's memory: numpy writes are the tensor's
        self.gpu = None if self.device.type == "cpu" else torch.zeros(size, dtype=torch.long, device=self.device)
        self._view_shape: tuple[int, ...] = ()
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # (host, device) views

    def ensure(self, n: int) -> np.ndarray:
        """Room for n entries; -> the numpy view of the first n (to fill in place)."""
        if n > self.cpu.shape[0]:
            self._allocate(max(n, 2 * self.cpu.shape[0]))
            self.grow_count += 1
        return self.np[:n]

    def tensor(self, *shape: int) -> torch.Tensor:
        """The first prod(shape) entries, viewed as `shape`, on the runner's device: a view of
        the host buffer on CPU, else its device twin after a copy."""
        if shape != self._view_shape or self._views is None:
            n = shape[0] if len(shape) == 1 else shape[0] * shape[1]
            host = self.cpu[:n].view(shape)
            self._views = (host, host if self.gpu is None else self.gpu[:n].view(shape))
            self._view_shape = shape
        host, device = self._views
        if device is not host:
            device.copy_(host, non_blocking=True)
        return device


@dataclass
class StepInputs:
    """What `InputBuffers.prepare_inputs` returns: the model's inputs and the common metadata."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [S + P]
    attn_metadata: AttentionMetadata
    # logits_indices is every token in order (a decode step where every row samples): the
    # hidden states need no gather before the LM head
    logits_of_every_token: bool = False


class BlockTableRows(Sequence[list[int]]):
    """`AttentionMetadata.block_tables_cpu` of a step prepared from the persistent table: row b
    as a list only when asked (the prefill rows' attention asks; decode rows never do), so a
    decode step converts no block ids to Python ints. Each row is zero-padded to the width."""

    def __init__(self, tables: np.ndarray) -> None:
        self.tables = tables  # [B, W]

    def __len__(self) -> int:
        return self.tables.shape[0]

    def __getitem__(self, b):  # type: ignore[override]
        return self.tables[b].tolist()


def ragged_arange(starts: np.ndarray, counts: np.ndarray, arange: np.ndarray) -> np.ndarray:
    """The concatenation of range(starts[i], starts[i] + counts[i]) for every i, in bulk::

        starts [4 9], counts [2 3] -> [4 5 9 10 11]
        = repeat(starts - [0 2], counts) + arange(5)     ([0 2]: where each range begins)
    """
    offsets = np.cumsum(counts) - counts  # [n] where each range begins in the result
    return np.repeat(starts - offsets, counts) + arange[: int(counts.sum())]


class InputBuffers:
    """The runner's host buffers and the bulk preparation of one step (see the module docstring).

    The sizes are starting points; a step needing more grows the buffer it overflows."""

    def __init__(self, block_size: int, device: str, max_num_tokens: int = 1024,
                 max_num_reqs: int = 64, max_blocks_per_req: int = 64) -> None:
        self.block_size = block_size
        self.device = device
        self.input_ids = CpuGpuBuffer(max_num_tokens, device)
        self.positions = CpuGpuBuffer(max_num_tokens, device)
        self.slot_mapping = CpuGpuBuffer(max_num_tokens, device)
        self.logits_indices = CpuGpuBuffer(max_num_reqs, device)
        self.query_start_loc = CpuGpuBuffer(max_num_reqs + 1, device)
        self.seq_lens = CpuGpuBuffer(max_num_reqs, device)
        # flat [B * W] and viewed as [B, W] each step: contiguous whatever this step's width W
        self.block_tables = CpuGpuBuffer(max_num_reqs * max_blocks_per_req, device)
        self._arange = np.arange(max(max_num_tokens, max_num_reqs * max_blocks_per_req), dtype=np.int64)

    @property
    def buffers(self) -> dict[str, CpuGpuBuffer]:
        """Every buffer by name (tests read their `grow_count`)."""
        return {name: b for name, b in vars(self).items() if isinstance(b, CpuGpuBuffer)}

    def arange(self, n: int) -> np.ndarray:
        """0, 1, 2, ... at least n long (kept: the ragged layouts all start from it)."""
        if n > self._arange.shape[0]:
            self._arange = np.arange(max(n, 2 * self._arange.shape[0]), dtype=np.int64)
        return self._arange

    # --8<-- [start:bulk_prepare_inputs]
    def prepare_inputs(self, batch: InputBatch) -> StepInputs:
        """The step's input ids, positions, logits indices and common attention metadata: the
        numbers of `ModelRunner.prepare_inputs` and `AttentionMetadata.from_lists`, in bulk."""
        num_rows = batch.num_rows
        num_tokens, qsl, positions, row_of_token, decode_only = self._layout(batch)

        input_ids = self.input_ids.ensure(num_tokens)
        flat_ids = list(itertools.chain.from_iterable(batch.token_ids))
        real_lens: np.ndarray | None = None  # None: every row's tokens fill its query_len
        if len(flat_ids) == num_tokens:
            input_ids[:] = flat_ids
        else:  # stage 01 pads rows to the longest prompt: fill each row's tail with a dummy id
            real_lens = np.array([len(t) for t in batch.token_ids], dtype=np.int64)
            input_ids[:] = PAD_TOKEN_ID
            input_ids[ragged_arange(qsl[:-1], real_lens, self.arange(num_tokens))] = flat_ids

        # block tables [B, W], zero-padded: rows of one length in one copy, else one scatter
        table_lens = [len(t) for t in batch.block_tables]
        width = max(table_lens)
        flat_tables = self.block_tables.ensure(num_rows * width)
        flat_blocks = list(itertools.chain.from_iterable(batch.block_tables))
        if len(flat_blocks) == num_rows * width:
            flat_tables[:] = flat_blocks
        else:
            flat_tables[:] = 0
            arange = self.arange(num_rows * width)
            flat_tables[ragged_arange(arange[:num_rows] * width, np.array(table_lens), arange)] = flat_blocks
        return self._finish(batch, num_tokens, qsl, positions, row_of_token, decode_only, real_lens,
                            width, batch.block_tables)
    # --8<-- [end:bulk_prepare_inputs]

    # --8<-- [start:prepare_inputs_from_table]
    def prepare_inputs_from_table(self, table: PersistentInputBatch, diff: InputBatchDiff) -> StepInputs:
        """The same as `prepare_inputs`, the token ids and block tables gathered from the
        worker's persistent table (`diff` applied to it already) instead of converted from
        the step's lists: a few numpy gathers, O(tokens + rows x width) in C."""
        num_rows = diff.num_rows
        num_tokens, qsl, positions, row_of_token, decode_only = self._layout(diff)
        rows = table.row_indices(diff.req_ids)  # [B] the table row of each step row

        # token t of the step is token positions[t] of its request's row of the table
        if diff.unpadded_lens:  # stage 01's padding may reach past the tokens the table has room for
            table._ensure(tokens=int(self.seq_lens.np[:num_rows].max()))
        token_table = table.token_ids_cpu  # [R, L]
        input_ids = self.input_ids.ensure(num_tokens)
        token_rows = rows if decode_only else rows[row_of_token]  # [T] (decode: token b is row b)
        np.take(token_table.reshape(-1), token_rows * token_table.shape[1] + positions, out=input_ids)
        real_lens: np.ndarray | None = None
        if diff.unpadded_lens:  # stage 01: a dummy id after each padded row's real tokens
            real_lens = np.array(diff.query_lens, dtype=np.int64)
            for row, n in diff.unpadded_lens.items():
                real_lens[row] = n
                input_ids[qsl[row] + n : qsl[row + 1]] = PAD_TOKEN_ID

        # block tables [B, W]: the rows' table rows, their first W ids (zero past each row's own)
        width = int(table.num_blocks[rows].max())
        flat_tables = self.block_tables.ensure(num_rows * width)
        np.take(table.block_table_cpu[:, :width], rows, axis=0, out=flat_tables.reshape(num_rows, width))
        return self._finish(diff, num_tokens, qsl, positions, row_of_token, decode_only, real_lens, width,
                            BlockTableRows(flat_tables.reshape(num_rows, width)))
    # --8<-- [end:prepare_inputs_from_table]

    def _layout(self, batch: "InputBatch | InputBatchDiff") -> tuple[int, np.ndarray, np.ndarray, np.ndarray, bool]:
        """Fill the query starts, sequence lengths and positions -> (T, query_start_loc [B+1],
        positions [T], the row of each token [T], whether every row feeds one token)."""
        num_rows = batch.num_rows
        num_tokens = sum(batch.query_lens)
        arange = self.arange(max(num_tokens, num_rows + 1))
        starts = np.array(batch.num_computed_tokens, dtype=np.int64)  # [B] first positions
        qsl = self.query_start_loc.ensure(num_rows + 1)  # [B+1]
        seq_lens = self.seq_lens.ensure(num_rows)  # [B]
        positions = self.positions.ensure(num_tokens)  # [T]
        decode_only = num_tokens == num_rows and min(batch.query_lens) == 1
        if decode_only:  # one token a row: token b is row b, at the row's first position
            qsl[:] = arange[: num_rows + 1]
            np.add(starts, 1, out=seq_lens)
            positions[:] = starts
            row_of_token = arange[:num_rows]
        else:
            query_lens = np.array(batch.query_lens, dtype=np.int64)  # [B]
            qsl[0] = 0
            query_lens.cumsum(out=qsl[1:])
            np.add(starts, query_lens, out=seq_lens)
            # each token's row, then its position: the row's start + its offset in the row
            row_of_token = np.repeat(arange[:num_rows], query_lens)  # [T]
            np.add(starts[row_of_token], arange[:num_tokens] - qsl[row_of_token], out=positions)
        return num_tokens, qsl, positions, row_of_token, decode_only

    def _finish(self, batch: "InputBatch | InputBatchDiff", num_tokens: int, qsl: np.ndarray,
                positions: np.ndarray, row_of_token: np.ndarray, decode_only: bool,
                real_lens: np.ndarray | None, width: int, block_tables_cpu: Sequence[Sequence[int]]) -> StepInputs:
        """The slot mapping and logits indices from the filled buffers, and the step's views."""
        num_rows, bs = batch.num_rows, self.block_size
        flat_tables = self.block_tables.np[: num_rows * width]
        slot_mapping = self.slot_mapping.ensure(num_tokens)  # [T]
        np.add(flat_tables[row_of_token * width + positions // bs] * bs, positions % bs, out=slot_mapping)

        num_logits, every_token = self._logits_indices(batch, qsl, real_lens, decode_only)
        seq_lens_cpu = self.seq_lens.np[:num_rows].tolist()
        attn_metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping.tensor(num_tokens),
            query_start_loc=self.query_start_loc.tensor(num_rows + 1),
            seq_lens=self.seq_lens.tensor(num_rows),
            block_tables=self.block_tables.tensor(num_rows, width),
            max_query_len=max(batch.query_lens),
            max_seq_len=max(seq_lens_cpu),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens_cpu,
            block_tables_cpu=block_tables_cpu,  # type: ignore[arg-type]  (a Sequence of rows)
        )
        return StepInputs(self.input_ids.tensor(num_tokens), self.positions.tensor(num_tokens),
                          self.logits_indices.tensor(num_logits), attn_metadata, every_token)

    def _logits_indices(self, batch: "InputBatch | InputBatchDiff", qsl: np.ndarray, real_lens: np.ndarray | None,
                        decode_only: bool) -> tuple[int, bool]:
        """Fill the logits indices (the last 1 + drafts real tokens of each sampling row, then
        the prompt positions of `batch.prompt_logits`); -> how many, and whether they are every
        token of the step in order."""
        num_sampling = len(batch.sampling_rows)
        if decode_only and num_sampling == batch.num_rows and not batch.num_draft_tokens and not batch.prompt_logits:
            self.logits_indices.ensure(num_sampling)[:] = self._arange[:num_sampling]  # token b is row b
            return num_sampling, True
        num_tokens = int(qsl[batch.num_rows])
        if (batch.num_draft_tokens and num_sampling == batch.num_rows and not batch.prompt_logits
                and real_lens is None and num_sampling + sum(batch.num_draft_tokens.values()) == num_tokens):
            # stage 09: every row decodes and verifies its drafts (1 + k_i tokens, all scored):
            # every token of the step in order, as for plain decodes
            self.logits_indices.ensure(num_tokens)[:] = self._arange[:num_tokens]
            return num_tokens, True
        rows = np.array(batch.sampling_rows, dtype=np.int64)  # [S]
        # one past each sampling row's last real token
        ends = qsl[rows + 1] if real_lens is None else qsl[rows] + real_lens[rows]
        if not batch.num_draft_tokens and not batch.prompt_logits:  # one each
            np.subtract(ends, 1, out=self.logits_indices.ensure(num_sampling))
            return num_sampling, False
        counts = np.array([batch.num_logits(r) for r in batch.sampling_rows], dtype=np.int64)
        prompt_rows = sorted(batch.prompt_logits)
        starts = np.concatenate([ends - counts, qsl[prompt_rows]])
        counts = np.concatenate([counts, np.array([batch.prompt_logits[r] for r in prompt_rows], dtype=np.int64)])
        total = int(counts.sum())
        self.logits_indices.ensure(total)[:] = ragged_arange(starts, counts, self.arange(total))
        return total, False
