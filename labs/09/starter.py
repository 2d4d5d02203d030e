"""Lab 09: speculative decoding: the n-gram lookup and the rejection rule.

Fill in `ngram_lookup` and `rejection_sample` below; `FOLOVLLM_LAB=starter pytest stages/09`
grades them (they replace `ngram_lookup` of `folovllm/spec_decode/ngram_proposer.py` and
`rejection_sample` of `folovllm/spec_decode/rejection_sampler.py`, in every module that imported
them, while stage 09's tests run). Read labs/09/README.md first.

    committed  ... t5 t6 t7 |                 request.all_token_ids
    drafts                  | d1 d2 d3        ngram_lookup: what followed the same n-gram before
    fed to the model   t7 d1 d2 d3            logits at all four positions
    target says        d1 d2 x  .             rejection_sample: keep d1 d2, reject d3, take x
"""

from __future__ import annotations

from typing import Sequence

import numpy as np  # noqa: F401  (vectorise the lookup: no loop over every position)
import torch

# The engine functions these replace (module:function).
REPLACES = {
    "ngram_lookup": "folovllm.spec_decode.ngram_proposer:ngram_lookup",
    "rejection_sample": "folovllm.spec_decode.rejection_sampler:rejection_sample",
}


def ngram_lookup(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """At most k tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (min_n <= n <= max_n) of `token_ids`; [] when none occurred."""
    # TODO 1: the longest n to try: at most max_n, and at most len(token_ids) - 1 (an earlier
    #         occurrence needs a token after it). Nothing to find: return [].
    # TODO 2: for every earlier end position j (0 .. L-2), the length of the match between the
    #         tokens ending at j and the suffix, up to n_max, in one array operation (numpy's
    #         sliding_window_view, or a loop over the n_max offsets, never over the positions).
    # TODO 3: the longest match n (below min_n: []); of the positions with that match, the
    #         most recent; return the (at most k) tokens after it.
    raise NotImplementedError("not implemented: see labs/09/README.md")


def rejection_sample(probs: torch.Tensor, draft_token_ids: torch.Tensor, num_drafts: torch.Tensor,
                     uniform: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch at once. probs [R, k+1, V] (row r's target distributions at its
    num_drafts[r] + 1 positions; the rest is padding), draft_token_ids [R, k], num_drafts [R],
    uniform [R, k] in [0, 1), noise [R, V] ~ Exp(1) -> tokens [R, k+1], num_tokens [R]: row r
    commits tokens[r, :num_tokens[r]].

        accepted  [1 1 0 1]     u_j < p_j(d_j), and j < num_drafts
        cumprod   [1 1 0 0]  -> num_accepted = 2: position 2 decides the last token
        position 2 rejected d3: draw from p_3 without d3 (the residual); none rejected: the
        bonus token from p_(k+1)"""
    # TODO 1: p_j(d_j) for every draft position ([R, k], `gather` on the last dimension), and
    #         which drafts are accepted: uniform < p(d), and only positions j < num_drafts[r].
    # TODO 2: num_accepted [R]: the accepted drafts before the first rejection (a cumulative
    #         product of the accepted mask does it without a loop).
    # TODO 3: the distribution of the deciding position num_accepted: p there, with the rejected
    #         draft's probability set to 0 when a draft was rejected (the residual max(p - q, 0)
    #         for a one-hot q); draw its token by the exponential race argmax(p / noise).
    # TODO 4: tokens [R, k+1]: the drafts, then the drawn token at position num_accepted; return
    #         them and num_accepted + 1.
    raise NotImplementedError("not implemented: see labs/09/README.md")
