"""Where one engine step's time goes: a breakdown by phase, for decode steps of several row
counts and for a prefill, on the bench model or a Qwen3-0.6B-shaped one.

    python -m benchmarks.profile_step                               # bench model, rows 1 4 16
    python -m benchmarks.profile_step --model qwen3-0.6b --rows 1 4 16 --context 512
    python -m benchmarks.profile_step --engine-arg custom_ops=none  # the torch path
    python -m benchmarks.profile_step --quick                       # smoke run: 1 row, 2 steps
    python -m benchmarks.profile_step --host                        # the host side only, by phase

How: a fresh engine (the latest stage) gets B requests of `--context` prompt tokens; the prompts
are computed untimed, then `--steps` decode steps are run twice: once plain, timed by
`harness.timed` (the CPU ms per step), and once under `torch.profiler` with a
`record_function` span around each step and around each forward of the model's layers of
one phase (`module_spans`: forward hooks, PyTorch's public API, attached for the profiled steps
only, so the engine runs its own code unchanged the rest of the time; nothing is patched):

    linear         every projection (qkv, o, gate_up, down): `LinearBase` layers
    attention      the `Attention` layers: the KV cache write and the backend's forward
    norm_rope_act  RMSNorm, rotary embedding, SiluAndMul: the `CustomOp` layers
    other_model    the model's forward minus the three above: embedding, residual adds, views
    lm_head        `ParallelLMHead` (hidden -> vocab for the rows that sample)
    rest           the step minus the model and the LM head: scheduling, inputs and metadata,
                   sampling, output processing (the engine's Python)

Phases are ms per step of the profiled steps (the profiler's clock, its own overhead included:
compare `profiled_ms_per_step` with `cpu_ms_per_step`); `top_ops` lists the aten ops with the
most self time. The prefill row is one request of `--prefill` tokens, computed in one step.
`--host` measures the engine's own Python instead (`host_phases.py`: scheduler, input batch,
inputs and metadata, sampling, output processing, stats; the forward pass excluded), on the
tiny model by default, rows 1 8 16 64, for a streaming (`delta`) and an offline
(`final_only`) request. bfloat16's tokens against float32's: `python -m benchmarks.run --systems folovllm-stage6
'folovllm-stage6[dtype=bfloat16]' --quick` (the agreement column).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from typing import Any, Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.cli import bench_main
from benchmarks.harness import summarize, timed
from benchmarks.results import machine_short

PHASES = ("linear", "attention", "norm_rope_act", "other_model", "lm_head", "rest")


def model_path(name: str) -> str:
    """'tiny' (the tests' model; 'tiny-8k': with 8,192 positions), 'bench' (25.4M), 'qwen3-0.6b' (Qwen3-0.6B shapes, random
    weights) or a folder."""
    from benchmarks.bench_model import bench_model_path
    from folovllm.testing.tiny_model import build_tiny_checkpoint, default_cache_dir

    if name == "bench":
        return str(bench_model_path())
    if name == "tiny":
        return str(build_tiny_checkpoint(default_cache_dir() / "tiny-qwen3-host", size="tiny"))
    if name == "tiny-8k":  # the tiny model with positions for 4,096-token contexts (RoPE has no weights)
        import json
        import shutil

        src = build_tiny_checkpoint(default_cache_dir() / "tiny-qwen3-host", size="tiny")
        dst = default_cache_dir() / "tiny-qwen3-host-8k"
        shutil.copytree(src, dst, dirs_exist_ok=True)
        config = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=8192), indent=2))
        return str(dst)
    if name == "qwen3-0.6b":
        return str(build_tiny_checkpoint(default_cache_dir() / "qwen3-0.6b-shaped", size="qwen3-0.6b"))
    return name


@contextlib.contextmanager
def module_spans(model: torch.nn.Module) -> Iterator[None]:
    """A `record_function` span around every forward of `model` ("model") and of each of its
    layers of a phase, through forward pre- and post-hooks, removed on exit."""
    from folovllm.model_executor.custom_op import CustomOp
    from folovllm.model_executor.layers.attention import Attention
    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    kinds = (("lm_head", ParallelLMHead), ("linear", LinearBase), ("attention", Attention),
             ("norm_rope_act", CustomOp))
    open_spans: list[Any] = []
    handles = []

    def enter(name: str) -> Any:
        return lambda module, args: open_spans.append(record_function(name).__enter__())

    def leave(module: Any, args: Any, output: Any) -> None:
        open_spans.pop().__exit__(None, None, None)

    for module in model.modules():
        name = "model" if module is model else next((n for n, cls in kinds if isinstance(module, cls)), None)
        if name is not None:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profiled(engine: Any, run_steps: Any, per: int) -> tuple[dict[str, float], float, list[tuple[str, float, int]]]:
    """Run `run_steps(step)` under the profiler, every `step()` in a "step" span; -> (ms by phase,
    profiled ms of the steps, the top ops: name, self ms, calls), each divided by `per`."""
    def step() -> Any:
        with record_function("step"):
            return engine.step()

    with module_spans(engine.model_runner.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(step)
    events = prof.key_averages()
    ms = {e.key: e.cpu_time_total / 1e3 / per for e in events}
    span = lambda k: ms.get(k, 0.0)  # noqa: E731
    phases = {k: span(k) for k in ("linear", "attention", "norm_rope_act", "lm_head")}
    phases["other_model"] = span("model") - phases["linear"] - phases["attention"] - phases["norm_rope_act"]
    phases["rest"] = span("step") - span("model") - phases["lm_head"]
    spans = {"step", "model", *phases}
    top = sorted((e for e in events if e.key not in spans), key=lambda e: -e.self_cpu_time_total)[:12]
    return ({k: round(phases[k], 3) for k in PHASES}, round(span("step"), 3),
            [(e.key, round(e.self_cpu_time_total / per / 1e3, 3), e.count // per) for e in top])


def measure(model: str, rows: int, context: int, steps: int, prefill: int, engine_args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.systems import BenchConfig
    from benchmarks.systems.folovllm import FolovllmSystem
    from folovllm import SamplingParams
    from folovllm.config import LATEST_STAGE

    cfg = BenchConfig(model=model, dtype=engine_args.pop("dtype"), max_num_seqs=max(rows, 1), engine_args=dict(
        engine_args, max_model_len=-(-max(context + 2 * steps + 16, prefill + 2) // 64) * 64))
    engine = FolovllmSystem(cfg, LATEST_STAGE).build().llm_engine
    vocab = engine.model_runner.model.config.vocab_size
    rng = random.Random(rows)
    prompt = lambda n: [rng.randrange(3, min(vocab, 512)) for _ in range(n)]  # noqa: E731

    def drain(step: Any) -> None:
        while engine.has_unfinished_requests():
            step()

    if rows:
        params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 8, ignore_eos=True)
        for i in range(rows):
            engine.add_request(str(i), prompt(context), params)
        # every prompt computed (chunked prefill spreads them over steps), then one decode step
        while engine.stats.num_prompt_tokens_computed < rows * context:
            engine.step()
        engine.step()
        plain = summarize([timed(engine.step) for _ in range(steps)])["median_cpu_seconds"]

        def run_steps(step: Any) -> None:
            for _ in range(steps):
                step()
        result: dict[str, Any] = dict(kind="decode", rows=rows, context=context, steps=steps)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        engine.add_request("warm", prompt(prefill), params)
        drain(engine.step)  # untimed warm-up
        engine.add_request("plain", prompt(prefill), params)
        plain = timed(lambda: drain(engine.step)).cpu_seconds

        def run_steps(step: Any) -> None:
            engine.add_request("p", prompt(prefill), params)
            drain(step)
        result = dict(kind="prefill", rows=1, context=prefill)
    # a prefill's figures are for the whole prompt (one step unless chunked), a decode's per step
    phases, profiled_ms, top = profiled(engine, run_steps, per=steps if rows else 1)
    result.update(cpu_ms_per_step=round(plain * 1e3, 2), profiled_ms_per_step=profiled_ms,
                  phases_ms_per_step=phases, top_ops=top)
    return result


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="tiny | tiny-8k | bench | qwen3-0.6b | a checkpoint folder (default: bench; tiny with --host)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="decode rows (default 1 4 16; with --host 1 8 16 64)")
    p.add_argument("--context", type=int, default=256, help="prompt tokens of each decoding row")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the prefill measured (0: none)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 10; 40 with --host)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig field (e.g. attention_backend=naive)")
    p.add_argument("--host", action="store_true",
                   help="the host side of decode steps by phase (host_phases.py), not the model's")
    p.add_argument("--output-kind", nargs="+", default=["delta", "final_only"],
                   choices=["delta", "cumulative", "final_only"], help="with --host: the requests' output_kind")


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.model = args.model or ("tiny" if args.host else "bench")
    args.rows = args.rows or ([1, 8, 16, 64] if args.host else [1, 4, 16])
    args.steps = args.steps or (40 if args.host else 10)
    if args.quick:
        args.rows, args.context, args.prefill, args.steps = [1], 32, 64, 2
    engine_args: dict[str, Any] = {}
    for kv in args.engine_arg:
        k, v = kv.split("=", 1)
        engine_args[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    model = model_path(args.model)
    if args.host:
        return run_host(args, model, engine_args)
    cases = [(r, args.context) for r in args.rows if r] + ([(0, 0)] if args.prefill else [])
    results = []
    for rows, context in cases:
        r = measure(model, rows, context, args.steps, args.prefill, dict(engine_args, dtype=args.dtype))
        results.append(r)
        print(f"{args.model} {case_label(r)}: {r['cpu_ms_per_step']} ms CPU/step "
              f"({r['profiled_ms_per_step']} profiled) {r['phases_ms_per_step']}", flush=True)
    return dict(model=args.model, dtype=args.dtype, engine_args=engine_args, results=results)


def run_host(args: argparse.Namespace, model: str, engine_args: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.host_phases import measure_host

    results = []
    for rows in args.rows:
        for kind in args.output_kind:
            r = measure_host(model, rows, args.context, args.steps, kind, dict(engine_args, dtype=args.dtype))
            results.append(r)
            print(f"{args.model} host, {rows} rows, {kind}: {r['host_ms_per_step']} ms host/step "
                  f"(step {r['untimed_step_ms']} ms unclocked, load {r['loadavg']}) "
                  f"{r['phases_ms_per_step']}", flush=True)
    return dict(model=args.model, dtype=args.dtype, engine_args=engine_args, host=True, results=results)


def case_label(r: dict[str, Any]) -> str:
    return f"decode {r['rows']} rows x {r['context']}" if r["kind"] == "decode" else f"prefill {r['context']}"


def render_markdown(result: dict[str, Any]) -> str:
    rs = result["results"]
    if result.get("host"):
        from benchmarks.host_phases import render_host_markdown

        return render_host_markdown(result, (
            f"The host side of one decode step by phase, model `{result['model']}`, {result['dtype']}, "
            f"{result['engine_args'] or 'default engine'}, context {rs[0]['context']}, median ms of "
            f"process CPU time over {rs[0]['steps']} steps: `{result['command']}` on "
            f"{machine_short(result['machine'])}, {result['date'][:10]}, commit {result['git_commit'][:12]}."))
    lines = [f"One engine step by phase, model `{result['model']}`, {result['dtype']}, "
             f"{result['engine_args'] or 'default engine'}, ms per step under torch.profiler "
             f"(`record_function` spans): `{result['command']}` on "
             f"{machine_short(result['machine'])}, {result['date'][:10]}.", "",
             "| phase | " + " | ".join(case_label(r) for r in rs) + " |",
             "|:--|" + "--:|" * len(rs)]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{r['phases_ms_per_step'][phase]:.2f}" for r in rs) + " |")
    lines.append("| **step, profiled** | " + " | ".join(f"**{r['profiled_ms_per_step']:.2f}**" for r in rs) + " |")
    lines.append("| step, not profiled (CPU) | " + " | ".join(f"{r['cpu_ms_per_step']:.2f}" for r in rs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.profile_step", __doc__, argv, run, render_markdown, repeats=1,
               name=lambda args, result: f"perf_{'host' if args.host else 'profile'}_{args.model}",
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
