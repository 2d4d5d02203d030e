"""The two interfaces every structured-output backend implements (vLLM's
`vllm/v1/structured_output/backend_types.py`), so the engine never knows which one runs:

    StructuredOutputBackend   one per engine and kind: checks a spec, compiles it (slow: off the
                              step, in a worker thread), makes a per-request grammar from it
    StructuredOutputGrammar   one per request: where the request is in its grammar

        accept_tokens(ids)    advance over sampled tokens; False if one is not allowed
        validate_tokens(ids)  the longest allowed prefix of ids, without advancing
                              (speculative decoding: which draft tokens the grammar allows)
        rollback(n)           forget the last n accepted tokens (rejected drafts)
        fill_bitmask(m, row)  write the allowed next tokens into row `row` of the int32
                              [rows, ceil(vocab / 32)] bitmask
        is_terminated()       EOS was accepted: nothing more may follow
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch


class StructuredOutputOptions(enum.Enum):
    """Which field of `StructuredOutputsParams` a request uses (vLLM's names)."""

    JSON = "json"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    GRAMMAR = "grammar"
    CHOICE = "choice"


StructuredOutputKey = tuple[StructuredOutputOptions, str]  # (kind, the spec as a string)


class StructuredOutputGrammar(ABC):
    @abstractmethod
    def accept_tokens(self, token_ids: Sequence[int]) -> bool: ...

    @abstractmethod
    def validate_tokens(self, token_ids: Sequence[int]) -> list[int]: ...

    @abstractmethod
    def rollback(self, num_tokens: int) -> None: ...

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...

    @abstractmethod
    def is_terminated(self) -> bool: ...


class StructuredOutputBackend(ABC):
    """Built once per engine from its tokenizer; `compile` may run in a worker thread."""

    name: str

    @abstractmethod
    def validate(self, kind: StructuredOutputOptions, spec: str) -> None:
        """Cheap, at add_request: ValueError (naming the field) if `spec` cannot compile;
        `UnsupportedRegex` if it is valid but beyond this backend."""

    @abstractmethod
    def compile(self, kind: StructuredOutputOptions, spec: str) -> Any:
        """The expensive part, shared by every request with the same (kind, spec)."""

    @abstractmethod
    def new_grammar(self, compiled: Any) -> StructuredOutputGrammar:
        """A fresh per-request grammar at the start of the compiled one."""
