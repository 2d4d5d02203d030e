"""Stage 10: structured outputs. `StructuredOutputManager` (vLLM's, `vllm/v1/structured_output/`)
is the engine's one entry point::

    add_request   validate_request(params)   the spec checked now: a ValueError / HTTP 400
                  add_request(request)       compile submitted to a worker thread, once per
                                             distinct spec; the request WAITING_FOR_GRAMMAR
    each step     apply_grammar_bitmask(logits, requests)
                                             rows with a grammar: -inf outside its mask,
                                             before the sampler sees the logits
    after it      advance_grammar(request, token)   (the scheduler, `request.py`)

    backends      folovllm  regex / choice / a JSON-schema subset -> DFA over bytes -> masks
                  xgrammar  everything, when installed (backend_xgrammar.py)
                  "auto"    ours for what it supports, xgrammar for the rest

A request without structured output pays nothing: no bitmask is built, no logits copied; the
check is one attribute per sampling row. Left out (docs/stages/10-*): jump-forward decoding,
grammars with speculative decoding (refused for now), the mask computed on the GPU or
overlapped with the forward pass (vLLM fills it while the model runs).
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
        self.speculative = getattr(config, "speculative_config", None) is not None
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.backends: dict[str, StructuredOutputBackend] = {}  # built on first use
        self._backends_lock = threading.Lock()
        self.executor: Optional[ThreadPoolExecutor] = None  # started on first use
        self.compiled: "OrderedDict[tuple[str, StructuredOutputKey], Future[Any]]" = OrderedDict()
        self.bitmask: Optional[torch.Tensor] = None  # int32 [rows, ceil(vocab / 32)], reused

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
        if self.speculative:
            raise ValueError("structured_outputs cannot be combined with speculative decoding "
                             "(speculative_config) yet: start the engine without it")
        kind, spec = structured_output_key(params.structured_outputs)
        if self.backend_choice in ("auto", "folovllm"):
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
    def apply_grammar_bitmask(self, logits: torch.Tensor, requests: Sequence["Request"]) -> None:
        """In place: logits [S, V] (row i samples for requests[i]) get -inf outside the mask of
        every row with a grammar. Rows without one, and batches without any, are untouched:
        no bitmask is filled and nothing is copied."""
        rows = [i for i, r in enumerate(requests) if r.structured_output_request is not None]
        if not rows:
            return
        words = (self.vocab_size + 31) // 32
        if self.bitmask is None or self.bitmask.shape[0] < len(rows):
            self.bitmask = torch.zeros(max(len(rows), 8), words, dtype=torch.int32)
        bitmask = self.bitmask[: len(rows)]
        for k, row in enumerate(rows):
            requests[row].structured_output_request.grammar.fill_bitmask(bitmask, k)
        allowed = unpack_bits(bitmask.to(logits.device), logits.shape[-1])  # [R, V] bool
        with torch.inference_mode():  # the runner's logits are inference tensors
            if len(rows) == logits.shape[0]:
                logits.masked_fill_(~allowed, float("-inf"))
            else:
                logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    # --8<-- [end:apply_grammar_bitmask]

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
