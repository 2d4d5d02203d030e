"""Stage 08 across machines: tensor parallelism over ranks that torchrun started
(`--distributed-executor-backend external_launcher`), two "nodes" on the loopback.

Guards: two torchrun invocations (`--nnodes 2 --nproc-per-node 1 --node-rank 0|1`, gloo) running
`folovllm generate` give TP=1's greedy text, whose tokens are HF transformers'; node 1 prints
nothing but its worker log and leaves on the stop message; a worker killed mid-run makes rank 0
fail with an error naming the rank, its node and pid, and neither node keeps a process; the
refusals (no torchrun, WORLD_SIZE != tensor_parallel_size, an engine on rank 1, unknown backend)
say what was wrong.

Each torchrun invocation starts in a session of its own (and torchrun starts each rank in
another): the test finds a node's processes by its agent's session id and the ranks' pids that
rank 0 logs, asserts none is left when the run is over, and kills whatever is left at the end,
pass or fail. Every wait has a timeout. Start-up is most of the cost (four processes
importing torch on two cores): ~20-30 s per run on a loaded machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from folovllm import LLM, SamplingParams
from folovllm.config import EngineConfig
from folovllm.entrypoints import cli
from folovllm.executor import get_executor_cls
from folovllm.executor.multiproc_executor import MultiprocExecutor
from folovllm.executor.external_launcher import ExecutorWithExternalLauncher, TorchrunEnv, verify_world_size
from tests.helpers import hf_greedy_ignore_eos

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240  # one torchrun pair, start-up included, on a loaded 2-core machine
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a"]
MAX_TOKENS = 16
ENGINE_FLAGS = ["--stage", "5", "--dtype", "float32", "--kv-cache-memory", "4MiB", "--threads", "1"]


# -- running torchrun -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running (not reaped, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _session_pids(sid: int) -> list[int]:
    """Every live process of session `sid`: a torchrun agent (its ranks get sessions of their own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):  # fields[3]: the session
                pids.append(int(entry))
    return pids


def _rank_pids(node0: "Node") -> list[int]:
    """The pids of the ranks, as rank 0 logs them ("rank 1 (node 1, host h, pid 123)")."""
    return [int(p) for p in re.findall(r"rank \d+ \(node \d+, host \S+, pid (\d+)\)", node0.stderr)]


class Node:
    """One `torchrun --node-rank I` invocation, in a session of its own (so all its processes
    can be found and, at the end, killed), its output in files."""

    def __init__(self, node_rank: int, port: int, cli_args: list[str], log_dir: Path) -> None:
        self.stdout_path, self.stderr_path = log_dir / f"node{node_rank}.out", log_dir / f"node{node_rank}.err"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FOLOVLLM_CONFIGURE_LOGGING="1")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                 "-m", "folovllm.entrypoints.cli", *cli_args],
                stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        self.sid = self.process.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        return self.process.wait(timeout=timeout_s)

    def leftover(self, ranks: list[int], grace_s: float = 10.0) -> list[int]:
        """This node's processes still alive after `grace_s`: its torchrun agent's session, and
        those of `ranks` that were its (torchrun starts each rank in a session of its own)."""
        self.ranks = set(ranks) | getattr(self, "ranks", set())
        deadline = time.monotonic() + grace_s
        while True:
            pids = _session_pids(self.sid) + [p for p in self.ranks if _alive(p) and _is_ours(p)]
            if not pids or time.monotonic() > deadline:
                return pids
            time.sleep(0.2)

    def kill(self) -> None:
        for pid in _session_pids(self.sid) + [p for p in getattr(self, "ranks", ()) if _alive(p) and _is_ours(p)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _is_ours(pid: int) -> bool:
    """A process running our CLI (a pid may have been reused by the time we look)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"folovllm.entrypoints.cli" in f.read()
    except OSError:
        return False


@pytest.fixture
def two_nodes(tmp_path) -> Iterator:
    """two_nodes(cli_args) -> (node 0, node 1), started side by side; every process of both
    is killed at the end of the test, whatever happened."""
    nodes: list[Node] = []

    def start(cli_args: list[str]) -> tuple[Node, Node]:
        port = _free_port()
        nodes.extend(Node(rank, port, cli_args, tmp_path) for rank in (0, 1))
        return nodes[-2], nodes[-1]

    try:
        yield start
    finally:
        for node0, node1 in zip(nodes[::2], nodes[1::2]):
            ranks = _rank_pids(node0)
            for node in (node0, node1):
                node.ranks = set(ranks) | getattr(node, "ranks", set())
                node.kill()


def _generate_args(model: Path, max_tokens: int) -> list[str]:
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    return ["generate", "--model", str(model), *ENGINE_FLAGS, *prompts, "--max-tokens", str(max_tokens),
            "--temperature", "0", "--ignore-eos", "--tensor-parallel-size", "2",
            "--distributed-executor-backend", "external_launcher"]


def _texts(stdout: str) -> list[str]:
    """The text of each sample `folovllm generate` printed, in prompt order."""
    return re.findall(r"^--- sample 0 \(\d+ tokens.*?\)\n(.*?)\n--- TTFT", stdout, re.S | re.M)


# -- the tokens ---------------------------------------------------------------------------------


def test_two_nodes_tp2_equal_tp1_and_hf(tiny_qwen3, hf_qwen3, two_nodes):
    node0, node1 = two_nodes(_generate_args(tiny_qwen3, MAX_TOKENS))
    # The reference while the nodes start: TP=1 in this process, its tokens checked against HF.
    llm = LLM(str(tiny_qwen3), stage=5, dtype="float32", kv_cache_memory=4 << 20)
    tp1 = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                       use_tqdm=False)
    for prompt, out in zip(PROMPTS, tp1):
        assert out.outputs[0].token_ids == hf_greedy_ignore_eos(hf_qwen3, out.prompt_token_ids, MAX_TOKENS), prompt
    assert len({t for o in tp1 for t in o.outputs[0].token_ids}) > 20  # a diverse reference

    rc0, rc1 = node0.wait(), node1.wait()
    assert (rc0, rc1) == (0, 0), f"node 0:\n{node0.stderr[-3000:]}\nnode 1:\n{node1.stderr[-3000:]}"
    assert _texts(node0.stdout) == [o.outputs[0].text for o in tp1]
    assert f"{len(PROMPTS) * MAX_TOKENS} tokens in" in node0.stdout
    assert "rank 0 (node 0" in node0.stderr and "rank 1 (node 1" in node0.stderr
    # Node 1 runs the worker loop: no output of its own, and it leaves on the stop message.
    assert node1.stdout == ""
    assert re.search(r"rank 1 \(node 1\): stop received after \d+ steps", node1.stderr)
    ranks = _rank_pids(node0)
    assert len(ranks) == 2
    assert node0.leftover(ranks) == [] and node1.leftover(ranks) == []


# -- faults -------------------------------------------------------------------------------------


def _wait_for(node: Node, pattern: str, timeout_s: float = RUN_TIMEOUT_S) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, node.stderr):
            return match
        if node.process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared; node stderr:\n{node.stderr[-3000:]}")


def test_killed_worker_node_fails_rank0_clearly_and_leaves_no_process(tiny_qwen3, two_nodes):
    # Far more tokens than the run lives: the kill lands mid-run, whatever the machine's speed.
    node0, node1 = two_nodes(_generate_args(tiny_qwen3, 1000))
    pid = int(_wait_for(node1, r"shard loaded \(pid (\d+)\)").group(1))
    _wait_for(node1, r"first step done")
    ranks = _rank_pids(node0)
    assert pid in ranks and all(_alive(p) and _is_ours(p) for p in ranks)  # what the check below watches
    os.kill(pid, signal.SIGKILL)
    rc0, rc1 = node0.wait(), node1.wait()
    assert rc0 != 0 and rc1 != 0
    assert "tokens in" not in node0.stdout  # it failed mid-run, nothing was printed as done
    error = re.search(r"^folovllm: error: (.*)$", node0.stderr, re.M)
    assert error, node0.stderr[-3000:]
    assert re.search(rf"tensor-parallel rank 1 \(node 1, host \S+, pid {pid}\) is gone without a word", error.group(1))
    assert "the engine cannot continue" in error.group(1)
    assert node0.leftover(ranks) == [] and node1.leftover(ranks) == []


# -- refusals (no process started) ---------------------------------------------------------------


TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}


def test_external_launcher_refusals(tiny_qwen3, hf_qwen3, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"distributed_executor_backend must be one of .*'external_launcher'.*got 'ray'"):
        EngineConfig(distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="'uni' runs the model in this process only, but tensor_parallel_size=2"):
        EngineConfig(distributed_executor_backend="uni", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"started by torchrun, but RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                                         r"MASTER_PORT are not set here\. Launch it on every node with: torchrun"):
        TorchrunEnv.from_environ({})
    env = TorchrunEnv.from_environ(dict(TORCHRUN_ENV, GROUP_RANK="1"))
    assert (env.rank, env.world_size, env.node_rank) == (0, 2, 1)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 processes but tensor_parallel_size=4: .* must be equal"):
        verify_world_size(env, 4)
    config = EngineConfig(tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    assert get_executor_cls(config) is ExecutorWithExternalLauncher
    assert get_executor_cls(EngineConfig(distributed_executor_backend="mp")) is MultiprocExecutor  # even at TP=1
    for name, value in dict(TORCHRUN_ENV, RANK="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="the engine runs on rank 0 only; this process is rank 1"):
        ExecutorWithExternalLauncher(config, tiny_qwen3, hf_qwen3.config)
    # The CLI, on a worker rank (WORLD_SIZE 3 for TP=2) and outside torchrun: exit 2 and the reason.
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = _generate_args(tiny_qwen3, 4)
    assert cli.main(args) == 2
    assert "WORLD_SIZE=3 processes but tensor_parallel_size=2" in capsys.readouterr().err
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name)
    assert cli.main(args) == 2
    assert "but RANK, WORLD_SIZE" in capsys.readouterr().err
