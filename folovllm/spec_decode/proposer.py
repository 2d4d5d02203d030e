"""`Proposer` (stage 09): the interface every drafter implements, and `Drafter`, which calls it
between steps.

After each step's update the engine asks the proposer for drafts for every request that will
decode next step; the scheduler then schedules `1 + len(drafts)` tokens for such a request, the
runner returns the logits of all of them, and the rejection sampler keeps the drafts the target
agrees with plus one token of its own::

    committed  ... t5 t6 t7 |                 request.all_token_ids (t7 not computed yet)
    drafts                  | d1 d2 d3        request.spec_token_ids (proposer, k = 3)
    fed to the model   t7 d1 d2 d3            positions 7..10, logits at all four
    target says        d1 d2 x  .             accept d1 d2, reject d3, take x instead
    committed  ... t5 t6 t7 d1 d2 x           3 tokens for one forward pass

    NgramProposer       ngram_proposer.py   prompt lookup in the request's own tokens
    DraftModelProposer  draft_model.py      a small model with the same tokenizer
    NullProposer        here                speculation off: proposes nothing

vLLM v1 keeps these in vllm/v1/spec_decode/ (`NgramProposer`, `EagleProposer`, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

from folovllm.core.request import Request


class Proposer(ABC):
    """Proposes draft tokens for running, decoding requests, after each step's update."""

    @abstractmethod
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """For each request (its committed tokens are request.all_token_ids), at most
        max_drafts[i] draft token ids (possibly none). Called once per step, for the requests
        that will decode next step."""

    def free(self, request_id: str) -> None:
        """The request left (finished, aborted or preempted): drop its state. Default: nothing."""


class NullProposer(Proposer):
    """Speculation off: no drafts, so every step is the plain one."""

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        return [[] for _ in requests]


# --8<-- [start:drafter]
class Drafter:
    """Between two steps: sets `request.spec_token_ids` of every running request (drafts for
    the ones that decode next step, none for the others) and tells the proposer which
    requests left since the last call (finished, aborted, preempted), so nothing leaks.

    A request never gets more drafts than it could commit: `k`, and then `max_tokens` and
    `max_model_len` leave room for the one token the target always adds::

        max_drafts = min(k, max_tokens - num_output_tokens - 1, max_model_len - num_tokens - 1)

    (The scheduler trims them further to the step's token budget and KV room.)

    `disable_by_batch_size` (vLLM's field): while that many requests or more are running, the
    next step drafts nothing and runs as plain decoding (the proposer is not called; a draft
    model catches up on the tokens it missed when drafting resumes)."""

    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_model_len: int,
                 disable_by_batch_size: Optional[int] = None) -> None:
        self.proposer = proposer
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.disable_by_batch_size = disable_by_batch_size
        self.known: set[str] = set()  # requests the proposer has seen and not been told to free

    def propose(self, running: Sequence[Request]) -> None:
        if not self.k:  # speculation off: nothing ever drafts (and nothing to free)
            return
        decoding = []
        for request in running:
            request.spec_token_ids = []
            if not request.is_finished and request.num_tokens - request.num_computed_tokens == 1:
                decoding.append(request)
        self.free(self.known - {r.request_id for r in running})
        if not decoding or self.disabled(running):
            return
        limits = [self.max_drafts(r) for r in decoding]
        for request, drafts, limit in zip(decoding, self.proposer.propose(decoding, limits), limits):
            request.spec_token_ids = [int(t) for t in drafts[:limit]]
        self.known.update(r.request_id for r in decoding)

    def disabled(self, running: Sequence[Request]) -> bool:
        """No drafts for the next step: the batch has reached `disable_by_batch_size`."""
        live = sum(not r.is_finished for r in running)
        return self.disable_by_batch_size is not None and live >= self.disable_by_batch_size

    def max_drafts(self, request: Request) -> int:
        left = self.max_model_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            left = min(left, max_tokens - request.num_output_tokens - 1)
        return max(0, min(self.k, left))

    def free(self, request_ids: set[str]) -> None:
        """These requests left: the proposer drops their state."""
        for request_id in request_ids & self.known:
            self.proposer.free(request_id)
            self.known.discard(request_id)
# --8<-- [end:drafter]
