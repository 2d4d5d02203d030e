"""Where one engine step's time goes: a breakdown by phase, for decode steps of several row
counts and for a prefill, on the bench model or a Qwen3-0.6B-shaped one.

    python -m benchmarks.profile_step                               # bench model, rows 1 4 16
    python -m benchmarks.profile_step --model qwen3-0.6b --rows 1 4 16 --context 512
    python -m benchmarks.profile_step --torch-profiler              # + the top aten ops
    python -m benchmarks.profile_step --agreement --dtype bfloat16  # bf16 vs float32 tokens

How: a fresh engine (the latest stage) gets B requests of `--context` prompt tokens; the prompts
are computed untimed, then `--steps` decode steps are measured. Each phase of a step is a method
wrapped with a timer that reads the thread's CPU time (`time.thread_time`: on one torch thread
every op runs on the calling thread, and a shared machine does not stretch it):

    schedule       Scheduler.schedule + update_from_output + output processing (engine side)
    prepare        ModelRunner.prepare_inputs + build_metadata (host lists -> tensors)
    linear         every projection's matmul (qkv, o, gate_up, down), LinearMethod.apply
    attention      the attention backend's forward (the KV cache write is `kv_write`)
    kv_write       the backend's store_kv_cache
    norm_rope_act  RMSNorm, rotary embedding, SiluAndMul
    other_model    the model's forward minus everything above: embedding, residual adds, views
    lm_head        compute_logits (hidden -> vocab for the rows that sample)
    sampler        Sampler.__call__
    other          the rest of the step (Python glue, stats)

The prefill row is one request of `--prefill` tokens computed in one step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from benchmarks.results import git_commit

MODELS = {"bench": "bench", "qwen3-0.6b": "qwen3-0.6b"}


def model_path(name: str) -> str:
    """'bench' (25.4M), 'qwen3-0.6b' (Qwen3-0.6B shapes, random weights) or a folder."""
    from benchmarks.bench_model import bench_model_path
    from folovllm.testing.tiny_model import build_tiny_checkpoint, default_cache_dir

    if name == "bench":
        return str(bench_model_path())
    if name == "qwen3-0.6b":
        return str(build_tiny_checkpoint(default_cache_dir() / "qwen3-0.6b-shaped", size="qwen3-0.6b"))
    return name


class PhaseTimer:
    """Accumulates thread CPU seconds per phase; nested phases are subtracted from their parent."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, start, child time]

    def wrap(self, owner: Any, attr: str, phase: str) -> Callable[[], None]:
        fn = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(phase):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, fn) if isinstance(owner, type) else delattr(owner, attr)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([name, time.thread_time(), 0.0])
        try:
            yield
        finally:
            name, start, child = self._stack.pop()
            spent = time.thread_time() - start
            self.totals[name] += spent - child
            if self._stack:
                self._stack[-1][2] += spent


def instrument(engine: Any, timer: PhaseTimer) -> list[Callable[[], None]]:
    """Wrap the phases of one engine (instances where possible, so nothing leaks)."""
    from folovllm.model_executor.layers.activation import SiluAndMul
    from folovllm.model_executor.layers.layernorm import RMSNorm
    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    runner = engine.model_runner
    undo = [
        timer.wrap(engine.scheduler, "schedule", "schedule"),
        timer.wrap(engine.scheduler, "update_from_output", "schedule"),
        timer.wrap(engine.output_processor, "process", "schedule"),
        timer.wrap(runner, "prepare_inputs", "prepare"),
        timer.wrap(runner, "build_metadata", "prepare"),
        timer.wrap(runner.model, "forward", "other_model"),
        timer.wrap(runner.model, "compute_logits", "lm_head"),
        # special methods are looked up on the class: wrap Sampler.__call__ itself
        timer.wrap(type(engine.sampler), "__call__", "sampler"),
    ]
    backend = runner.attn_layers[0].backend
    undo.append(timer.wrap(backend, "forward", "attention"))
    undo.append(timer.wrap(backend, "store_kv_cache", "kv_write"))
    for m in runner.model.modules():
        if isinstance(m, LinearBase):
            undo.append(timer.wrap(m, "forward", "linear"))
        elif isinstance(m, (RMSNorm, RotaryEmbedding, SiluAndMul)):
            undo.append(timer.wrap(m, "forward", "norm_rope_act"))
    return undo


def measure(model: str, rows: int, context: int, steps: int, prefill: int, profiler: bool,
            engine_args: dict[str, Any]) -> dict[str, Any]:
    from folovllm import LLM, SamplingParams
    from folovllm.config import LATEST_STAGE

    llm = LLM(model, stage=LATEST_STAGE, dtype=engine_args.pop("dtype", "float32"), max_num_seqs=max(rows, 1),
              max_model_len=-(-max(context + steps + 16, prefill + 2) // 64) * 64, **engine_args)
    engine = llm.llm_engine
    vocab = engine.model_runner.model.config.vocab_size
    rng = random.Random(rows)
    timer = PhaseTimer()
    result: dict[str, Any] = dict(rows=rows, context=context)
    if rows:
        params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(rows):
            engine.add_request(str(i), [rng.randrange(3, min(vocab, 512)) for _ in range(context)], params)
        # every prompt computed (chunked prefill spreads them over steps), then one decode step
        while engine.stats.num_prompt_tokens_computed < rows * context:
            engine.step()
        engine.step()
        undo = instrument(engine, timer)
        per_step = []
        for _ in range(steps):
            with timer.phase("other"):
                c0 = time.thread_time()
                engine.step()
                per_step.append(time.thread_time() - c0)
        for u in reversed(undo):
            u()
        result.update(kind="decode", steps=steps, cpu_ms_per_step=round(statistics.median(per_step) * 1e3, 2),
                      phases_ms_per_step={k: round(v / steps * 1e3, 2) for k, v in
                                          sorted(timer.totals.items(), key=lambda kv: -kv[1])})
        if profiler:
            result["top_ops"] = top_ops(engine, steps=3)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        # warm-up prefill, then the measured one
        for name in ("warm", "p"):
            engine.add_request(name, [rng.randrange(3, min(vocab, 512)) for _ in range(prefill)], params)
            if name == "p":
                undo = instrument(engine, timer)
            with timer.phase("other") if name == "p" else contextlib.nullcontext():
                c0 = time.thread_time()
                while engine.has_unfinished_requests():
                    engine.step()
                spent = time.thread_time() - c0
        for u in reversed(undo):
            u()
        result.update(kind="prefill", context=prefill, cpu_ms_per_step=round(spent * 1e3, 2),
                      phases_ms_per_step={k: round(v * 1e3, 2) for k, v in
                                          sorted(timer.totals.items(), key=lambda kv: -kv[1])})
    return result


def dtype_agreement(model: str, dtype: str, num_requests: int = 16) -> dict[str, Any]:
    """Greedy tokens of `dtype` against float32 on the quick mixed workload, and the CPU time of
    each: exact-match fraction, mean fraction of each output before the first difference."""
    from benchmarks.harness import agreement
    from benchmarks.workloads import get_workload
    from folovllm import LLM, SamplingParams
    from folovllm.config import LATEST_STAGE

    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    w = get_workload("mixed", vocab_size=vocab, quick=True, num_requests=num_requests)
    prompts = [list(r.prompt_token_ids) for r in w.requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in w.requests]
    out, cpu = {}, {}
    for dt in ("float32", dtype):
        llm = LLM(model, stage=LATEST_STAGE, dtype=dt, max_num_seqs=16, max_model_len=512)
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        c0 = time.process_time()
        out[dt] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        cpu[dt] = round(time.process_time() - c0, 3)
        del llm
    return dict(dtype=dtype, workload=w.summary(), cpu_seconds=cpu,
                agreement_with_float32=agreement(out[dtype], out["float32"]))


def top_ops(engine: Any, steps: int, n: int = 12) -> list[tuple[str, float, int]]:
    """The aten ops that take the most CPU time over `steps` more steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    avg = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [(e.key, round(e.self_cpu_time_total / steps / 1e3, 3), e.count // steps) for e in avg]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="bench | qwen3-0.6b | a checkpoint folder")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--context", type=int, default=256, help="prompt tokens of each decoding row")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the prefill measured (0: none)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--torch-profiler", action="store_true", help="also list the top aten ops")
    p.add_argument("--agreement", action="store_true",
                   help="only compare --dtype's greedy tokens and CPU time with float32's")
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig field (e.g. attention_backend=naive)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine_args: dict[str, Any] = {}
    for kv in args.engine_arg:
        k, v = kv.split("=", 1)
        engine_args[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    model = model_path(args.model)
    if args.agreement:
        r = dtype_agreement(model, args.dtype)
        print(r)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(r, git_commit=git_commit()), indent=1))
        return 0
    cases = [(r, args.context) for r in args.rows if r] + ([(0, 0)] if args.prefill else [])
    results = []
    for rows, context in cases:
        r = measure(model, rows, context, args.steps, args.prefill, args.torch_profiler,
                    dict(engine_args, dtype=args.dtype))
        results.append(r)
        what = f"decode {rows} rows x {context} ctx" if rows else f"prefill {args.prefill}"
        print(f"{args.model} {what}: {r['cpu_ms_per_step']} ms CPU/step")
        for k, v in r["phases_ms_per_step"].items():
            print(f"    {k:14s} {v:9.2f} ms")
        for op, ms, count in r.get("top_ops", []):
            print(f"      {op:40s} {ms:8.3f} ms  x{count}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, threads=args.threads,
                                                   git_commit=git_commit(), results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
