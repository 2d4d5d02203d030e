"""`SpecDecodingStats` (stage 09): what speculation did in a step, and summed over steps
(vLLM's `SpecDecodingStats`, vllm/v1/spec_decode/metrics.py).

    num_drafts                  rows that verified at least one draft
    num_draft_tokens            drafts verified
    num_accepted_tokens         drafts the target agreed with (the rejection sampler's count,
                                before a stop inside the run cuts it)
    num_accepted_tokens_per_pos [k]: how often the draft at position j was accepted; falls with
                                j, since a draft counts only when every one before it did

    acceptance_rate      = accepted / draft tokens
    mean_accepted_length = 1 + accepted / drafts: tokens a row commits per target forward pass
                           (the 1 is the target's own token, which every row gets)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class SpecDecodingStats:
    num_spec_tokens: int = 0  # k
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    @classmethod
    def new(cls, num_spec_tokens: int) -> "SpecDecodingStats":
        return cls(num_spec_tokens=num_spec_tokens, num_accepted_tokens_per_pos=[0] * num_spec_tokens)

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """One row verified `num_draft_tokens` drafts and accepted the first `num_accepted_tokens`."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for pos in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[pos] += 1

    def __add__(self, other: "SpecDecodingStats") -> "SpecDecodingStats":
        k = max(self.num_spec_tokens, other.num_spec_tokens)
        per_pos = [a + b for a, b in zip(_pad(self.num_accepted_tokens_per_pos, k),
                                          _pad(other.num_accepted_tokens_per_pos, k))]
        return SpecDecodingStats(k, self.num_drafts + other.num_drafts,
                                 self.num_draft_tokens + other.num_draft_tokens,
                                 self.num_accepted_tokens + other.num_accepted_tokens, per_pos)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


def _pad(values: Sequence[int], k: int) -> list[int]:
    return list(values) + [0] * (k - len(values))
