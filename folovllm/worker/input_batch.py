"""`InputBatch`: one step as the workers see it, in plain lists (no `Request` objects).

The engine builds it from the step's `SchedulerOutput` (`LLMEngine.make_input_batch`), the
executor hands it to every rank (pickled down one pipe per rank at stage 08), and the model
runner lays it out as tensors. It holds what a forward pass reads, row by row::

    row  req_id  token_ids          num_computed_tokens  query_len  block_table  samples
    0    "A"     [a0 a1 a2 a3 a4]   0                    5          [3, 4]       yes (whole prompt)
    1    "B"     [b8]               8                    1          [0, 7, 2]    yes (decode)
    2    "C"     [c0 c1 c2 c3]      0                    4          [5]          no  (a chunk)
                                                  (block size 4)    sampling_rows = [0, 1]
                                                                    prompt_logits = {2: 4}

A request with `prompt_logprobs` also needs the logits of its prompt positions (position j
scores prompt token j + 1): `prompt_logits` maps such a row to how many of its first tokens go
through the LM head too (row 2 above: all four; a row that ends the prompt: all but its last,
whose logits are its sampling row's). No entry, no extra logits.

A decode row carries one token id and its block table, however long its request is: the tokens
already in the KV cache are not sent again, nor anything else a `Request` carries (every token,
block hashes, sampling state, metrics, text). Sampling needs none of this on the workers: the
engine samples (the rows that sample are `SchedulerOutput.sampling_rows`, copied here so the
runner knows which hidden states reach the LM head).

vLLM's `InputBatch` (`v1/worker/gpu_input_batch.py`) is the same table kept *on* the worker and
patched each step by the scheduler's diffs (`NewRequestData` once per request, then only new
token and block ids). Ours is built whole every step, and is what the workers get with
`persistent_input_batch=False` (the reference); by default the engine sends its diff instead
(`InputBatchDiff`, persistent_batch.py), so the block tables, the part that grows with context
(one id per block), are sent once per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from folovllm.lora.request import LoRARequest


@dataclass
class InputBatch:
    """The rows of one step, in the order of the `SchedulerOutput` they come from.

    Attributes:
        req_ids: the request id of each row (for reading a step, not for computing it).
        token_ids: the tokens each row feeds the model, its request's tokens from
            `num_computed_tokens` on: `query_lens[i]` of them, or fewer when stage 01 pads the
            row (the runner fills the rest). A row that samples ends at its request's last
            token, so its last entry is the token whose logits it samples from.
        num_computed_tokens: the position of each row's first token.
        query_lens: tokens each row feeds the model, padding included.
        block_tables: the block ids of each row's request.
        sampling_rows: the rows that sample, in order: the first rows of the logits returned.
        prompt_logits: row -> how many of its first tokens also return their logits (prompt
            log-probabilities), after the sampling rows', in row order.
        num_draft_tokens: stage 09: sampling row -> the draft tokens that end its `token_ids`.
            Such a row returns the logits of its last 1 + k tokens (the last committed one and
            each draft), not of its last token alone. No entry: one.
        lora_slots: stage 11: the LoRA slot each row's tokens read (-1: the base model); empty
            when no row has an adapter (or LoRA is off).
        lora_requests: stage 11: slot -> the adapter that must be in it for this step.
    """

    req_ids: list[str]
    token_ids: list[list[int]]
    num_computed_tokens: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    sampling_rows: list[int]
    prompt_logits: dict[int, int] = field(default_factory=dict)
    num_draft_tokens: dict[int, int] = field(default_factory=dict)
    lora_slots: list[int] = field(default_factory=list)
    lora_requests: dict[int, "LoRARequest"] = field(default_factory=dict)

    def num_logits(self, row: int) -> int:
        """How many of a sampling row's last tokens return logits: 1, or 1 + its drafts."""
        return 1 + self.num_draft_tokens.get(row, 0)

    @property
    def num_rows(self) -> int:
        return len(self.req_ids)

    def query_len(self, row: int) -> int:
        return self.query_lens[row]
