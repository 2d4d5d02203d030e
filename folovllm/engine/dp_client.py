# --8<-- [start:dp_client_doc]
"""`DPAsyncLLM`: N engine replicas, each in its own process, behind the one interface the server
already uses (`AsyncLLM`'s), so the OpenAI endpoints need no code of their own for data
parallelism (vLLM: `--data-parallel-size`, its `DPLBAsyncMPClient` in `v1/engine/core_client.py`).

    front process (FastAPI, uvicorn)                      replica processes (one per rank)
    ────────────────────────────────────────────────      ───────────────────────────────────
    client ─► serving_*.py ─► DPAsyncLLM.add_request      run_engine_replica(i):
               tokenize (input thread), hash blocks          LLMEngine + AsyncLLM, its own loop
               policy.select ─► replica i ── pipe ──────►    "add"   ─► AsyncLLM.add_request
               RequestStream ◄── outputs ◄── reader thread ◄ "output" per step (DELTA or final)
    disconnect ─► stream.close() ─► "abort" ── pipe ─────►   stream.close(): KV freed
    GET /metrics ◄── each replica's text, + replica="i" ◄── "stats" every ~0.2 s when changed

Why this shape:

- A process per replica, not a thread: each engine's Python work (scheduling, detokenizing)
  then runs beside the others instead of taking turns on one GIL, and a replica that crashes
  (or is killed by the OOM killer) takes only its own requests with it.
- The front keeps the tokenizer and tokenizes, for the routing policy (prefix-aware routing
  hashes the prompt's blocks), and sends the replica the token ids; the replica's engine still
  checks the request itself (`validate_request`), so every refusal is the engine's own message,
  answered 400 exactly as with one engine.
- Plain `multiprocessing` pipes (one duplex pipe per replica, a reader thread per pipe feeding
  the event loop): the stdlib, no ZMQ. Messages are small tuples, pickled.
- Death: a replica's pipe reaches EOF when its process exits, for any reason. The front then
  takes it out of rotation, logs it, ends its in-flight requests with `EngineDeadError` (an
  error event in a stream, a 503 otherwise) and keeps serving on the others. A replica whose
  front dies sees EOF the same way and exits: no orphans either way.
- Shutdown: the front aborts what is left, tells each replica to stop, waits for it
  (`terminate`, then `kill`, past a deadline). Replicas ignore SIGINT: a Ctrl-C on the
  terminal reaches the whole process group, and the front, not each replica, decides when the
  drain is over.

At `--data-parallel-size 1` none of this runs: the server keeps its in-process `AsyncLLM`.
"""
# --8<-- [end:dp_client_doc]

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional, TypeVar

from folovllm.config import EngineConfig
from folovllm.engine.async_llm import (NUM_INPUT_THREADS, EngineDeadError, RequestAbortedError,
                                       RequestStream)
from folovllm.engine.dp_routing import (ReplicaLoad, RoutingPolicy, RoutingRequest, get_routing_policy,
                                        prompt_block_hashes)
from folovllm.engine.llm_engine import PromptType
from folovllm.inputs import ProcessedPrompt, parse_prompt
from folovllm.lora.request import LoRARequest
from folovllm.sampling_params import SamplingParams

logger = logging.getLogger("folovllm.dp")

T = TypeVar("T")
STARTUP_TIMEOUT_S = 600.0  # loading a real model (and compiling kernels on a first start)
SHUTDOWN_TIMEOUT_S = 10.0  # a replica's drain: its last step, then exit
STATS_INTERVAL_S = 0.2  # how often a replica reports its load and metrics (when they changed)


# -- the replica process ------------------------------------------------------------------------

# --8<-- [start:replica]
def run_engine_replica(index: int, model: str, config: EngineConfig, model_name: str,
                       num_threads: int, conn: Connection) -> None:
    """A replica's process (vLLM's `EngineCoreProc.run_engine_core`): one engine and its
    `AsyncLLM` on an event loop of its own, serving the front's messages on `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when to stop (see above)
    import torch

    from folovllm.engine.llm_engine import LLMEngine

    torch.set_num_threads(num_threads)
    try:
        engine = LLMEngine(model, config)
    except BaseException as e:  # a bad model, a KV budget too small: the front says it and exits
        conn.send(("startup_error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ready", {"config": engine.config, "vocab_size": engine.vocab_size,
                             "description": engine.description,
                             "kv_cache_capacity_tokens": engine.kv_cache_capacity_tokens}))
        asyncio.run(_ReplicaServer(engine, model_name, conn).run())
    finally:
        engine.shutdown()


class _ReplicaServer:
    """The replica's side of the pipe: "add", "abort" and "shutdown" in; "added", "add_error",
    "output", "request_error" and "stats" out. Everything runs on the replica's event loop
    but the blocking `recv`, which a reader thread does."""

    def __init__(self, engine: Any, model_name: str, conn: Connection) -> None:
        from folovllm.engine.async_llm import AsyncLLM

        self.async_llm = AsyncLLM(engine, model_name)
        self.conn = conn
        self.streams: dict[str, RequestStream] = {}
        self.tasks: dict[str, asyncio.Task] = {}  # each request's `_serve`, cancelled on an abort
        self.adding: set[str] = set()  # "add" received, the engine has not taken it yet
        self.aborted_while_adding: set[str] = set()
        self.stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.async_llm.start()
        threading.Thread(target=self._read, args=(loop,), daemon=True, name="folovllm-dp-reader").start()
        reporter = loop.create_task(self._report_stats())
        await self.stop.wait()
        reporter.cancel()
        await self.async_llm.shutdown()  # aborts what is left; waits for a step in flight

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the front is gone: stop rather than run as an orphan
                message = ("shutdown",)
            try:
                loop.call_soon_threadsafe(self._handle, message)
            except RuntimeError:  # the loop is closed: the replica is exiting
                return
            if message[0] == "shutdown":
                return

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):  # the front is gone; the reader will stop us
            pass

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params = message
            self.adding.add(request_id)
            self.tasks[request_id] = asyncio.get_running_loop().create_task(self._serve(request_id, prompt, params))
        elif kind == "abort":
            request_id = message[1]
            if request_id in self.adding:
                self.aborted_while_adding.add(request_id)
            elif request_id in self.streams:
                # Close (the engine frees it before its next step), and end the task reading it:
                # an aborted stream gets no more outputs, so it would wait for ever.
                self.streams.pop(request_id).close()
                self.tasks[request_id].cancel()
        elif kind == "shutdown":
            self.stop.set()

    async def _serve(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        try:
            stream = await self.async_llm.add_request(request_id, prompt, params)
        except Exception as e:  # ValueError: the engine's refusal, sent back as it is
            self._send(("add_error", request_id, type(e).__name__, str(e)))
            self.tasks.pop(request_id, None)
            return
        finally:
            self.adding.discard(request_id)
        self._send(("added", request_id))
        if request_id in self.aborted_while_adding:
            self.aborted_while_adding.discard(request_id)
            self.tasks.pop(request_id, None)
            stream.close()
            return
        self.streams[request_id] = stream
        try:
            async with stream:
                async for output in stream:
                    self._send(("output", output))
        except (EngineDeadError, RequestAbortedError) as e:
            self._send(("request_error", request_id, type(e).__name__, str(e)))
            if isinstance(e, EngineDeadError):
                self.stop.set()  # this engine cannot serve any more: exit, the front sees EOF
        finally:
            self.streams.pop(request_id, None)
            self.tasks.pop(request_id, None)

    async def _report_stats(self) -> None:
        last: Optional[tuple] = None
        engine = self.async_llm.engine
        while True:
            kv_usage = engine.kv_cache_manager.num_reserved_tokens / max(1, engine.kv_cache_capacity_tokens)
            report = (self.async_llm.num_waiting, kv_usage, self.async_llm.metrics.render())
            if report != last:
                self._send(("stats", *report))
                last = report
            await asyncio.sleep(STATS_INTERVAL_S)
# --8<-- [end:replica]


# -- the front ----------------------------------------------------------------------------------

@dataclass
class EngineView:
    """What the server reads of "the engine" (`async_llm.engine`) when the engines are in other
    processes: the resolved config, the tokenizer, the vocabulary."""

    config: EngineConfig
    tokenizer: Any
    vocab_size: int
    description: dict


@dataclass
class EngineReplica:
    """The front's handle on one replica process."""

    index: int
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    alive: bool = True
    exit_reason: Optional[str] = None
    num_requests: int = 0  # samples sent and not finished: what least-loaded routing counts
    num_waiting: int = 0  # from its last stats report
    kv_cache_usage: float = 0.0
    metrics_text: bytes = b""
    num_routed: int = 0  # requests sent to it, ever (the tests and the benchmark read it)
    reader: Optional[threading.Thread] = None

    def send(self, message: tuple) -> None:
        if self.alive:
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):  # it died; the reader thread reports it
                pass


@dataclass
class _InFlight:
    stream: RequestStream
    replica: EngineReplica
    num_samples: int
    added: Optional[asyncio.Future] = None  # resolved when the replica took the request


class DPAsyncLLM:
    """`AsyncLLM`'s interface over `data_parallel_size` engine replicas in their own processes.

    The constructor starts the replicas and waits until every one has loaded the model (a
    replica that fails to start stops them all and raises `ValueError` with its message)."""

    def __init__(self, model: str, config: EngineConfig, data_parallel_size: int,
                 routing: str = "least_loaded", model_name: str = "folovllm",
                 num_threads_per_replica: int = 1, max_load_imbalance: Optional[int] = None) -> None:
        if not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be a positive integer, got {data_parallel_size!r}")
        get_routing_policy(routing)  # a bad name fails before any process starts
        self.model_name = model_name
        context = mp.get_context("spawn")  # fork would copy this process's threads and torch state
        self.replicas: list[EngineReplica] = []
        for index in range(data_parallel_size):
            parent_conn, child_conn = context.Pipe()
            process = context.Process(
                target=run_engine_replica, name=f"folovllm-dp-replica-{index}",
                args=(index, model, config, model_name, num_threads_per_replica, child_conn))
            process.start()
            child_conn.close()  # the child's end lives in the child only: its exit gives us EOF
            self.replicas.append(EngineReplica(index, process, parent_conn))
        try:
            infos = [self._wait_ready(r) for r in self.replicas]
        except BaseException:
            self._stop_processes(timeout_s=0)
            raise
        info = infos[0]
        from folovllm.engine.llm_engine import _load_tokenizer
        from folovllm.model_executor.model_loader import resolve_model_path

        self.engine = EngineView(info["config"], _load_tokenizer(resolve_model_path(model)),
                                 info["vocab_size"], info["description"])
        # prefix_aware: remember about as many block hashes as the replicas' caches hold together
        blocks = data_parallel_size * info["kv_cache_capacity_tokens"] // info["config"].block_size
        max_load_imbalance = max(1, config.max_num_seqs // 2) if max_load_imbalance is None else max_load_imbalance
        self.policy: RoutingPolicy = get_routing_policy(
            routing, max_load_imbalance=max_load_imbalance, max_entries=max(1, blocks))
        self.metrics = _MergedMetrics(self.replicas)
        self._streams: dict[str, _InFlight] = {}
        self._input_executor = ThreadPoolExecutor(max_workers=NUM_INPUT_THREADS,
                                                  thread_name_prefix="folovllm-input")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.closed_reason: Optional[str] = None
        self.dead_error: Optional[BaseException] = None
        self._num_adding = 0
        self._shutting_down = False
        logger.info("data parallel: %d replicas (pids %s), routing %s", data_parallel_size,
                    [r.process.pid for r in self.replicas], self.policy.name)

    def _wait_ready(self, replica: EngineReplica) -> dict:
        if not replica.conn.poll(STARTUP_TIMEOUT_S):
            raise ValueError(f"data-parallel replica {replica.index} did not start within {STARTUP_TIMEOUT_S:g} s")
        try:
            kind, payload = replica.conn.recv()
        except EOFError:
            replica.process.join(5)
            raise ValueError(f"data-parallel replica {replica.index} exited while starting "
                             f"(exit code {replica.process.exitcode})") from None
        if kind != "ready":
            raise ValueError(f"data-parallel replica {replica.index} could not start: {payload}")
        return payload

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the replicas' pipes on the running event loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for replica in self.replicas:
            replica.reader = threading.Thread(target=self._read, args=(replica, self._loop), daemon=True,
                                              name=f"folovllm-dp-reader-{replica.index}")
            replica.reader.start()

    async def shutdown(self) -> None:
        """Abort what is left, stop every replica (drained, then terminated past a deadline)."""
        self._shutting_down = True
        for request_id in list(self._streams):
            self.abort(request_id)
        for replica in self.replicas:
            replica.send(("shutdown",))
        start = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, self._stop_processes, SHUTDOWN_TIMEOUT_S)
        logger.info("data parallel: %d replicas stopped in %.1f s", len(self.replicas), time.monotonic() - start)
        self._input_executor.shutdown(wait=False, cancel_futures=True)

    def _stop_processes(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            replica.process.join(max(0.0, deadline - time.monotonic()))
        for replica in self.replicas:
            if replica.process.is_alive():
                logger.warning("replica %d did not stop within %g s: terminating it", replica.index, timeout_s)
                replica.process.terminate()
                replica.process.join(5)
            if replica.process.is_alive():
                replica.process.kill()
                replica.process.join(5)
            replica.alive = False
            replica.conn.close()

    @property
    def is_running(self) -> bool:
        """At least one replica serves (what `/health` reports)."""
        return any(r.alive for r in self.replicas)

    def health_detail(self) -> dict:
        """`/health`'s body: each replica, alive or not, and why it stopped."""
        return {"data_parallel_size": len(self.replicas), "routing": self.policy.name, "replicas": [
            {"replica": r.index, "alive": r.alive, "pid": r.process.pid, "num_requests": r.num_requests,
             "num_routed": r.num_routed,
             **({} if r.exit_reason is None else {"error": r.exit_reason})} for r in self.replicas]}

    @property
    def num_waiting(self) -> int:
        """Requests waiting in the live replicas (their last reports) and being added here."""
        return sum(r.num_waiting for r in self.replicas if r.alive) + self._num_adding

    # -- requests -------------------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams,
                          lora_request: Optional[LoRARequest] = None) -> RequestStream:
        """Route a request to a replica and queue it there; its outputs arrive on the returned
        stream. ValueError (the replica's engine's message) on bad input, adding nothing."""
        if lora_request is not None:
            raise ValueError("LoRA adapters are not served with --data-parallel-size > 1 yet")
        if self._loop is None:
            self.start()
        if self.closed_reason is not None:
            raise RequestAbortedError(self.closed_reason)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        self._num_adding += sampling_params.n
        try:
            routing_request = await self.run_off_loop(self._routing_request, prompt)
            live = [ReplicaLoad(r.index, r.num_requests, r.kv_cache_usage) for r in self.replicas if r.alive]
            if not live:
                raise EngineDeadError("every data-parallel replica has stopped: "
                                      + "; ".join(f"{r.index}: {r.exit_reason}" for r in self.replicas))
            if self.closed_reason is not None:
                raise RequestAbortedError(self.closed_reason)
            replica = self.replicas[self.policy.select(routing_request, live)]
            if routing_request.token_ids is not None:  # tokenized once, here
                prompt = ProcessedPrompt(self._prompt_text(prompt), routing_request.token_ids)
            entry = _InFlight(RequestStream(request_id, sampling_params.output_kind, self.abort), replica,
                              sampling_params.n, asyncio.get_running_loop().create_future())
            self._streams[request_id] = entry
            replica.num_requests += entry.num_samples
            replica.num_routed += 1
            replica.send(("add", request_id, prompt, sampling_params))
            try:
                await entry.added  # type: ignore[misc]
            except BaseException:  # refused (ValueError), the replica died, or we were cancelled
                if self._streams.get(request_id) is entry:
                    self._forget(request_id)
                    replica.send(("abort", request_id))
                raise
        finally:
            self._num_adding -= sampling_params.n
        return entry.stream

    def _routing_request(self, prompt: PromptType) -> RoutingRequest:
        """In an input thread: the prompt's token ids as the engine will read them (text
        tokenized the engine's way) and, for `prefix_aware`, its blocks' chain hashes."""
        try:
            if isinstance(prompt, ProcessedPrompt):
                text, ids = prompt
            else:
                text, ids = parse_prompt(prompt)
            if text is not None and ids is None:
                ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        except Exception:  # malformed: the replica refuses it with the engine's message
            return RoutingRequest()
        if not all(isinstance(t, int) for t in ids):  # the engine names the bad ids
            return RoutingRequest()
        hashes = prompt_block_hashes(ids, self.engine.config.block_size) if self.policy.uses_block_hashes else []
        return RoutingRequest(list(ids), hashes)

    @staticmethod
    def _prompt_text(prompt: PromptType) -> Optional[str]:
        if isinstance(prompt, ProcessedPrompt):
            return prompt.text
        try:
            return parse_prompt(prompt)[0]
        except ValueError:
            return None

    async def add_lora(self, lora_request: LoRARequest) -> None:
        raise ValueError("LoRA adapters are not served with --data-parallel-size > 1 yet")

    async def remove_lora(self, lora_int_id: int) -> None:
        raise ValueError("LoRA adapters are not served with --data-parallel-size > 1 yet")

    async def run_off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in an input thread (tokenizing, chat templates): never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._input_executor, fn, *args)

    def abort(self, request_id: str) -> None:
        """Abort a request (never blocks): its replica frees it before its next step."""
        entry = self._streams.get(request_id)
        if entry is not None:
            self._forget(request_id)
            entry.replica.send(("abort", request_id))

    def abort_all(self, reason: str) -> None:
        """The shutdown grace is over: end every stream with `RequestAbortedError` (see
        `AsyncLLM.abort_all`) and refuse new requests."""
        self.closed_reason = reason
        for request_id, entry in list(self._streams.items()):
            entry.stream.put(RequestAbortedError(reason))
            self.abort(request_id)

    def _forget(self, request_id: str, error: Optional[Exception] = None) -> _InFlight:
        """Drop a request from the books; one still being added fails with `error` (an abort
        by default: the shutdown grace ended while it was on its way)."""
        entry = self._streams.pop(request_id)
        entry.replica.num_requests -= entry.num_samples
        if entry.added is not None and not entry.added.done():
            entry.added.set_exception(error or RequestAbortedError(self.closed_reason or "aborted"))
        return entry

    # -- messages from the replicas (on the event loop) -------------------------------------------

    def _read(self, replica: EngineReplica, loop: asyncio.AbstractEventLoop) -> None:
        """A reader thread: one replica's messages, handed to the event loop in order."""
        while True:
            try:
                message = replica.conn.recv()
            except (EOFError, OSError):
                message = ("eof",)
            try:
                loop.call_soon_threadsafe(self._on_message, replica, message)
            except RuntimeError:  # the loop is closed: the server is gone
                return
            if message[0] == "eof":
                return

    def _on_message(self, replica: EngineReplica, message: tuple) -> None:
        kind = message[0]
        if kind == "output":
            output = message[1]
            entry = self._streams.get(output.request_id)
            if entry is None or entry.replica is not replica:
                return  # aborted here already
            entry.stream.put(output)
            if output.finished:
                self._forget(output.request_id)
        elif kind == "stats":
            _, replica.num_waiting, replica.kv_cache_usage, replica.metrics_text = message
        elif kind in ("added", "add_error", "request_error"):
            entry = self._streams.get(message[1])
            if entry is None or entry.replica is not replica:
                return
            if kind == "added":
                if entry.added is not None and not entry.added.done():
                    entry.added.set_result(None)
                return
            error_type, text = message[2], message[3]
            error: Exception = {"ValueError": ValueError, "RequestAbortedError": RequestAbortedError}.get(
                error_type, EngineDeadError)(text)
            if kind == "add_error":
                if entry.added is not None and not entry.added.done():
                    entry.added.set_exception(error)
            else:
                self._forget(message[1], error)
                entry.stream.put(error)
        elif kind == "eof":
            self._on_replica_exit(replica)

    def _on_replica_exit(self, replica: EngineReplica) -> None:
        if not replica.alive or self._shutting_down:
            replica.alive = False
            return  # stopped by shutdown
        replica.alive = False
        replica.process.join(1)
        code = replica.process.exitcode
        replica.exit_reason = f"exited with code {code}" if code is not None else "its pipe closed"
        failed = [rid for rid, e in self._streams.items() if e.replica is replica]
        logger.error("data-parallel replica %d (pid %s) %s: out of rotation; %d requests in flight on it "
                     "fail, %d replicas keep serving", replica.index, replica.process.pid, replica.exit_reason,
                     len(failed), sum(r.alive for r in self.replicas))
        for request_id in failed:
            error = EngineDeadError(f"data-parallel replica {replica.index} {replica.exit_reason}; "
                                    "the request was lost with it")
            was_added = self._streams[request_id].added is None or self._streams[request_id].added.done()
            entry = self._forget(request_id, error)
            if was_added:
                entry.stream.put(error)
        if not self.is_running:
            self.dead_error = EngineDeadError("every data-parallel replica has stopped")


class _MergedMetrics:
    """`GET /metrics` of a DP server: every replica's Prometheus text, each sample labelled
    `replica="i"`, one HELP/TYPE per metric (the text format wants a metric's samples together).
    A dead replica's last report stays: its counters are history."""

    def __init__(self, replicas: list[EngineReplica]) -> None:
        self.replicas = replicas

    def render(self) -> bytes:
        return merge_metrics({r.index: r.metrics_text for r in self.replicas})


def merge_metrics(texts: dict[int, bytes]) -> bytes:
    """Prometheus texts of several replicas -> one text with a `replica` label on each sample."""
    order: list[str] = []
    header: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for index, text in texts.items():
        family = ""
        for line in text.decode().splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family not in header:
                    order.append(family)
                    header[family], samples[family] = [], []
                if line not in header[family]:
                    header[family].append(line)
            elif line and not line.startswith("#"):
                name, brace, rest = line.partition("{")
                if brace:
                    line = f'{name}{{replica="{index}",{rest}'
                else:
                    name, _, value = line.partition(" ")
                    line = f'{name}{{replica="{index}"}} {value}'
                samples.setdefault(family, []).append(line)
    lines = [line for family in order for line in header[family] + samples[family]]
    return ("\n".join(lines) + "\n").encode() if lines else b""
