"""`LogprobsProcessor`: one request's log-probabilities as users get them (vLLM's
`vllm/v1/engine/logprobs.py`).

The sampler scores positions in plain lists (`LogprobsLists`: per position the scored token, then
the batch's top k, best first). Each position becomes vLLM's dict of token id ->
`Logprob(logprob, rank, decoded_token)`, keeping the request's own k::

    scored token 412, k = 2:  token_ids [412, 7, 30]  logprobs [-0.9, -0.5, -0.8]  rank 3
    ->  {412: Logprob(-0.9, 3, " the"), 7: Logprob(-0.5, 1, ","), 30: Logprob(-0.8, 2, " a")}

When the scored token is among the top k, its one entry is the top-k one (same numbers), so a
position holds k or k + 1 entries. `logprobs=0` leaves the scored token alone.

Prompt positions arrive as their rows are computed, chunk by chunk (stage 05); position j
scores prompt token j + 1, so `prompt_logprobs[j + 1]` is filled from it and entry 0 stays None.
A preempted request computes its prompt again: positions already held are not added twice.
"""

from __future__ import annotations

from typing import Callable, Optional

from folovllm.outputs import Logprob, PromptLogprobs, SampleLogprobs
from folovllm.sampling_params import SamplingParams
from folovllm.worker.sampler import LogprobsLists

Decode = Callable[[list[int]], list[str]]  # token ids -> each one decoded alone


class LogprobsProcessor:
    def __init__(self, params: SamplingParams, decode: Decode) -> None:
        self.num_logprobs = params.logprobs
        self.num_prompt_logprobs = params.prompt_logprobs
        self.decode = decode
        self.logprobs: Optional[SampleLogprobs] = None if params.logprobs is None else []
        self.cumulative_logprob: Optional[float] = None if params.logprobs is None else 0.0
        self.sampled_logprobs: list[float] = []  # each generated token's own, for `trim`
        self.prompt_logprobs: Optional[PromptLogprobs] = None if params.prompt_logprobs is None else [None]

    def add_sampled(self, lists: LogprobsLists) -> None:
        """The positions of the tokens a step generated: one, or with drafts (stage 09) one per
        committed token, in order."""
        assert self.logprobs is not None and self.cumulative_logprob is not None
        self.logprobs += self._dicts(lists, self.num_logprobs)
        for position in lists.logprobs:  # one addition per token, as one token a step adds
            self.cumulative_logprob += position[0]
        self.sampled_logprobs += [position[0] for position in lists.logprobs]

    def trim(self, num_output_tokens: int) -> None:
        """Keep the first `num_output_tokens` positions. Stage 09: a stop inside an accepted
        run (a stop token, a stop string, max_tokens) cuts tokens that were already scored;
        the cumulative log-probability is summed again over the kept ones, in the same order,
        so it is the number a run without drafts gives."""
        if self.logprobs is None or len(self.logprobs) <= num_output_tokens:
            return
        del self.logprobs[num_output_tokens:]
        del self.sampled_logprobs[num_output_tokens:]
        self.cumulative_logprob = 0.0
        for logprob in self.sampled_logprobs:
            self.cumulative_logprob += logprob

    def add_prompt(self, first_position: int, lists: LogprobsLists) -> None:
        """Prompt positions first_position, first_position + 1, ...: they score prompt tokens
        first_position + 1, ..."""
        assert self.prompt_logprobs is not None
        held = len(self.prompt_logprobs) - 1 - first_position  # positions recomputed after a preemption
        assert held >= 0, "prompt positions arrive in order"
        self.prompt_logprobs += self._dicts(lists[held:], self.num_prompt_logprobs)

    def _dicts(self, lists: LogprobsLists, k: Optional[int]) -> list[dict[int, Logprob]]:
        """Each position -> {token id: Logprob}: the scored token with its rank, then the top
        `k` (-1: every one the sampler gathered) with ranks 1..k."""
        size = None if k == -1 else 1 + k
        ids = [row[:size] for row in lists.token_ids]
        texts = iter(self.decode([t for row in ids for t in row]))
        out = []
        for row_ids, row_logprobs, rank in zip(ids, lists.logprobs, lists.ranks):
            ranks = [rank, *range(1, len(row_ids))]
            out.append({t: Logprob(lp, r, next(texts)) for t, lp, r in zip(row_ids, row_logprobs, ranks)})
        return out
