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

`ngram_lookup` is the rule over an array, vectorised: every earlier occurrence of a suffix
n-gram ends with the last token, so it starts from the positions j that hold it (one
comparison over the context) and grows the match to the left, one token at a time, over those
few candidates::

    tokens   a b c d x y b c d e f . . . b c d       last token d, L = 17
    ends     j = 3, 8                                tokens[j] == d        (match length >= 1)
    i = 1    j = 3, 8                                tokens[j-1] == c      (>= 2)
    i = 2    j = 3, 8                                tokens[j-2] == b      (>= 3)
    i = 3    none                                    tokens[j-3] == a?     no: n = 3
    drafts   the most recent j = 8: tokens[9 : 9 + k] = e f . .

The proposer runs between every two steps, so what it costs is paid by every step, drafts or
not (a step that drafts nothing must cost what a plain step costs). Measured in the engine
(benchmarks/stage09_step_phases.py), a handful of numpy calls on a few hundred tokens cost
70-100 us a step: small arrays, and caches the forward pass has just emptied. So the proposer
asks the same question of a byte string instead (`RequestTokens`): each request's tokens as
int32 bytes, appended to as it grows (a step converts only its new tokens), and the most recent
earlier occurrence of the last n tokens is one `bytearray.rfind` of their bytes, a C search
with no Python per token::

    data     [a][b][c][d][x][y][b][c][d][e][f] ... [b][c][d]      4 bytes a token
    rfind    the bytes of "b c d" in data[: 4 (L-1)]  -> byte 24 = token 6: ends at j = 8
             (a hit at a byte offset that is not a multiple of 4 straddles two tokens: search
             again to its left)

Longest n first (n_max down to min_n), and no search at all past the first: when the shortest
n-gram (min_n) never occurred, no longer one did, so a context with nothing to copy costs one
`rfind`. Tests check both against the rule written as loops.

The drafts have q = 1 on their token (a deterministic guess), which is what the rejection
sampler assumes for them.
"""

from __future__ import annotations

from array import array
from typing import Sequence

import numpy as np

from folovllm.core.request import Request
from folovllm.spec_decode.config import SpeculativeConfig
from folovllm.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    def __init__(self, spec_config: SpeculativeConfig) -> None:
        self.k = spec_config.num_speculative_tokens
        self.min_n = spec_config.prompt_lookup_min
        self.max_n = spec_config.prompt_lookup_max
        self.tokens: dict[str, RequestTokens] = {}  # request id -> its tokens as bytes

    # --8<-- [start:ngram_propose]
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        drafts: list[list[int]] = []
        for request, m in zip(requests, max_drafts):
            tokens = self.tokens.get(request.request_id)
            if tokens is None or tokens.request is not request:  # (a request id can be reused)
                tokens = self.tokens[request.request_id] = RequestTokens(request)
            drafts.append(tokens.lookup(self.min_n, self.max_n, min(self.k, m)) if m > 0 else [])
        return drafts
    # --8<-- [end:ngram_propose]

    def free(self, request_id: str) -> None:
        self.tokens.pop(request_id, None)


# --8<-- [start:request_tokens]
class RequestTokens:
    """`request.all_token_ids` mirrored as int32 bytes, to search with `bytearray.rfind`.
    Appended to, never rebuilt: a request's tokens only grow while it runs (a stop string
    that cuts them finishes it; rebuilt then, to be safe)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.data = bytearray()  # 4 bytes a token: data[4i : 4i + 4] is token i
        self.num_tokens = 0

    def update(self) -> int:
        """Append the tokens added since the last call -> how many there are now."""
        ids = self.request.all_token_ids
        if len(ids) < self.num_tokens:
            self.data.clear()
            self.num_tokens = 0
        if len(ids) > self.num_tokens:
            self.data += array("i", ids[self.num_tokens:]).tobytes()
            self.num_tokens = len(ids)
        return self.num_tokens

    def lookup(self, min_n: int, max_n: int, k: int) -> list[int]:
        """`ngram_lookup(request.all_token_ids, min_n, max_n, k)`, by byte search."""
        num_tokens = self.update()
        n_max = min(max_n, num_tokens - 1)
        if n_max < min_n or k <= 0 or self.last_occurrence(min_n) < 0:
            return []  # (no earlier min_n-gram: no longer one either)
        for n in range(n_max, min_n - 1, -1):
            j = self.last_occurrence(n)
            if j >= 0:
                return self.request.all_token_ids[j + 1 : j + 1 + k]
        raise AssertionError("unreachable: the min_n-gram occurred")

    def last_occurrence(self, n: int) -> int:
        """Where the most recent earlier occurrence of the last n tokens ends (j <= L - 2, so
        a token follows it), or -1."""
        data, width = self.data, 4 * n
        pattern = data[len(data) - width :]
        pos = data.rfind(pattern, 0, len(data) - 4)  # [0, 4 (L-1)): tokens 0 .. L-2
        while pos > 0 and pos % 4:  # straddles two tokens: not a match, look further left
            pos = data.rfind(pattern, 0, pos + width - 1)
        return -1 if pos < 0 else pos // 4 + n - 1
# --8<-- [end:request_tokens]


# --8<-- [start:ngram_lookup]
def ngram_lookup(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """At most k tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (min_n <= n <= max_n) of `token_ids`; [] when none occurred."""
    num_tokens = len(token_ids)
    n_max = min(max_n, num_tokens - 1)
    if n_max < min_n or k <= 0:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)  # [L]
    last = num_tokens - 1
    # Earlier n-grams end at j = 0 .. L-2 (so at least one token follows them) with the last token.
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # [C] ascending: matches of length >= 1
    n = 1
    while ends.size and n < n_max:  # grow every surviving match one token to the left
        reach = ends[ends >= n]  # (a match that starts at token 0 cannot grow)
        longer = reach[tokens[reach - n] == tokens[last - n]]
        if not longer.size:
            break
        ends, n = longer, n + 1
    if not ends.size or n < min_n:
        return []
    j = int(ends[-1])  # the most recent of the longest matches
    return tokens[j + 1 : j + 1 + k].tolist()
# --8<-- [end:ngram_lookup]
