# --8<-- [start:async_llm_doc]
"""`AsyncLLM`: the engine behind an asyncio event loop, one async stream of outputs per request.

`LLMEngine` is synchronous: `add_request()`, then `step()` until done. A server has many clients
that arrive at any time on one event loop, and a step is milliseconds to seconds of model
compute that must never run on that loop (every client would freeze while it ran). So one
background task, the *engine loop*, drives the engine and runs each `step()` in a dedicated
worker thread; requests join and leave between steps::

    event loop thread (asyncio)                                    engine thread (1 worker)
    ─────────────────────────────────────────────────────────      ────────────────────────
    client A ── add_request() ── tokenize, check ──► input threads (a few workers)
    client B ── add_request() ──┐ ◄── ProcessedPrompt ─┘
                                │ takes the lock, so never while a step runs
                                ▼
    engine loop:  lock ── apply aborts ── run step ───────────────►  LLMEngine.step():
                                              ◄── [RequestOutput] ──  schedule, run, update
                  unlock ── put each output in its request's queue
                                │
    client A ◄── async for output in stream ◄── asyncio.Queue (one per request)
    client B disconnects ──► stream.close() ──► abort queued, applied before the next step:
                                                its KV blocks go back to the pool

Why this shape:

- The engine is touched only while `_lock` (an `asyncio.Lock`) is held, and only the engine
  loop holds it across a step; so `step()` in the worker thread never races `add_request()` or
  `abort_request()` on the loop thread, and the engine needs no locks of its own. The lock is
  fair (FIFO): requests that arrived during a step are added before the next one starts.
- Aborts never wait for the lock: a disconnecting client is being cancelled and must not block,
  so `abort()` only records the id and wakes the loop, which applies it before its next step.
- What a client can make long never runs on the event loop or under the lock: tokenizing
  the prompt (and building its stop-string matcher, the chat template for the server) runs
  in the input threads first (`run_off_loop`), and the engine takes the checked prompt as it is
  (`LLMEngine.validate_request` returns a `ProcessedPrompt`), so the locked part is cheap.
  (Tokenized on the loop under the lock, a 10 MB prompt froze every client for 26 s.)
- A thread, not a process: the GIL is released inside torch ops, so the loop keeps serving
  HTTP while the model runs. The Python parts of a step (scheduling, detokenizing) still compete
  with the loop for the GIL; vLLM v1 moves the engine core into its own process (talking over
  ZMQ) for that reason. Left out here: one process is easier to read, debug and test.
- Streams are fed with `RequestOutputKind.DELTA` outputs when the caller streams: each output
  carries only the new text, and the engine's output processor already holds back text that a
  stop string could still take away.
"""
# --8<-- [end:async_llm_doc]

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncGenerator, Callable, Optional, TypeVar, Union

from folovllm.engine.llm_engine import LLMEngine, PromptType
from folovllm.engine.metrics import PrometheusMetrics
from folovllm.engine.stop_strings import StopStringMatcher, get_stop_matcher
from folovllm.inputs import ProcessedPrompt
from folovllm.lora.request import LoRARequest
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import RequestOutputKind, SamplingParams


NUM_INPUT_THREADS = 4  # tokenizing and chat templates for requests being added

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served any more."""


class RequestAbortedError(RuntimeError):
    """The request was ended from the server's side (`AsyncLLM.abort_all`: shutting down)."""


# --8<-- [start:request_stream]
class RequestStream:
    """The outputs of one request, in order, as the engine loop produces them.

    Iterate it with `async for`; use it as `async with stream:` so that leaving early (the
    client went away, the handler was cancelled) aborts the request and frees its KV blocks.
    """

    def __init__(self, request_id: str, output_kind: RequestOutputKind,
                 abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.output_kind = output_kind
        self.finished = False
        self.num_generated_tokens = 0  # over all samples, for the token counter
        self._abort = abort
        self._queue: asyncio.Queue[Union[RequestOutput, BaseException]] = asyncio.Queue()

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        if isinstance(item, RequestOutput):
            num_tokens = sum(len(c.token_ids) for c in item.outputs)
            if self.output_kind == RequestOutputKind.DELTA:
                self.num_generated_tokens += num_tokens
            else:  # CUMULATIVE and FINAL_ONLY carry everything so far
                self.num_generated_tokens = num_tokens
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it already finished (safe to call twice)."""
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
# --8<-- [end:request_stream]


class AsyncLLM:
    """An `LLMEngine` served to many concurrent asyncio callers.

    Create it inside a running event loop (or call `start()` from one), then per request::

        stream = await async_llm.add_request(request_id, prompt, params)  # ValueError if bad
        async with stream:
            async for output in stream:
                ...

    or `async for output in async_llm.generate(prompt, params, request_id)`.
    """

    def __init__(self, engine: LLMEngine, model_name: str = "folovllm") -> None:
        self.engine = engine
        info = {k: str(v) for k, v in engine.description.items()
                if k in ("stage", "stage_name", "quantization", "tensor_parallel_size",
                         "attention_backend", "cpu_kernels", "dtype", "speculative")}
        self.metrics = PrometheusMetrics(model_name, engine.kv_cache_capacity_tokens, info)
        engine.stat_loggers.append(self.metrics.record)
        self._streams: dict[str, RequestStream] = {}
        self._pending_aborts: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="folovllm-engine")
        self._input_executor = ThreadPoolExecutor(max_workers=NUM_INPUT_THREADS,
                                                  thread_name_prefix="folovllm-input")
        self._lock: Optional[asyncio.Lock] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self.dead_error: Optional[BaseException] = None
        self.closed_reason: Optional[str] = None  # set by abort_all: no request is added after
        self._num_adding = 0  # samples of the requests in add_request (tokenized, or at the lock)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine loop on the running event loop."""
        if self._loop_task is None:
            self._lock, self._wakeup = asyncio.Lock(), asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._engine_loop())

    async def shutdown(self) -> None:
        """Abort every request, stop the loop and wait for a step in flight to end."""
        for request_id in list(self._streams):
            self.abort(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._executor.shutdown(wait=True)
        self._input_executor.shutdown(wait=False, cancel_futures=True)
        for stream in self._streams.values():  # nobody will feed these any more
            stream.put(EngineDeadError("the server is shutting down"))
        self._streams.clear()

    @property
    def is_running(self) -> bool:
        """The engine loop is alive (what `/health` reports)."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: in the scheduler's waiting queue (each sample of `n` is
        one, a preempted request is one again) plus the samples still in `add_request`. What the
        server's `--max-waiting-requests` bounds. Read on the event loop while a step may run:
        the queue's length is one atomic read, at most a step old."""
        return len(self.engine.scheduler.waiting) + self._num_adding

    # -- requests -----------------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams,
        lora_request: Optional[LoRARequest] = None,
    ) -> RequestStream:
        """Queue a request; its outputs arrive on the returned stream. Raises ValueError (the
        engine's message) on bad input, adding nothing. The prompt is tokenized and checked in
        an input thread first; only the cheap part of adding holds the lock."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped on an error: {self.dead_error!r}")
        if self._lock is None:
            self.start()
        assert self._lock is not None and self._wakeup is not None
        arrival_time = time.perf_counter()  # before tokenizing and the lock: both count in TTFT
        self._num_adding += sampling_params.n  # no await before this: a caller's check and this are one
        try:
            # `stops` keeps the matcher built off the loop alive until the engine holds it too.
            prompt, stops = await self.run_off_loop(self._process_inputs, prompt, sampling_params)
            if lora_request is not None:  # stage 11: read from disk (if not cached) off the loop
                await self.add_lora(lora_request)
            if self.closed_reason is not None:
                raise RequestAbortedError(self.closed_reason)
            async with self._lock:
                self.engine.add_request(request_id, prompt, sampling_params, arrival_time=arrival_time,
                                        lora_request=lora_request)
                stream = RequestStream(request_id, sampling_params.output_kind, self.abort)
                self._streams[request_id] = stream
        finally:
            self._num_adding -= sampling_params.n
        self._wakeup.set()
        return stream

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Stage 11: read and check an adapter (ValueError if bad), between two steps, in the
        engine's thread: the workers' CPU cache is the step's to read."""
        await self._in_engine_thread(self.engine.lora_manager.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> None:
        await self._in_engine_thread(self.engine.lora_manager.remove_lora, lora_int_id)

    async def _in_engine_thread(self, fn: Callable[..., T], *args: object) -> T:
        if self._lock is None:
            self.start()
        assert self._lock is not None
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _process_inputs(self, prompt: PromptType, params: SamplingParams
                        ) -> tuple[ProcessedPrompt, Optional[StopStringMatcher]]:
        stops = get_stop_matcher(params.stop_strings) if params.stop_strings else None
        return self.engine.validate_request(prompt, params), stops

    async def run_off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in an input thread: for work a client can make long (tokenizing, chat
        templates), which must never stall the event loop or hold the engine lock."""
        return await asyncio.get_running_loop().run_in_executor(self._input_executor, fn, *args)

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """vLLM's `AsyncLLM.generate`: the request's outputs as an async generator. To stop
        early, close it (`contextlib.aclosing`): that aborts the request at once, where a bare
        `break` leaves the abort to the garbage collector."""
        stream = await self.add_request(request_id, prompt, sampling_params)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        """Abort a request before the next step (never blocks: called from cancelled tasks)."""
        if request_id in self._streams:
            self._pending_aborts.add(request_id)
            if self._wakeup is not None:
                self._wakeup.set()

    def abort_all(self, reason: str) -> None:
        """End every stream now, after the outputs already in it, with `RequestAbortedError`,
        and abort its request: the server's shutdown grace is over, and each client still gets
        a proper end (`finish_reason: "abort"` and `[DONE]`) rather than a cut connection.
        Requests being added are refused with the same error."""
        self.closed_reason = reason
        for request_id, stream in self._streams.items():
            stream.put(RequestAbortedError(reason))
            self.abort(request_id)

    # -- the engine loop ----------------------------------------------------------------------

    # --8<-- [start:engine_loop]
    async def _engine_loop(self) -> None:
        assert self._lock is not None and self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending_aborts and not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()  # idle until a request (or an abort) arrives
            async with self._lock:
                self._apply_aborts()
                if not self.engine.has_unfinished_requests():
                    continue
                try:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                except asyncio.CancelledError:
                    raise  # shutdown: it ends the streams itself
                except BaseException as e:  # a bug in the engine: fail every request, stop serving
                    self._fail_all(e)
                    if isinstance(e, Exception):
                        return
                    raise  # KeyboardInterrupt, a test's failure: after the clients have their answer
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                stream.put(output)
                if output.finished:
                    del self._streams[output.request_id]
                    self.metrics.record_finished(output, stream.num_generated_tokens)
    # --8<-- [end:engine_loop]

    def _apply_aborts(self) -> None:
        for request_id in self._pending_aborts:
            if self._streams.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
                self.metrics.record_aborted()
        if self._pending_aborts:  # no step may follow soon: show the freed KV now
            self.metrics.record_kv_cache(self.engine.kv_cache_manager.num_reserved_tokens)
            if not self.engine.has_unfinished_requests():
                self.metrics.record_idle()
        self._pending_aborts.clear()

    def _fail_all(self, error: BaseException) -> None:
        """End every stream with `EngineDeadError`: a client waiting for a token must get an
        answer even when what stopped the engine is not an `Exception` (a `BaseException` from
        the step thread, such as a lab's unwritten function, would otherwise end the loop task
        and leave every stream waiting for ever)."""
        self.dead_error = error
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine stopped on an error: {error!r}"))
        self._streams.clear()
