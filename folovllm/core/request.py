"""`Request`: one sequence being generated, and the vocabulary the whole engine shares.

Every request has `num_tokens` (prompt + generated so far) and `num_computed_tokens` (tokens
whose K/V is already in the KV cache). Each engine step computes some of the tokens that are not
computed yet::

    prompt: [p0 p1 p2 p3 p4]  output: [o0 o1]
            |<---- num_computed_tokens=6 ---->|
            |<------------- num_tokens=7 ------------->|
                                              ^ o1 is the next token to compute (decode)

A prefill is computing 5 of 5 missing tokens; a decode is computing the 1 missing token; stage 05's
chunked prefill computes part of them; stage 06's prefix hit starts `num_computed_tokens` above 0.
When `num_computed_tokens == num_tokens` after a step, the logits of the last token give the next
token.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Optional

import torch

from folovllm.core.block_hash import BlockHash
from folovllm.outputs import RequestMetrics
from folovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from folovllm.lora.request import LoRARequest
    from folovllm.structured_output.request import StructuredOutputRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # stage 10: its grammar is compiling in a worker thread; the scheduler passes over it
    # (vLLM's WAITING_FOR_FSM)
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its KV dropped (stage 03)
    FINISHED_STOPPED = "finished_stopped"  # EOS, stop token id or stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"  # its step raised (see `LLMEngine._execute_model`)

    @property
    def finished(self) -> bool:
        # by value: a str's hash is cached, an Enum member's is computed in Python (read for
        # every row several times a step)
        return self._value_ in _FINISHED_VALUES

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASON.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}
_FINISHED_VALUES = frozenset(status.value for status in _FINISHED)
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A single sequence: its tokens, how many are computed, its sampling state and metrics."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float,
        prompt: Optional[str] = None,
        device: str = "cpu",
        lora_request: Optional["LoRARequest"] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.lora_request = lora_request  # stage 11: the adapter it runs under (None: the base)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.output_text = ""  # detokenized output, cut at a stop string
        self.error: Optional[str] = None  # why it failed (status FINISHED_ERROR)
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        # Stage 06: the hash of each full block of `all_token_ids`, in order, appended by the
        # prefix cache as blocks fill (prompt and output alike); empty without prefix caching.
        self.block_hashes: list[BlockHash] = []
        # Stage 09: draft tokens to verify in the next step (set by the engine's `Drafter` after
        # each step's update, for requests that decode next); never part of `all_token_ids`.
        self.spec_token_ids: list[int] = []
        # A per-request generator makes seeded sampling independent of the batch around it.
        self.generator: Optional[torch.Generator] = None
        # Stage 10: its grammar (`StructuredOutputManager.add_request`), None without one.
        self.structured_output_request: Optional["StructuredOutputRequest"] = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator(device).manual_seed(sampling_params.seed)

    # --8<-- [start:request_lengths]
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)
    # --8<-- [end:request_lengths]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
