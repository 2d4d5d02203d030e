"""`MultiprocExecutor`: one worker process per tensor-parallel rank, driven from the engine
(stage 08; vLLM's `v1/executor/multiproc_executor.py`).

    engine process (driver)                       worker processes
    scheduler, KV block manager, sampler          rank 0            rank 1
        |  InputBatch (pickled) -------pipe-----> | model shard 0 | | model shard 1 |
        |                          ----pipe-----> |   all-reduce <=gloo/nccl=> ...  |
        |  <---- logits of rows that sample ----- | (rank 0 only)                   |
        v  sample, update requests

Each step the driver sends the same `InputBatch` to every rank (a broadcast over one pipe per
rank): plain lists, a few bytes per decode row plus its block table, never a `Request`; with
`persistent_input_batch` (the default) its diff instead (`InputBatchDiff`, worker/
persistent_batch.py): each rank keeps the block tables and patches them identically. The
ranks run the forward pass together, meeting in `parallel_state`'s collectives, and rank 0
sends back the logits of the rows that sample. The engine samples them (`Executor.execute_model`
is the same call at every TP size): the requests and their seeded generators live in its
process, so sampling is exactly stage 01-07's. vLLM samples in the rank-0 worker instead, which
saves sending [rows, vocab] logits, and keeps per-request state on the worker side to do it.

Faults: the driver never blocks on a pipe without watching the processes. A rank that dies, or
raises, or stays silent past `step_timeout_s`, makes the call raise `RuntimeError` naming the
rank (a rank that is alive but stopped, whose peers wait for it, is the one named), after every worker is stopped (terminated if need be). Workers are daemons and exit when
the driver's pipe closes, so none outlives the engine; `shutdown()` (also run when the executor
is garbage collected or the interpreter exits) stops them in order.

Ranks on several machines are `torchrun`'s to start: see `external_launcher.py` and
docs/stages/08-tensor-parallel.md, "Beyond one machine".
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from folovllm.config import EngineConfig, verify_tensor_parallel
from folovllm.distributed import parallel_state
from folovllm.executor.abstract import Executor, WorkerDiedError


# -- messages ---------------------------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """A message down a pipe (a call or a reply), as bytes."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


# -- the worker process -----------------------------------------------------------------------


def worker_main(
    rank: int,
    world_size: int,
    init_method: str,
    config: EngineConfig,
    model_path: Path,
    conn: Connection,
    num_threads: int,
) -> None:
    """A worker process: join the group, build this rank's shard, then answer calls until the
    driver says stop (None) or goes away (EOF)."""
    from folovllm.worker.worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        torch.set_num_threads(num_threads)
        if config.device.startswith("cuda"):
            torch.cuda.set_device(rank)
            config = config.replace(device=f"cuda:{rank}")
        parallel_state.init_distributed_environment(
            world_size, rank, init_method, backend="nccl" if config.device.startswith("cuda") else "gloo"
        )
        worker = Worker(config, model_path)
    except ValueError as e:  # the user's input (a missing or corrupt checkpoint): say it as is
        conn.send_bytes(dumps(("invalid", str(e))))
        return
    except BaseException:
        conn.send_bytes(dumps(("error", traceback.format_exc())))
        return
    conn.send_bytes(dumps(("ok", os.getpid())))
    try:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break  # the driver is gone
            if message is None:
                break
            method, args = message
            try:
                value = getattr(worker, method)(*args)
                if isinstance(value, torch.Tensor):  # rank 0's logits cross the pipe from the CPU
                    value = value.cpu()
                elif isinstance(value, tuple):  # (logits, expert load) of `Worker.execute_model`
                    value = tuple(v.cpu() if isinstance(v, torch.Tensor) else v for v in value)
                reply = ("ok", value)
            except Exception:
                reply = ("error", traceback.format_exc())
            conn.send_bytes(dumps(reply))
    finally:
        parallel_state.destroy_distributed_environment()


# -- the driver side --------------------------------------------------------------------------


class MultiprocExecutor(Executor):
    startup_timeout_s = 600.0  # loading a large checkpoint from a slow disk
    step_timeout_s = 600.0  # a step that takes longer is a hang, not work
    poll_interval_s = 0.05

    def __init__(self, config: EngineConfig, model_path: Path, hf_config: Any) -> None:
        super().__init__(config, model_path, hf_config)
        self.world_size = config.tensor_parallel_size
        verify_tensor_parallel(hf_config, self.world_size, config.enable_expert_parallel)
        self._failure: Optional[str] = None
        ctx = mp.get_context("spawn")  # fork would copy the driver's threads and CUDA state
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        num_threads = max(1, torch.get_num_threads() // self.world_size)
        self.processes: list[mp.Process] = []
        self.conns: list[Connection] = []
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(
                target=worker_main,
                args=(rank, self.world_size, init_method, config, model_path, child_conn, num_threads),
                name=f"folovllm-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            child_conn.close()  # the driver keeps its end only: EOF when the worker dies
            self.processes.append(process)
            self.conns.append(parent_conn)
        # Stops the workers however the executor ends: shutdown(), garbage collection, exit.
        self._finalizer = weakref.finalize(self, _stop_workers, self.processes, self.conns)
        self._gather("start-up", self.startup_timeout_s)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    # --8<-- [start:collective_rpc]
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)
        message = dumps((method, args))
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(message)
            except OSError:  # the pipe is closed: that worker is gone
                self._fail(self._death_report() or f"cannot reach tensor-parallel worker rank {rank}")
        return self._gather(method, self.step_timeout_s)
    # --8<-- [end:collective_rpc]

    def shutdown(self) -> None:
        self._finalizer()

    # -- waiting without hanging --------------------------------------------------------------

    def _gather(self, what: str, timeout_s: float) -> list[Any]:
        """One reply per rank, in rank order, watching every process while waiting."""
        deadline = time.monotonic() + timeout_s
        results = []
        for rank, conn in enumerate(self.conns):
            while not conn.poll(self.poll_interval_s):
                dead = self._death_report()
                if dead:
                    self._fail(dead)
                if time.monotonic() > deadline:
                    # Rank 0 waits in a collective for a stopped peer: blame the peer.
                    self._fail(self._stopped_report() or f"tensor-parallel worker rank {rank} gave no "
                                                         f"answer to {what!r} in {timeout_s:.0f} s")
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                self._fail(self._death_report(wait_s=2.0) or f"tensor-parallel worker rank {rank} closed its pipe")
            if status == "invalid":  # bad input, found by a worker: a ValueError, as at TP=1
                self._failure = f"tensor-parallel worker rank {rank} refused the model: {value}"
                self.shutdown()
                raise ValueError(value)
            if status == "error":
                # A rank whose peer died fails in the collective: report the death, the cause.
                # A rank whose peer is stopped times out in the collective: report the stop.
                self._fail(self._death_report(wait_s=1.0) or self._stopped_report()
                           or f"tensor-parallel worker rank {rank} failed in {what!r}:\n{value}")
            results.append(value)
        return results

    def _death_report(self, wait_s: float = 0.0) -> Optional[str]:
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in enumerate(self.processes):
                if process.exitcode is not None:
                    return (
                        f"tensor-parallel worker rank {rank} (pid {process.pid}) died with exit "
                        f"code {process.exitcode}"
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_interval_s)

    def _stopped_report(self) -> Optional[str]:
        """A worker that is alive but stopped (SIGSTOP, Ctrl-Z, a debugger): its peers wait for
        it in the next collective, so rank 0 is the one that times out, and was blamed."""
        for rank, process in enumerate(self.processes):
            if _process_state(process.pid) in ("T", "t"):
                return (f"tensor-parallel worker rank {rank} (pid {process.pid}) is stopped (SIGSTOP "
                        "or a debugger), so the other ranks wait for it in the collectives")
        return None

    def _fail(self, reason: str) -> None:
        self._failure = f"{reason}; all workers were stopped and the engine cannot continue"
        self.shutdown()
        raise WorkerDiedError(self._failure)


def _stop_workers(processes: list[mp.Process], conns: list[Connection], timeout_s: float = 5.0) -> None:
    """Ask every worker to stop, then terminate and kill the ones that do not; reap them all."""
    for conn in conns:
        try:
            conn.send_bytes(dumps(None))
        except OSError:
            pass
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()  # e.g. blocked in a collective whose peer died
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a stopped process takes SIGTERM once continued
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    for conn in conns:
        conn.close()


def _process_state(pid: Optional[int]) -> Optional[str]:
    """The state letter of /proc/PID/stat ("R", "S", "T" stopped, ...); None where there is no
    /proc (not Linux) or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
