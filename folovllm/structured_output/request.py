"""`StructuredOutputRequest`: a request's spec, its grammar once compiled, and the one call the
scheduler makes after each sampled token (vLLM's `vllm/v1/structured_output/request.py`)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Optional

from folovllm.structured_output.backend_types import (
    StructuredOutputBackend, StructuredOutputGrammar, StructuredOutputKey)

if TYPE_CHECKING:
    from folovllm.core.request import Request

logger = logging.getLogger(__name__)


class StructuredOutputRequest:
    """Holds the compile future until it is done, then the request's own grammar. The future is
    shared by every request with the same spec; the grammar is not (each has its own state)."""

    def __init__(self, key: StructuredOutputKey, backend: StructuredOutputBackend,
                 compiled: "Future[Any]") -> None:
        self.key = key
        self.backend = backend
        self.compiled = compiled
        self._grammar: Optional[StructuredOutputGrammar] = None

    @property
    def is_grammar_ready(self) -> bool:
        """Compiled (or failed to: `grammar` then raises the compile error, inside the step,
        where the engine's guard finishes the request with finish_reason "error")."""
        return self._grammar is not None or self.compiled.done()

    @property
    def grammar(self) -> StructuredOutputGrammar:
        if self._grammar is None:
            self._grammar = self.backend.new_grammar(self.compiled.result())
        return self._grammar


# --8<-- [start:advance_grammar]
def advance_grammar(request: "Request", token_id: int) -> None:
    """After `token_id` was appended (the scheduler's `update_from_output`): advance the
    request's grammar; it finishes "stop" once its grammar terminated (EOS accepted in an
    accepting state). A token the mask allowed is always accepted; one it did not (the mask
    left nothing, e.g. min_tokens banning the EOS that was the only way on) ends the request
    with finish_reason "error" rather than emitting output that breaks the grammar."""
    from folovllm.core.request import RequestStatus

    structured = request.structured_output_request
    if structured is None or request.is_finished:
        return
    grammar = structured.grammar
    if not grammar.accept_tokens([token_id]):
        logger.error("request %r: token %d is not allowed by its grammar", request.request_id, token_id)
        request.status = RequestStatus.FINISHED_ERROR
        request.error = f"token {token_id} is not allowed by the request's structured output"
    elif grammar.is_terminated():
        request.status = RequestStatus.FINISHED_STOPPED
# --8<-- [end:advance_grammar]
