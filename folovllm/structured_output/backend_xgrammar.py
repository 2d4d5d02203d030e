"""xgrammar (the `xgrammar` package, vLLM's default backend) behind the same interface: full
JSON Schema, `json_object`, EBNF grammars, regexes. It compiles a grammar into a pushdown
automaton whose token masks are precomputed per state where the stack does not matter
("context-independent" tokens) and checked at run time where it does.

Installed by `pip install folovllm[test]` (CPU wheels, no torch of their own); without it the
engine still runs and "auto" uses the folovllm backend alone.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any, Sequence

import torch

from folovllm.structured_output.backend_types import (
    StructuredOutputBackend, StructuredOutputGrammar, StructuredOutputOptions)
from folovllm.structured_output.regex_dfa import escape

Options = StructuredOutputOptions


def xgrammar_available() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


class XgrammarBackend(StructuredOutputBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(eos_token_ids))
        # one thread: the engine already compiles off the step, one spec at a time
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def _grammar(self, kind: StructuredOutputOptions, spec: str) -> Any:
        """The tokenizer-free grammar (cheap): parses and checks the spec."""
        grammar = self.xgr.Grammar
        if kind == Options.JSON:
            return grammar.from_json_schema(spec, any_whitespace=False)
        if kind == Options.JSON_OBJECT:
            return grammar.from_json_schema('{"type": "object"}', any_whitespace=False)  # vLLM's choice
        if kind == Options.REGEX:
            return grammar.from_regex(spec)
        if kind == Options.CHOICE:
            return grammar.from_regex("(" + "|".join(escape(c) for c in json.loads(spec)) + ")")
        return grammar.from_ebnf(spec)

    def validate(self, kind: StructuredOutputOptions, spec: str) -> None:
        try:
            self._grammar(kind, spec)
        except Exception as e:  # xgrammar raises RuntimeError / its own errors
            message = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()  # its C++ file:line
            raise ValueError(f"{kind.value}: xgrammar cannot compile it: {message}") from e

    def compile(self, kind: StructuredOutputOptions, spec: str) -> Any:
        return self.compiler.compile_grammar(self._grammar(kind, spec))

    def new_grammar(self, compiled: Any) -> "XgrammarGrammar":
        return XgrammarGrammar(self.xgr.GrammarMatcher(compiled))


class XgrammarGrammar(StructuredOutputGrammar):
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        return all(self.matcher.accept_token(int(t)) for t in token_ids)

    def validate_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """xgrammar has no dry run: accept while allowed, then roll the accepted ones back."""
        accepted = 0
        for token_id in token_ids:
            if not self.matcher.accept_token(int(token_id)):
                break
            accepted += 1
        if accepted:
            self.matcher.rollback(accepted)
        return list(token_ids[:accepted])

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()
