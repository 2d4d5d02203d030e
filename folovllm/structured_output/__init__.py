"""Stage 10: structured outputs. `StructuredOutputManager` (vLLM's, `vllm/v1/structured_output/`)
is the engine's one entry point::

    add_request   validate_request(params)   the spec checked now: a ValueError / HTTP 400
                  add_request(request)       compile submitted to a worker thread, once per
                                             distinct spec; the request WAITING_FOR_GRAMMAR
    each step     apply_grammar_bitmask(logits, requests, drafts)
                                             rows with a grammar: -inf outside its mask,
                                             before the sampler sees the logits; with drafts
                                             (stage 09) one mask row per verified position
    after it      advance_grammar(request, token)   (the scheduler, `request.py`)
    between steps validate_drafts(running)   stage 09's drafts cut at the first token the
                                             grammar refuses, before they are scheduled

    backends      folovllm  regex / choice / a JSON-schema subset -> DFA over bytes -> masks
                  xgrammar  everything, when installed (backend_xgrammar.py)
                  "auto"    ours for what it supports, xgrammar for the rest (and for
                            json_object, which ours bounds at nesting depth 4)

A request without structured output pays nothing: no bitmask is built, no logits copied; the
check is one attribute per sampling row. Left out (docs/stages/10-*): jump-forward decoding,
the mask computed on the GPU or overlapped with the forward pass (vLLM fills it while the
model runs).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from folovllm.structured_output.backend_types import (
    StructuredOutputBackend, StructuredOutputGrammar, StructuredOutputKey, StructuredOutputOptions)
from folovllm.structured_output.backend_xgrammar import xgrammar_available
from folovllm.structured_output.regex_dfa import UnsupportedRegex
from folovllm.structured_output.request import StructuredOutputRequest, advance_grammar
from folovllm.structured_output.token_index import unpack_bits

if TYPE_CHECKING:
    from folovllm.config import EngineConfig
    from folovllm.core.request import Request
    from folovllm.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["StructuredOutputManager", "StructuredOutputGrammar", "StructuredOutputBackend",
           "StructuredOutputOptions", "advance_grammar", "BACKENDS"]

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "folovllm", "xgrammar")
MAX_CACHED_GRAMMARS = 256


FULL_MASK = -1  # an int32 word with every bit set: all 32 tokens allowed


# --8<-- [start:fill_bitmask_with_drafts]
def fill_bitmask_with_drafts(grammar: StructuredOutputGrammar, bitmask: torch.Tensor, first: int,
                             drafts: Sequence[int]) -> None:
    """Rows first .. first + len(drafts) of `bitmask`: the grammar's mask at each position a
    row with drafts verifies (vLLM's `StructuredOutputManager.grammar_bitmask`)::

        position   0 (after the committed tokens)   1 (after d1)   ...   k (after d1 .. dk)
        grammar    as it is                          d1 accepted         d1 .. dk accepted

    The drafts are accepted only tentatively, to reach each position's state, then rolled
    back: which of them are committed is the rejection sampler's call, and the scheduler
    accepts those after it (`advance_grammar`). `validate_drafts` cut them where the grammar
    refuses, so each accept succeeds. A position after a terminating EOS draft gets the full
    mask: nothing there is committed (the request stops at the EOS), and xgrammar refuses to
    fill a terminated matcher's mask."""
    advanced = 0
    try:
        for j, token in enumerate([*drafts, None]):
            if grammar.is_terminated():
                bitmask[first + j].fill_(FULL_MASK)
            else:
                grammar.fill_bitmask(bitmask, first + j)
            if token is not None and not grammar.is_terminated():
                if not grammar.accept_tokens([token]):
                    raise RuntimeError(f"draft token {token} is not allowed by the grammar: the "
                                       "drafts were not validated (validate_drafts)")
                advanced += 1
    finally:  # whatever happened, the grammar is back where the committed tokens left it
        grammar.rollback(advanced)
# --8<-- [end:fill_bitmask_with_drafts]


def structured_output_key(params: "StructuredOutputsParams") -> StructuredOutputKey:
    """(kind, spec as a string): the compile cache's key. A schema dict is dumped as written
    (key order matters: our backend writes properties in that order)."""
    for kind in StructuredOutputOptions:
        value = getattr(params, kind.value)
        if value not in (None, False):
            if kind == StructuredOutputOptions.JSON and not isinstance(value, str):
                try:
                    value = json.dumps(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"structured_outputs.json: the schema is not JSON ({e})") from e
            elif kind == StructuredOutputOptions.CHOICE:
                value = json.dumps(list(value))
            elif kind == StructuredOutputOptions.JSON_OBJECT:
                value = ""
            return kind, value
    raise ValueError("structured_outputs sets none of its fields")


class StructuredOutputManager:
    def __init__(self, config: "EngineConfig", tokenizer: Any, vocab_size: int,
                 eos_token_ids: Sequence[int]) -> None:
        self.backend_choice = config.structured_outputs_backend
        if self.backend_choice == "xgrammar" and not xgrammar_available():
            raise ValueError("structured_outputs_backend='xgrammar' but the xgrammar package is not "
                             "installed (pip install xgrammar), or use 'auto' / 'folovllm'")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.backends: dict[str, StructuredOutputBackend] = {}  # built on first use
        self._backends_lock = threading.Lock()
        self.executor: Optional[ThreadPoolExecutor] = None  # started on first use
        self.compiled: "OrderedDict[tuple[str, StructuredOutputKey], Future[Any]]" = OrderedDict()
        self.bitmask: Optional[torch.Tensor] = None  # int32 [rows, ceil(vocab / 32)], reused
        # stage 09: draft tokens of structured requests seen by `validate_drafts`, and how many
        # of them it cut (a refused token and every draft after it)
        self.num_draft_tokens_validated = 0
        self.num_draft_tokens_refused = 0

    # -- at add_request -----------------------------------------------------------------------

    def backend(self, name: str) -> StructuredOutputBackend:
        with self._backends_lock:
            if name not in self.backends:
                if name == "xgrammar":
                    from folovllm.structured_output.backend_xgrammar import XgrammarBackend as cls
                else:
                    from folovllm.structured_output.backend_folovllm import FolovllmBackend as cls
                self.backends[name] = cls(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self.backends[name]

    # --8<-- [start:validate_request]
    def validate_request(self, params: "SamplingParams") -> Optional[StructuredOutputBackend]:
        """The spec checked before anything is queued -> the backend that will compile it.
        ValueError names the field; with "auto", what our backend does not support goes to
        xgrammar (when installed)."""
        if params.structured_outputs is None:
            return None
        kind, spec = structured_output_key(params.structured_outputs)
        # json_object: ours is bounded (nesting depth 4) and compiles in about a second;
        # xgrammar's has no bound and compiles in milliseconds, so "auto" prefers it
        prefer_xgrammar = kind == StructuredOutputOptions.JSON_OBJECT and xgrammar_available()
        if self.backend_choice == "folovllm" or (self.backend_choice == "auto" and not prefer_xgrammar):
            try:
                backend = self.backend("folovllm")
                backend.validate(kind, spec)
                return backend
            except UnsupportedRegex as e:  # valid, but beyond our subset
                if self.backend_choice == "folovllm" or not xgrammar_available():
                    hint = "" if "xgrammar" in str(e) else (
                        " is outside the folovllm backend's subset; use structured_outputs_backend="
                        "'xgrammar' (or 'auto' with xgrammar installed)")
                    if not xgrammar_available():
                        hint += " (xgrammar is not installed here)"
                    raise ValueError(f"structured_outputs.{e}{hint}") from e
            except ValueError as e:  # invalid: no backend would take it
                raise ValueError(f"structured_outputs.{e}") from e
        backend = self.backend("xgrammar")
        try:
            backend.validate(kind, spec)
        except ValueError as e:
            raise ValueError(f"structured_outputs.{e}") from e
        return backend
    # --8<-- [end:validate_request]

    # --8<-- [start:add_request]
    def add_request(self, request: "Request", wait: bool = False) -> None:
        """Submit the request's grammar for compilation (once per distinct spec: the future is
        cached) and park it in WAITING_FOR_GRAMMAR until it is done; the scheduler passes over
        it meanwhile. `wait`: compile now (stage 01's static batch forms all at once)."""
        from folovllm.core.request import RequestStatus

        backend = self.validate_request(request.sampling_params)
        if backend is None:
            return
        key = structured_output_key(request.sampling_params.structured_outputs)
        cache_key = (backend.name, key)
        future = self.compiled.get(cache_key)
        if future is None or (future.done() and future.exception() is not None):
            if self.executor is None:
                self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
            future = self.executor.submit(backend.compile, *key)
            self.compiled[cache_key] = future
            if len(self.compiled) > MAX_CACHED_GRAMMARS:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(cache_key)
        request.structured_output_request = StructuredOutputRequest(key, backend, future)
        if wait:
            future.exception()  # blocks until done; an error surfaces in the step
        if not future.done():
            request.status = RequestStatus.WAITING_FOR_GRAMMAR
    # --8<-- [end:add_request]

    # -- each step ----------------------------------------------------------------------------

    # --8<-- [start:apply_grammar_bitmask]
    def apply_grammar_bitmask(self, logits: torch.Tensor, requests: Sequence["Request"],
                              draft_token_ids: Optional[Sequence[Sequence[int]]] = None) -> None:
        """In place: logits [S, V] get -inf outside the mask of every row with a grammar. Without
        drafts row i samples for requests[i]; with drafts (stage 09) requests[i] has
        1 + len(draft_token_ids[i]) rows in order, one per position the rejection sampler
        verifies, each masked by the grammar's state after the drafts before it. Rows without a
        grammar, and batches without any, are untouched: no bitmask is filled, nothing copied."""
        if draft_token_ids is None:
            draft_token_ids = [()] * len(requests)
        rows: list[int] = []  # the logits rows to mask, in bitmask order
        structured: list[tuple["StructuredOutputRequest", int, Sequence[int]]] = []
        offset = 0
        for request, drafts in zip(requests, draft_token_ids):
            if request.structured_output_request is not None:
                structured.append((request.structured_output_request, len(rows), drafts))
                rows += range(offset, offset + 1 + len(drafts))
            offset += 1 + len(drafts)
        if not rows:
            return
        words = (self.vocab_size + 31) // 32
        if self.bitmask is None or self.bitmask.shape[0] < len(rows):
            self.bitmask = torch.zeros(max(len(rows), 8), words, dtype=torch.int32)
        bitmask = self.bitmask[: len(rows)]
        for request, first, drafts in structured:
            fill_bitmask_with_drafts(request.grammar, bitmask, first, drafts)
        allowed = unpack_bits(bitmask.to(logits.device), logits.shape[-1])  # [R, V] bool
        with torch.inference_mode():  # the runner's logits are inference tensors
            if len(rows) == logits.shape[0]:
                logits.masked_fill_(~allowed, float("-inf"))
            else:
                logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    # --8<-- [end:apply_grammar_bitmask]

    # --8<-- [start:validate_drafts]
    def validate_drafts(self, requests: Sequence["Request"]) -> None:
        """Stage 09, between steps, after the proposer: cut each structured request's drafts
        (`request.spec_token_ids`) at the first token its grammar refuses. vLLM does it in the
        same place (`Scheduler.update_draft_token_ids`), before scheduling rather than at
        verification: a refused draft gets probability 0 from the masked logits, so it and
        every draft after it would be rejected anyway; cut now, they take no budget, no KV
        slot, no forward position, and the mask rows can advance the grammar through every
        draft that is scheduled."""
        for request in requests:
            structured = request.structured_output_request
            if structured is None or not request.spec_token_ids:
                continue
            drafts = request.spec_token_ids
            future = structured.compiled
            if not future.done() or future.exception() is not None:
                valid: list[int] = []  # (a running request's is done; a failed compile fails its step)
            else:
                valid = structured.grammar.validate_tokens(drafts)
            self.num_draft_tokens_validated += len(drafts)
            self.num_draft_tokens_refused += len(drafts) - len(valid)
            request.spec_token_ids = valid
    # --8<-- [end:validate_drafts]

    def wait_for_grammars(self, timeout: float) -> None:
        """When a step had nothing to run but grammars are compiling: wait (up to `timeout`
        seconds) for one to finish instead of returning at once, so a caller looping on
        `step()` does not spin, and hold the GIL, against the compile thread."""
        pending = [f for f in self.compiled.values() if not f.done()]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
