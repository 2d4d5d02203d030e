"""`SchedulerOutput`: one engine step's work, handed from the scheduler to the engine.

The engine sends the workers its rows as an `InputBatch` (plain lists, `worker/input_batch.py`)
and samples the rows that catch up. There is no "prefill step" or "decode step" here: every row
computes some of its request's missing tokens, and the counts say what kind of work that is::

    row  request  num_computed_tokens  num_new_tokens  request.num_tokens   what it is
    0    A        0                    5               5                    whole prompt   -> samples
    1    B        8                    1               9                    decode         -> samples
    2    C        0                    4               12                   prompt chunk   (stage 05)
                                                                                           no sample

A row *samples* (its last token goes through the LM head and the sampler) only when it catches
up: `num_computed_tokens + num_new_tokens == request.num_tokens`. Row 2 above does not, so it
draws no random numbers, and a seeded request gives the same tokens however its prompt is split.
That rule is `sampling_rows`, read by everyone who needs it: the engine, which samples those rows,
and the runner, which computes logits for them only (through the `InputBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from folovllm.core.request import Request


@dataclass
class SchedulerOutput:
    """The rows of one step, in order. Row i feeds the model tokens
    `[num_computed_tokens[i], num_computed_tokens[i] + query_lens[i])` of its sequence.

    Attributes:
        requests: the request of each row.
        num_new_tokens: tokens each row adds to the KV cache (its `num_computed_tokens` advances
            by this much); 0 for an idle row of a stage-01 static batch.
        num_computed_tokens: tokens already cached when the step starts = position of the row's
            first token.
        query_lens: tokens each row feeds the model, when that differs from `num_new_tokens`:
            stage 01 pads every prompt to the longest of its batch, and an idle row (a finished
            member of a static batch) recomputes its last cached token. None = equal.
        block_tables: the block ids of each row's request (so the worker never asks the KV
            cache manager; stage 08 sends them to every rank).
        scheduled_spec_decode_tokens: stage 09: request id -> the draft tokens its row verifies
            (vLLM's name). They come after the row's last committed token and count in its
            `num_new_tokens` (1 + len(drafts)); rows without drafts have no entry.
    """

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    query_lens: Optional[list[int]] = None
    block_tables: list[list[int]] = field(default_factory=list)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    def add_row(self, request: Request, num_new_tokens: int, block_table: list[int],
                spec_token_ids: Sequence[int] = ()) -> None:
        """A row that computes the next `num_new_tokens` of `request` (no padding), the last
        `len(spec_token_ids)` of them drafts (stage 09)."""
        self.requests.append(request)
        self.num_new_tokens.append(num_new_tokens)
        self.num_computed_tokens.append(request.num_computed_tokens)
        self.block_tables.append(block_table)
        if spec_token_ids:
            self.scheduled_spec_decode_tokens[request.request_id] = list(spec_token_ids)

    def row(self, i: int) -> "SchedulerOutput":
        """Row i alone, as a step of its own (to find which row makes a step fail)."""
        return SchedulerOutput(
            requests=[self.requests[i]],
            num_new_tokens=[self.num_new_tokens[i]],
            num_computed_tokens=[self.num_computed_tokens[i]],
            query_lens=None if self.query_lens is None else [self.query_lens[i]],
            block_tables=[self.block_tables[i]],
            scheduled_spec_decode_tokens={
                r.request_id: d for r in self.requests[i : i + 1]
                if (d := self.scheduled_spec_decode_tokens.get(r.request_id))},
        )

    @property
    def num_rows(self) -> int:
        return len(self.requests)

    def spec_token_ids(self, row: int) -> list[int]:
        """The drafts row `row` verifies (stage 09; [] for most rows)."""
        if not self.scheduled_spec_decode_tokens:  # no drafts this step: every row, several times a step
            return []
        return self.scheduled_spec_decode_tokens.get(self.requests[row].request_id, [])

    def query_len(self, row: int) -> int:
        return self.num_new_tokens[row] if self.query_lens is None else self.query_lens[row]

    @property
    def total_num_scheduled_tokens(self) -> int:
        """Tokens the model computes this step, padding included."""
        return sum(self.num_new_tokens if self.query_lens is None else self.query_lens)

    def catches_up(self, row: int) -> bool:
        """Does this row compute its request's last missing token (so it samples the next)?"""
        new = self.num_new_tokens[row] - len(self.spec_token_ids(row))  # drafts come after it
        return new > 0 and self.num_computed_tokens[row] + new == self.requests[row].num_tokens

    # --8<-- [start:sampling_rows]
    @property
    def sampling_rows(self) -> list[int]:
        """The rows that sample, in row order: the rows of the logits the executor returns and
        of the tokens the sampler draws. Read before the step's update (which appends the
        sampled tokens, after which no row catches up)."""
        return [row for row in range(self.num_rows) if self.catches_up(row)]
    # --8<-- [end:sampling_rows]

    def is_decode(self, row: int) -> bool:
        """A decode row computes one token past the prompt; an idle stage-01 row counts too
        (it is a decode row that computes nothing useful). Everything else is prompt work:
        a whole prompt, a chunk of it, or a preempted request's recompute."""
        new = self.num_new_tokens[row] - len(self.spec_token_ids(row))  # stage 09: 1 + drafts
        if new == 0:
            return True
        return new == 1 and self.num_computed_tokens[row] >= self.requests[row].num_prompt_tokens

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.query_len(i) for i in range(self.num_rows) if not self.is_decode(i))

    @property
    def num_decode_tokens(self) -> int:
        """Decode rows (a row verifying drafts, stage 09, counts once: its drafts are in
        `scheduled_spec_decode_tokens`)."""
        return sum(1 for i in range(self.num_rows) if self.is_decode(i))

    @property
    def num_idle_rows(self) -> int:
        """Rows that compute nothing that is kept (stage 01's finished batch members)."""
        return sum(1 for n in self.num_new_tokens if n == 0)
