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

That is two calls of the tokenizer's Python `decode` per token: about 6 us a token on the tiny
BPE, most of a streaming step's output processing at 16 rows. `FastIncrementalDetokenizer` runs
the same windows in Rust (the `tokenizers` library's `DecodeStream`, whose `step` is this
algorithm; vLLM's `FastIncrementalDetokenizer` too): under 1 us a token. `make_detokenizer`
picks it when the tokenizer has a Rust backend and decodes without `clean_up_tokenization_spaces`
(which `DecodeStream` does not apply); `tests/test_detokenizer.py` checks both give the same
text, step by step.
"""

from __future__ import annotations

from typing import Any

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - an older tokenizers: the plain path everywhere
    DecodeStream = None

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


def make_detokenizer(tokenizer: Any, skip_special_tokens: bool) -> "IncrementalDetokenizer":
    """The Rust-backed detokenizer where it gives the same text, else the plain one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is not None and backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return FastIncrementalDetokenizer(tokenizer, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, skip_special_tokens)


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


class FastIncrementalDetokenizer(IncrementalDetokenizer):
    """The same windows, each token stepped through `DecodeStream` (Rust). The offsets are
    kept in step with the stream's (after each emission: prefix_offset = read_offset, read_offset
    = all tokens), so `pending_text` and a fall-back to the plain path read the same state. The
    stream refuses a window whose text does not start with the text before it (the plain path
    takes the difference anyway); then this request goes on on the plain path."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        super().__init__(tokenizer, skip_special_tokens)
        self.backend = tokenizer.backend_tokenizer
        self.stream: Any = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int]) -> str:
        if self.stream is None:
            return super().add_tokens(new_token_ids)
        emitted = []
        for i, token in enumerate(new_token_ids):
            try:
                piece = self.stream.step(self.backend, token)
            except Exception:
                self.stream = None
                emitted.append(super().add_tokens(new_token_ids[i:]))
                break
            self.token_ids.append(token)
            if piece is not None:
                self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
                self.text += piece
                emitted.append(piece)
        return "".join(emitted)
