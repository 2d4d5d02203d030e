"""`Proposer` (stage 09). A minimal local copy of the shared interface (spec_interface.md);
the `spec` branch owns the real file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

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
