"""`NgramProposer` (stage 09): prompt lookup decoding. If the last few tokens of a request
appeared earlier in its prompt or output, guess that what followed them then follows now.

Copy-heavy work (editing a file, quoting a document, repeating a table's structure) repeats
long runs of the context, and the lookup costs no model at all. The rule (vLLM's
`NgramProposer`, from Saxena's prompt lookup decoding): the longest suffix n-gram with
n in [prompt_lookup_min, prompt_lookup_max] that occurred earlier; of its occurrences, the most
recent; the k tokens after it::

    tokens   a b c d x y b c d e f . . . b c d       suffix "b c d" (n = 3)
    ends at        ^ j=3       ^ j=8               earlier occurrences end at 3 and 8
    drafts                       e f . .           the most recent: the tokens after j = 8

Vectorised over the context (numpy): every earlier position j gets the length of the match
ending there, read off one [L-1, n_max] comparison::

    windows[j] = tokens[j-n_max+1 .. j]      (left-padded with -1)
    eq[j, i]   = windows[j][i] == suffix[i]  (suffix = the last n_max tokens)
    run[j]     = how many of eq[j] are True counting from the right end = match length at j
    n = max(run) (>= prompt_lookup_min), j = the last j with run[j] == n -> drafts tokens[j+1 :]

The drafts have q = 1 on their token (a deterministic guess), which is what the rejection
sampler assumes for them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from folovllm.core.request import Request
from folovllm.spec_decode.config import SpeculativeConfig
from folovllm.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    def __init__(self, spec_config: SpeculativeConfig) -> None:
        self.k = spec_config.num_speculative_tokens
        self.min_n = spec_config.prompt_lookup_min
        self.max_n = spec_config.prompt_lookup_max

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        return [
            ngram_lookup(r.all_token_ids, self.min_n, self.max_n, min(self.k, m)) if m > 0 else []
            for r, m in zip(requests, max_drafts)
        ]


# --8<-- [start:ngram_lookup]
def ngram_lookup(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """At most k tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (min_n <= n <= max_n) of `token_ids`; [] when none occurred."""
    num_tokens = len(token_ids)
    n_max = min(max_n, num_tokens - 1)
    if n_max < min_n or k <= 0:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    # Earlier n-grams end at j = 0 .. L-2 (so at least one token follows them).
    padded = np.concatenate([np.full(n_max - 1, -1, dtype=np.int64), tokens[:-1]])
    windows = sliding_window_view(padded, n_max)  # [L-1, n_max]: windows[j] ends at tokens[j]
    eq = windows == tokens[num_tokens - n_max:]  # [L-1, n_max]
    run = np.cumprod(eq[:, ::-1], axis=1).sum(axis=1)  # [L-1] match length ending at j
    n = int(run.max())
    if n < min_n:
        return []
    j = num_tokens - 2 - int(np.argmax(run[::-1] == n))  # the most recent with the longest match
    return tokens[j + 1 : j + 1 + k].tolist()
# --8<-- [end:ngram_lookup]
