"""`ExecutorWithExternalLauncher`: tensor parallelism over processes that `torchrun` started, on
one machine or several (vLLM's `distributed_executor_backend="external_launcher"`).

    node 0 (torchrun --node-rank 0)                    node 1 (torchrun --node-rank 1)
    rank 0: LLMEngine: scheduler, KV blocks, sampler    rank 1: run_worker()
            + its own Worker (shard 0), in process              Worker (shard 1)
       | InputBatch --- broadcast_object_list, gloo "control" group ---> |
       | <============ the model's all-reduces (gloo / NCCL) ==========> |
       v logits of the rows that sample (rank 0: the LM head gathers there)

`MultiprocExecutor` starts its workers itself and reaches them through pipes, so all its ranks
live on one machine. Here `torchrun` starts every process, on every node, and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the processes find each other through
`init_process_group("env://")`. Rank 0 runs the engine with its shard in process (as
`UniProcExecutor` does); every other rank runs `run_worker`, a loop that receives a call, runs it
on its shard and meets the others in the collectives, exactly as stage 08's workers do.

How a step reaches the other ranks. Over torch.distributed itself, on a gloo group of its own:
`broadcast_object_list` pickles the call (an `InputBatch`: plain lists, a few hundred bytes for a
decode step plus the block tables; by default its `InputBatchDiff`, without them) and sends it from rank 0 to every rank. No transport of our own, and it crosses
nodes wherever the collectives do. A separate gloo group because the model's group may be NCCL
(GPU tensors only) and because its timeout differs: a worker waits for the next step as long as
the server is idle. vLLM does it differently in both of its launchers:

- with `external_launcher`, every torchrun process runs the whole engine, scheduler included;
  the scheduler is deterministic, so every rank computes the same step and nothing is sent;
  only rank 0 returns outputs. It needs every rank to see the same requests in the same order
  (an offline `LLM.generate` script, not a server).
- `MultiprocExecutor` sends each step over a shared-memory ring buffer (`MessageQueue`, the
  "shm broadcast"), and over ZeroMQ sockets to readers on other nodes: faster than a pickled
  gloo broadcast, which costs two collectives (size, then bytes) a step.

One engine with a broadcast keeps a server possible on rank 0 (`folovllm serve`), at the price
of that message.

Replies. `execute_model` gets rank 0's logits only, and the workers send nothing back: a reply
per step would cost another collective (vLLM's `unique_reply_rank`). The other calls
(`kv_cache_spec`, `determine_available_memory`, `comm_stats`, ...) gather every rank's answer.

Faults. A worker that fails records why in torchrun's key-value store (`TCPStore`, the one the
ranks met through) and exits; a worker that is killed, or whose node goes away, says nothing,
and its peers' next collective fails (the TCP connection closes) or times out. Rank 0 then reads
the store and raises `WorkerDiedError` naming the rank, its node, host and pid: the reason a
worker left, or "no word" for one that vanished. Every process then exits (rank 0's exit closes
the connections the others wait on), and torchrun reaps its node's processes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from folovllm.config import EngineConfig, verify_tensor_parallel
from folovllm.distributed import parallel_state
from folovllm.executor.abstract import Executor, WorkerDiedError
from folovllm.worker.persistent_batch import StepBatch

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_EXAMPLE = ("torchrun --nnodes N --nproc-per-node M --node-rank I --master-addr HOST "
                  "--master-port PORT -m folovllm.entrypoints.cli generate --model PATH "
                  "--tensor-parallel-size N*M --distributed-executor-backend external_launcher ...")
# A worker waits for rank 0's next call as long as the server is idle: the control group's
# timeout only bounds a wait that nothing else will end (rank 0 exiting closes the connection,
# which ends the wait at once).
IDLE_TIMEOUT = timedelta(days=30)


# -- who am I: torchrun's environment ----------------------------------------------------------


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process it starts (GROUP_RANK is the node's rank)."""

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    master_addr: str
    master_port: int
    run_id: str  # torchrun's run id and restart count: the store's keys are per attempt

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "TorchrunEnv":
        missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
        if missing:
            raise ValueError(
                f"distributed_executor_backend='external_launcher' runs in processes started by "
                f"torchrun, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set "
                f"here. Launch it on every node with: {LAUNCH_EXAMPLE} (or leave the flag out: "
                f"the default 'mp' starts the ranks of one machine itself)")
        try:
            values = {name: int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        except ValueError:
            raise ValueError("torchrun's RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers, got "
                             + ", ".join(f"{n}={environ[n]!r}" for n in TORCHRUN_VARIABLES)) from None
        run_id = f"{environ.get('TORCHELASTIC_RUN_ID', 'none')}/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return cls(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"],
                   node_rank=int(environ.get("GROUP_RANK", "0")), master_addr=environ["MASTER_ADDR"],
                   master_port=values["MASTER_PORT"], run_id=run_id)


def verify_world_size(env: TorchrunEnv, tensor_parallel_size: int) -> None:
    """Every process torchrun started is one tensor-parallel rank: no other parallelism here."""
    if env.world_size != tensor_parallel_size:
        raise ValueError(
            f"torchrun started WORLD_SIZE={env.world_size} processes but tensor_parallel_size="
            f"{tensor_parallel_size}: with distributed_executor_backend='external_launcher' every "
            f"process is one tensor-parallel rank, so they must be equal (nnodes x nproc-per-node "
            f"= tensor_parallel_size)")


def is_driver(environ: Mapping[str, str] = os.environ) -> bool:
    """True in the process that runs the engine: rank 0 (or anywhere outside torchrun)."""
    return environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class RankInfo:
    """Where a rank runs: what a fault report names."""

    rank: int
    node_rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} (node {self.node_rank}, host {self.host}, pid {self.pid})"


# -- joining, and the two groups -----------------------------------------------------------------


@dataclass
class _World:
    env: TorchrunEnv
    control: Any  # gloo group: the calls (broadcast) and their replies (gather)
    store: Any  # torchrun's TCPStore: why a rank left

    def set_exit_reason(self, reason: str) -> None:
        try:
            self.store.set(f"exit/{self.env.rank}", reason)
        except Exception:  # the store went with node 0: nobody is left to read it
            pass


def _join(env: TorchrunEnv, device: str) -> _World:
    """Join the world torchrun launched: the model's group (gloo on CPU, NCCL on CUDA, its
    timeout bounding every collective) and the gloo control group."""
    cuda = device.startswith("cuda")
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={env.local_rank} on node {env.node_rank}, but {torch.cuda.device_count()} "
                             "GPUs are visible there: start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(env.local_rank)  # one GPU per process, by its rank on the node
    parallel_state.init_distributed_environment(env.world_size, env.rank, "env://",
                                                backend="nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    # A client of the store the ranks met through (torchrun's, on node 0), its keys per attempt.
    store = dist.PrefixStore(f"folovllm/{env.run_id}", dist.TCPStore(
        env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=30)))
    return _World(env, control, store)


def _rank_config(config: EngineConfig, env: TorchrunEnv) -> EngineConfig:
    return config.replace(device=f"cuda:{env.local_rank}") if config.device.startswith("cuda") else config


def _broadcast(world: _World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled by torch.distributed)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]


def _gather(world: _World, obj: Any) -> Optional[list[Any]]:
    """Every rank's `obj` on rank 0, in rank order; None elsewhere."""
    out = [None] * world.env.world_size if world.env.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=world.control)
    return out


def _build_worker(config: EngineConfig, model_path: Path, env: TorchrunEnv) -> tuple[Any, tuple]:
    """This rank's shard -> (worker or None, status): ("ok", RankInfo), ("invalid", message) for
    the user's input (a bad checkpoint), ("error", traceback)."""
    from folovllm.worker.worker import Worker

    try:
        worker = Worker(_rank_config(config, env), model_path)
    except ValueError as e:
        return None, ("invalid", str(e))
    except Exception:
        return None, ("error", traceback.format_exc())
    return worker, ("ok", RankInfo(env.rank, env.node_rank, socket.gethostname(), os.getpid()))


# -- rank 0: the engine's executor ----------------------------------------------------------------


class ExecutorWithExternalLauncher(Executor):
    """Rank 0's executor: its own shard in process, the other ranks reached through the control
    group. Built by the engine (`get_executor_cls`) in the process torchrun gave rank 0."""

    exit_reason_wait_s = 3.0  # how long a fault report waits for the failing ranks' reasons

    def __init__(self, config: EngineConfig, model_path: Path, hf_config: Any) -> None:
        super().__init__(config, model_path, hf_config)
        env = TorchrunEnv.from_environ()
        verify_world_size(env, config.tensor_parallel_size)
        verify_tensor_parallel(hf_config, env.world_size)
        if env.rank != 0:
            raise ValueError(
                f"the engine runs on rank 0 only; this process is rank {env.rank}, which serves its "
                "shard with folovllm.executor.external_launcher.run_worker() (the CLI does this)")
        self._failure: Optional[str] = None
        self.world = _join(env, config.device)
        # Start-up: every rank builds its shard from rank 0's config, then all learn who failed.
        _broadcast(self.world, (config, model_path))
        self.worker, status = _build_worker(config, model_path, env)
        statuses = [None] * env.world_size
        dist.all_gather_object(statuses, status, group=self.world.control)
        for rank, (kind, value) in enumerate(statuses):
            if kind != "ok":  # every rank saw it and exits: nothing to stop
                parallel_state.destroy_distributed_environment()
                where = "rank 0" if rank == 0 else f"tensor-parallel rank {rank}"
                if kind == "invalid":
                    raise ValueError(value if rank == 0 else f"{where} refused the model: {value}")
                raise WorkerDiedError(f"{where} failed to start:\n{value}")
        self.ranks: list[RankInfo] = [value for _, value in statuses]
        logger.info("tensor parallel over torchrun: %s", ", ".join(map(str, self.ranks)))
        self._finalizer = weakref.finalize(self, _stop_workers, self.world)

    # --8<-- [start:external_launcher_call]
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """`Worker.method(*args)` on every rank; every rank's answer, in rank order."""
        return self._call(method, args, reply=True)

    def execute_model(self, batch: StepBatch) -> Optional[torch.Tensor]:
        """One step: the batch to every rank, rank 0's logits back; the others reply nothing."""
        return self._step_result(self._call("execute_model", (batch,), reply=False)[0])

    def _call(self, method: str, args: tuple, reply: bool) -> list[Any]:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)
        try:
            _broadcast(self.world, (method, args, reply))
            mine = getattr(self.worker, method)(*args)  # meets the other ranks in the collectives
            if not reply:
                return [mine]
            replies = _gather(self.world, ("ok", None))
        except Exception as e:  # a peer vanished, or this rank failed mid-step: out of step for good
            self._fail(e)
        failed = [(rank, value) for rank, (kind, value) in enumerate(replies) if kind != "ok"]
        if failed:
            rank, value = failed[0]
            self._fail(RuntimeError(f"{self.ranks[rank]} failed in {method!r}:\n{value}"))
        return [mine, *(value for _, value in replies[1:])]
    # --8<-- [end:external_launcher_call]

    def shutdown(self) -> None:
        if self._failure is None:
            self._finalizer()

    def _fail(self, error: Exception) -> None:
        """Name the ranks that left (their reasons from the store, or none), and give up."""
        self._finalizer.detach()  # the group is broken: no stop message can cross it
        self._failure = f"{self._report(error)}; the engine cannot continue"
        raise WorkerDiedError(self._failure) from error

    def _report(self, error: Exception) -> str:
        if not _raised_by_torch_distributed(error):
            # Rank 0's own code failed (not a collective): the other ranks are alive, waiting
            # for it in a collective, and leave when this process exits.
            return f"tensor-parallel rank 0 failed: {type(error).__name__}: {error}"
        deadline = time.monotonic() + self.exit_reason_wait_s
        reasons: dict[int, str] = {}
        while True:
            for info in self.ranks[1:]:
                if info.rank not in reasons:
                    try:
                        if self.world.store.check([f"exit/{info.rank}"]):
                            reasons[info.rank] = self.world.store.get(f"exit/{info.rank}").decode()
                    except Exception:  # the store is gone (node 0's torchrun went away)
                        pass
            if len(reasons) == len(self.ranks) - 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        silent = [info for info in self.ranks[1:] if info.rank not in reasons]
        lines = [f"tensor-parallel {info} is gone without a word (killed, crashed, or its node is "
                 "unreachable)" for info in silent]
        lines += [f"tensor-parallel {self.ranks[rank]} stopped: {reason}" for rank, reason in sorted(reasons.items())]
        if not lines:
            lines = [f"tensor-parallel rank 0 failed: {error}"]
        return "; ".join(lines) + f" (rank 0 saw: {type(error).__name__}: {str(error).strip()[:300]})"


def _raised_by_torch_distributed(error: BaseException) -> bool:
    """Whether the innermost frame is torch.distributed's (a collective that failed or timed
    out: a peer is the cause) rather than our own code's."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "torch/distributed" in frames[-1].filename.replace(os.sep, "/")


def _stop_workers(world: _World) -> None:
    """The clean end: tell every worker to leave its loop, then leave the group."""
    try:
        _broadcast(world, None)
    except Exception:
        pass
    parallel_state.destroy_distributed_environment()


# -- the other ranks: the worker loop --------------------------------------------------------------


def run_worker(config: EngineConfig, env: Optional[TorchrunEnv] = None) -> int:
    """A rank other than 0: join, build this rank's shard from rank 0's config, then run every
    call rank 0 broadcasts until it says stop (None). Returns the process's exit code: 0 after
    the stop message, 1 when this rank failed or rank 0 went away. `config` is this process's
    own (the same command line on every rank); it picks the backend, rank 0's is the one used."""
    env = env or TorchrunEnv.from_environ()
    verify_world_size(env, config.tensor_parallel_size)
    world = _join(env, config.device)
    me = f"rank {env.rank} (node {env.node_rank})"
    try:
        rank0_config, model_path = _broadcast(world, None)
        worker, status = _build_worker(rank0_config, model_path, env)
        statuses = [None] * env.world_size
        dist.all_gather_object(statuses, status, group=world.control)
        if any(kind != "ok" for kind, _ in statuses):
            logger.error("%s: start-up failed on %s; leaving", me,
                         ", ".join(f"rank {r}" for r, (kind, _) in enumerate(statuses) if kind != "ok"))
            return 1
        logger.info("%s of %d: shard loaded (pid %d); waiting for steps", me, env.world_size, os.getpid())
        steps = 0
        while True:
            try:
                message = _broadcast(world, None)
            except Exception as e:  # rank 0 is gone (or the group broke): nothing more will come
                logger.error("%s: lost rank 0 (%s); leaving", me, e)
                world.set_exit_reason(f"lost rank 0 while waiting for a step: {e}")
                return 1
            if message is None:
                logger.info("%s: stop received after %d steps", me, steps)
                return 0
            method, args, reply = message
            try:
                value = getattr(worker, method)(*args)
            except Exception as e:
                # Mid-step the ranks are out of step for good: say why, and leave.
                logger.error("%s: %r failed:\n%s", me, method, traceback.format_exc())
                world.set_exit_reason(f"{method!r} failed on this rank: {type(e).__name__}: {e}")
                if reply:  # rank 0 waits for the answers: give it the traceback
                    try:
                        _gather(world, ("error", traceback.format_exc()))
                    except Exception:
                        pass
                return 1
            if method == "execute_model":
                steps += 1
                if steps == 1:
                    logger.info("%s: first step done", me)
            if reply:
                _gather(world, ("ok", value))
    finally:
        parallel_state.destroy_distributed_environment()
