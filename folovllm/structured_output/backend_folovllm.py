"""Our own backend: every spec becomes a regex, the regex a DFA over bytes (`regex_dfa.py`), the
DFA a per-state token mask over the vocabulary (`token_index.py`)::

    choice ["yes", "no"]     -> (yes|no)                  (each choice escaped)
    regex                    -> itself
    json schema              -> a regex (`json_schema.py`, a documented subset)
    json_object              -> any JSON object nested at most 4 deep (`json_object_regex`:
                                any depth is not regular); "auto" prefers xgrammar for it
    grammar                  -> refused: not regular; the backend says to use xgrammar
                                ("auto" does so when installed)

A request's grammar is one integer, the DFA state, plus the states it came through (for
`rollback`): advancing over a token walks its bytes through the DFA.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import torch

from folovllm.structured_output.backend_types import (
    StructuredOutputBackend, StructuredOutputGrammar, StructuredOutputOptions)
from folovllm.structured_output.json_schema import json_object_regex, schema_to_regex
from folovllm.structured_output.regex_dfa import DEAD, DFA, UnsupportedRegex, escape, parse_regex, regex_to_dfa
from folovllm.structured_output.token_index import TokenIndex, Vocabulary, token_bytes

Options = StructuredOutputOptions


def spec_to_regex(kind: StructuredOutputOptions, spec: str) -> str:
    """The regex a spec stands for; UnsupportedRegex for what is not regular here."""
    import json

    if kind == Options.REGEX:
        return spec
    if kind == Options.CHOICE:
        return "(" + "|".join(escape(c) for c in json.loads(spec)) + ")"
    if kind == Options.JSON:
        return schema_to_regex(spec)
    if kind == Options.JSON_OBJECT:
        return json_object_regex()
    raise UnsupportedRegex(f"{kind.value}: the folovllm backend compiles regex, choice, json "
                           "(a schema subset) and json_object (nested at most 4 deep) only; use structured_outputs_backend='xgrammar' "
                           "(or 'auto' with xgrammar installed)")


@lru_cache(maxsize=16)
def cached_dfa(pattern: str) -> DFA:
    """A DFA depends on the pattern only, not on the vocabulary: built once per process for
    each recent pattern (json_object's takes about a second: every engine shares it)."""
    return regex_to_dfa(pattern)


class FolovllmBackend(StructuredOutputBackend):
    name = "folovllm"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.vocab = Vocabulary(token_bytes(tokenizer, vocab_size), eos_token_ids)

    def validate(self, kind: StructuredOutputOptions, spec: str) -> None:
        if kind == Options.JSON_OBJECT:
            return  # no spec to check: the pattern is ours
        try:
            parse_regex(spec_to_regex(kind, spec))
        except ValueError as e:  # say which field: "regex: invalid regex ..."
            if str(e).startswith(f"{kind.value}:"):
                raise
            raise type(e)(f"{kind.value}: {e}") from e

    def compile(self, kind: StructuredOutputOptions, spec: str) -> TokenIndex:
        index = TokenIndex(cached_dfa(spec_to_regex(kind, spec)), self.vocab)
        index.mask(0)  # the start state's mask (and the vocabulary's trie, once) off the step
        return index

    def new_grammar(self, compiled: TokenIndex) -> "FolovllmGrammar":
        return FolovllmGrammar(compiled)


# --8<-- [start:folovllm_grammar]
class FolovllmGrammar(StructuredOutputGrammar):
    """Where one request is in its DFA: `state`, and `history` (the state before each accepted
    token) to roll back to."""

    def __init__(self, index: TokenIndex) -> None:
        self.index = index
        self.state = 0
        self.history: list[int] = []
        self.terminated = False

    def _next(self, state: int, terminated: bool, token_id: int) -> tuple[int, bool]:
        """(state, terminated) after `token_id`; state DEAD if it is not allowed."""
        if terminated:
            return DEAD, True
        if token_id in self.index.vocab.eos_token_ids:
            return (state, True) if state in self.index.dfa.accepting else (DEAD, False)
        return self.index.next_state(state, token_id), False

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        for token_id in token_ids:
            state, terminated = self._next(self.state, self.terminated, token_id)
            if state == DEAD:
                return False
            self.history.append(self.state)
            self.state, self.terminated = state, terminated
        return True

    def validate_tokens(self, token_ids: Sequence[int]) -> list[int]:
        state, terminated = self.state, self.terminated
        for k, token_id in enumerate(token_ids):
            state, terminated = self._next(state, terminated, token_id)
            if state == DEAD:
                return list(token_ids[:k])
        return list(token_ids)

    def rollback(self, num_tokens: int) -> None:
        for _ in range(min(num_tokens, len(self.history))):
            self.state = self.history.pop()
            self.terminated = False  # only the last accepted token can be EOS

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = self.index.mask(self.state)

    def is_terminated(self) -> bool:
        return self.terminated
# --8<-- [end:folovllm_grammar]
