"""`IncrementalDetokenizer`: the text of a request's new tokens, without decoding the whole output
again every step (vLLM's prefix/read offsets, `vllm/v1/engine/detokenizer.py`).

Decoding all of a request's output each step costs O(length) per token, O(length^2) per request.
A token cannot simply be decoded alone, though: a byte-level BPE token may be half of a UTF-8
character, and SentencePiece tokenizers drop or keep a word's leading space depending on what
precedes it. So each step decodes a short window twice, with and without the new tokens, and
keeps the difference::

    tokens     t0 t1 t2 t3 | t4 t5 | t6        (t6 is new)
                           ^       ^
               prefix_offset       read_offset
    prefix = decode(t4 t5)          text already emitted for them
    full   = decode(t4 t5 t6)
    new    = full[len(prefix):]     emitted, unless it ends in U+FFFD (a character whose last
                                    bytes have not arrived: wait for the next token)

After emitting, the window slides: prefix_offset = read_offset, read_offset = all tokens. Both
decodes start at the same token, so whatever the tokenizer does at a window's start cancels out.
`tests/test_sampling.py` checks the result equals one decode of the whole output.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the window starts here (context for the tokenizer)
        self.read_offset = 0  # tokens before this are in `text`
        self.text = ""  # every character emitted so far

    # --8<-- [start:add_tokens]
    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; returns the text they complete ("" while a character is incomplete)."""
        self.token_ids.extend(new_token_ids)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.token_ids))
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        new_text = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += new_text
        return new_text
    # --8<-- [end:add_tokens]

    def pending_text(self) -> str:
        """The text of tokens not emitted yet, incomplete characters as U+FFFD: what a decode
        of the whole output ends with when the request stops mid-character."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        return self._decode(self.prefix_offset, len(self.token_ids))[len(prefix):]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)
