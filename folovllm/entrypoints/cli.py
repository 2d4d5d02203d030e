"""The `folovllm` command: `generate` text, `serve` the OpenAI API, run the `demo` that
compares the stages, or `quantize` a float checkpoint with GPTQ (stage 07).

    folovllm demo                              # small random Qwen3 built once, every stage
    folovllm demo --model Qwen/Qwen3-0.6B      # the same on the real model
    folovllm generate --model Qwen/Qwen3-0.6B --prompt "Hello" --max-tokens 32 --temperature 0
    folovllm serve Qwen/Qwen3-0.6B --port 8000 # OpenAI-compatible server (docs/serving.md)
    folovllm trace --stages 1 2 --workload mixed     # timeline pictures of what each step did
    folovllm trace --docs                            # the stage pages' pictures, docs/assets/
    folovllm trace --serve --stage 5                 # a live page of the running engine
    folovllm quantize Qwen/Qwen3-0.6B qwen3-gptq --bits 4 --group-size 128 --desc-act
    folovllm quantize my-model my-model-rtn --method rtn    # round-to-nearest, no calibration
    folovllm build-kernels                           # compile the CPU kernels ahead of time
    folovllm train-pair                              # train the stage-09 target/draft pair (cached)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from folovllm.config import LATEST_STAGE, STAGE_NAMES

DEMO_NUM_REQUESTS = 32


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint folder or hub id (default: the demo's small random Qwen3)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (demo default: 1, for stable figures)")
    # Per-flag options: on top of --stage, for ablations (None = what the stage says).
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=_parse_bytes, default=None,
                   help="KV cache size, e.g. 2GiB or 512MiB (stages 02+)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (stage 03)")
    p.add_argument("--continuous-batching", dest="enable_continuous_batching",
                   action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--paged-kv", dest="enable_paged_kv",
                   action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--chunked-prefill", dest="enable_chunked_prefill",
                   action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="stage 05: most prompt tokens one request computes per step (0 = no cap)")
    p.add_argument("--attention-backend", default=None,
                   help="auto | naive | torch_flash | sdpa | cpu_attn | triton | flash_attn (stage 04)")
    p.add_argument("--custom-ops", default=None, choices=["auto", "all", "none"],
                   help="our compiled CPU kernels and packed weights (default auto: on where they "
                        "build); none = torch for the layers and linears (the attention backend "
                        "is --attention-backend's choice)")
    p.add_argument("--prefix-caching", dest="enable_prefix_caching",
                   action=argparse.BooleanOptionalAction, default=None, help="stage 06")
    p.add_argument("--batch-invariant", dest="batch_invariant", action=argparse.BooleanOptionalAction,
                   default=None, help="a request's logits do not depend on the batch, chunking, "
                   "prefix cache or thread count, bitwise (docs/logprobs.md; default: "
                   "FOLOVLLM_BATCH_INVARIANT, else off)")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="stage 08: split the model over this many worker processes (default 1)")
    p.add_argument("--enable-expert-parallel", dest="enable_expert_parallel",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="MoE with --tensor-parallel-size N: each rank holds num_experts/N whole "
                        "experts instead of a slice of every expert (docs/moe.md)")
    p.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "external_launcher"],
                   help="stage 08: who starts the ranks: mp (default above 1: spawned here), or "
                        "external_launcher: torchrun did, on one node or several; rank 0 runs the "
                        "engine, the others their shard (docs/stages/08-tensor-parallel.md)")
    p.add_argument("--speculative-config", type=_parse_json_object, default=None, metavar="JSON",
                   help="stage 09: speculative decoding, e.g. '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 3}' (or method draft_model with \"model\")")
    p.add_argument("--enable-lora", dest="enable_lora", action=argparse.BooleanOptionalAction,
                   default=None, help="stage 11: serve LoRA adapters over the base model")
    p.add_argument("--max-loras", type=int, default=None,
                   help="stage 11: most distinct adapters in one step (the slots; default 1)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="stage 11: largest adapter rank (default 16)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="stage 11: adapters kept read on the CPU, an LRU (default max_loras)")


_ENGINE_FLAGS = ("max_num_batched_tokens", "kv_cache_memory", "gpu_memory_utilization",
                 "block_size", "enable_continuous_batching", "enable_paged_kv", "attention_backend",
                 "enable_chunked_prefill", "long_prefill_token_threshold", "enable_prefix_caching",
                 "tensor_parallel_size", "custom_ops", "enable_lora", "max_loras", "max_lora_rank",
                 "max_cpu_loras", "speculative_config",
                 "batch_invariant", "enable_expert_parallel", "distributed_executor_backend")


def _parse_json_object(text: str) -> dict:
    """--speculative-config: a JSON object (its fields are checked by `SpeculativeConfig`)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _parse_bytes(text: str) -> int:
    """'4GiB' / '512MiB' / '1048576' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            number = lowered[: -len(unit)]
            break
    else:
        number, factor = lowered, 1
    try:
        return int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB or 512MiB, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folovllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts")
    _add_engine_args(gen)
    gen.add_argument("--stage", type=int, default=LATEST_STAGE, help=f"1..{LATEST_STAGE}")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", type=Path, help="a file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--stop-token-ids", type=int, nargs="*", default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)

    serve = sub.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="HF checkpoint folder or hub id (or --model; default: the demo model)")
    _add_engine_args(serve)
    serve.add_argument("--stage", type=int, default=LATEST_STAGE, help=f"1..{LATEST_STAGE}")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health and "
                            "/metrics (/v1/*, /trace/: a browser asks for the key as a password). "
                            "Default: the FOLOVLLM_API_KEY environment variable, else VLLM_API_KEY "
                            "(not shown by ps, unlike argv); this option wins over both")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients send as `model` (default: MODEL as given)")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="stage 11 (with --enable-lora): LoRA adapters served from the start; "
                            "a request names one as its model")
    serve.add_argument("--data-parallel-size", type=int, default=1,
                       help="run this many engine replicas, each in its own process, behind this "
                            "server (docs/serving.md#data-parallel-replicas; default 1: one engine, "
                            "in this process)")
    serve.add_argument("--data-parallel-routing", default="least_loaded",
                       choices=["round_robin", "least_loaded", "prefix_aware"],
                       help="with --data-parallel-size > 1: how a request picks its replica "
                            "(engine/dp_routing.py; prefix_aware: the replica that holds its prefix)")
    serve.add_argument("--trace", action="store_true",
                       help="also serve a live page of the engine's steps at /trace/ (docs/trace.md)")
    # The limits on one request (ServerOptions; None: its default, given in the help).
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests send their own chat template (chat_template_kwargs."
                            "chat_template): a template is code run by the server")
    serve.add_argument("--max-request-bytes", type=_parse_bytes, default=None,
                       help="largest request body, e.g. 2MiB (the default); larger: 413")
    serve.add_argument("--max-prompt-chars", type=int, default=None,
                       help="longest text prompt or chat in characters, checked before tokenizing "
                            "(default 1000000)")
    serve.add_argument("--max-stop-strings", type=int, default=None,
                       help="most stop strings in one request (default 1024)")
    serve.add_argument("--max-stop-chars", type=int, default=None,
                       help="most characters of one request's stop strings together (default 16384)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="while this many requests wait to run (queued or being tokenized; each "
                            "sample of n counts), a new request gets 503 with Retry-After "
                            "(default: no limit, as vLLM)")
    serve.add_argument("--request-body-timeout", dest="request_body_timeout_s", type=float, default=None,
                       help="seconds a client has to send its headers (after connecting or its last "
                            "answer: else the connection is closed), then as long for its whole "
                            "body (else 408 and closed) (default 60)")

    demo = sub.add_parser("demo", help="run one workload through every stage and compare")
    _add_engine_args(demo)
    demo.add_argument("--stages", type=int, nargs="*", default=None,
                      help=f"stages to run (default: all built, 1..{LATEST_STAGE})")
    demo.add_argument("--num-requests", type=int, default=DEMO_NUM_REQUESTS)
    demo.add_argument("--trained", action="store_true",
                      help="use the trained stage-09 target (`folovllm train-pair`, built once) "
                           "and show a sample of the Python it writes")

    from folovllm.trace.workloads import WORKLOADS

    trace = sub.add_parser("trace", help="record what every engine step did and draw it")
    _add_engine_args(trace)
    trace.set_defaults(max_num_seqs=None)  # the workload's own sizes, unless given
    trace.add_argument("--stages", type=int, nargs="*", default=None,
                       help=f"stages to trace side by side (default: all built, 1..{LATEST_STAGE})")
    trace.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed")
    trace.add_argument("--out", type=Path, default=None,
                       help="the PNG to write (default: trace_<workload>.png)")
    trace.add_argument("--save-traces", type=Path, default=None, metavar="DIR",
                       help="also write each stage's trace as JSON and as a Perfetto file here")
    trace.add_argument("--docs", action="store_true",
                       help="draw the stage pages' pictures into docs/assets/ (one command)")
    trace.add_argument("--serve", action="store_true",
                       help="serve a live page of one engine running the workload over and over")
    trace.add_argument("--stage", type=int, default=LATEST_STAGE, help="--serve: the stage to run")
    trace.add_argument("--host", default="127.0.0.1")
    trace.add_argument("--port", type=int, default=8008)
    trace.add_argument("--step-delay", type=float, default=0.15,
                       help="--serve: seconds between steps, so a person can follow them")
    quant = sub.add_parser("quantize", help="GPTQ-quantize a float checkpoint (stage 07)")
    quant.add_argument("model", help="float checkpoint folder or hub id")
    quant.add_argument("out", help="folder for the GPTQ checkpoint (GPTQModel format)")
    quant.add_argument("--bits", type=int, default=4, choices=(4, 8))
    quant.add_argument("--group-size", type=int, default=128, help="inputs per scale/zero; -1 = one group")
    quant.add_argument("--desc-act", action="store_true", help="act-order: columns by decreasing Hessian diagonal")
    quant.add_argument("--asym", action="store_true", help="asymmetric grids (a zero per group)")
    quant.add_argument("--format", choices=("gptq", "gptq_v2"), default=None,
                       help="zero convention (default: gptq for sym, gptq_v2 for asym)")
    quant.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                       help="rtn: round-to-nearest, no error compensation and no calibration (seconds; "
                            "the same checkpoint format, for speed runs and as GPTQ's baseline)")
    quant.add_argument("--calibration", type=Path, help="a text file (default: random tokens)")
    quant.add_argument("--num-samples", type=int, default=32)
    quant.add_argument("--seq-len", type=int, default=128)
    quant.add_argument("--damp", type=float, default=0.01, help="fraction of mean(diag H) added to H")
    quant.add_argument("--threads", type=int, default=None)

    build = sub.add_parser(
        "build-kernels",
        help="compile folovllm's CPU kernels now (the first engine start would), e.g. in a Dockerfile or CI")
    build.set_defaults(threads=None)

    from folovllm.tools import train_pair

    train_pair.add_parser(sub)
    return parser


def run_build_kernels(args: argparse.Namespace) -> int:
    """Build (or find) the kernels for this CPU path and say where they are; 1 if they cannot
    be built, with the reason."""
    import time

    from folovllm import _custom_ops
    from folovllm.platforms import cpu as cpu_platform

    print(cpu_platform.describe())
    start = time.perf_counter()
    try:
        ops = _custom_ops.load_ops()
    except RuntimeError as e:
        print(f"folovllm: error: {e}", file=sys.stderr)
        return 1
    print(f"ready in {time.perf_counter() - start:.1f} s: {Path(ops.__file__).parent.name} "
          f"under {_custom_ops.envs.kernel_cache_root()}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from folovllm.model_executor.model_loader import resolve_model_path
    from folovllm.tools.gptq_quantizer import calibration_from_text, quantize_checkpoint

    calibration = None
    if args.calibration is not None:
        if not args.calibration.is_file():
            raise ValueError(f"calibration file {args.calibration} does not exist")
        calibration = calibration_from_text(resolve_model_path(args.model), args.calibration.read_text(),
                                            args.num_samples, args.seq_len)
    out = quantize_checkpoint(
        args.model, args.out, bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
        sym=not args.asym, checkpoint_format=args.format, calibration=calibration,
        num_samples=args.num_samples, seq_len=args.seq_len, damp=args.damp, method=args.method,
    )
    print(f"wrote {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threads = args.threads
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {threads}")
        if threads is None and args.command in ("demo", "trace") and args.device == "cpu":
            threads = 1  # comparable figures: one thread, no OpenMP spin-waits on a busy machine
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "trace":
            return run_trace(args)
        if args.command == "quantize":
            return run_quantize(args)
        if args.command == "build-kernels":
            return run_build_kernels(args)
        if args.command == "train-pair":
            from folovllm.tools import train_pair

            return train_pair.run(args)
        return run_demo(args)
    except ValueError as e:
        print(f"folovllm: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from folovllm.executor import WorkerDiedError

        if not isinstance(e, WorkerDiedError):
            raise
        print(f"folovllm: error: {e}", file=sys.stderr)
        return 1


def _model_or_demo(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from folovllm.testing.tiny_model import build_tiny_checkpoint, default_cache_dir

    print("No --model given: using the demo's small random-weight Qwen3 (built once, cached).")
    return str(build_tiny_checkpoint(default_cache_dir() / "demo-qwen3", arch="qwen3", size="tiny"))


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, seed=args.seed)
    kwargs.update({f: getattr(args, f) for f in _ENGINE_FLAGS if getattr(args, f) is not None})
    return kwargs


def _run_external_launcher_worker(args: argparse.Namespace) -> Optional[int]:
    """Under torchrun with --distributed-executor-backend external_launcher, every process runs
    this same command: rank 0 goes on to run the engine (None), every other rank serves its
    shard until rank 0 says stop, printing nothing but its log, and returns its exit code."""
    from folovllm.executor.external_launcher import TorchrunEnv, is_driver, run_worker

    if args.distributed_executor_backend != "external_launcher" or is_driver():
        return None
    from folovllm.config import EngineConfig

    return run_worker(EngineConfig.for_stage(args.stage, **_engine_kwargs(args)), TorchrunEnv.from_environ())


def run_generate(args: argparse.Namespace) -> int:
    from folovllm import LLM, SamplingParams

    worker_exit = _run_external_launcher_worker(args)
    if worker_exit is not None:
        return worker_exit

    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise ValueError(f"--prompts-file {args.prompts_file} does not exist")
        prompts += [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sampling_seed, max_tokens=args.max_tokens,
        min_tokens=args.min_tokens, stop=args.stop, stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
    )
    llm = LLM(_model_or_demo(args), stage=args.stage, **_engine_kwargs(args))
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        print(f"=== prompt: {prompt!r}")
        for c in out.outputs:
            print(f"--- sample {c.index} ({len(c.token_ids)} tokens, finish_reason={c.finish_reason}, "
                  f"stop_reason={c.stop_reason!r})")
            print(c.text)
        m = out.metrics
        if m is not None and m.time_to_first_token is not None:
            tpot = m.time_per_output_token
            print(f"--- TTFT {m.time_to_first_token * 1e3:.1f} ms, "
                  f"TPOT {'-' if tpot is None else f'{tpot * 1e3:.1f} ms'}, "
                  f"e2e {m.e2e_latency * 1e3:.1f} ms")
    total = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(f"\n{total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s)")
    print(_format_stats(llm.stats.as_dict()))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from folovllm import envs
    from folovllm.config import EngineConfig
    from folovllm.engine.llm_engine import LLMEngine
    from folovllm.entrypoints.openai.api_server import run_server
    from folovllm.entrypoints.openai.serving_engine import ServerOptions
    from folovllm.entrypoints.openai.serving_models import parse_lora_modules

    worker_exit = _run_external_launcher_worker(args)
    if worker_exit is not None:
        return worker_exit
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag or args.model
    limits = ("max_request_bytes", "max_prompt_chars", "max_stop_strings", "max_stop_chars",
              "max_waiting_requests", "request_body_timeout_s")
    options = ServerOptions(trust_request_chat_template=args.trust_request_chat_template,
                            **{k: getattr(args, k) for k in limits if getattr(args, k) is not None})
    lora_modules = parse_lora_modules(args.lora_modules)
    if lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    model = _model_or_demo(args)
    config = EngineConfig.for_stage(args.stage, trace=args.trace, **_engine_kwargs(args))
    if args.data_parallel_size > 1:
        engine = _dp_engine(args, model, config)
    elif args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be a positive integer, got {args.data_parallel_size}")
    else:
        engine = LLMEngine(model, config)
    api_key = args.api_key if args.api_key is not None else envs.api_key()
    lora = {"lora_modules": lora_modules} if lora_modules else {}  # stage 11
    run_server(engine, args.served_model_name or model, args.host, args.port, api_key, options, **lora)
    return 0


def _dp_engine(args: argparse.Namespace, model: str, config: object) -> object:
    """`--data-parallel-size N`: N replicas in their own processes (engine/dp_client.py), each
    with the CPU threads divided between them unless `--threads` says how many."""
    import os

    from folovllm.engine.dp_client import DPAsyncLLM

    for flag, value in (("--trace", args.trace), ("--enable-lora", args.enable_lora),
                        ("--tensor-parallel-size > 1", (args.tensor_parallel_size or 1) > 1)):
        if value:
            raise ValueError(f"--data-parallel-size > 1 does not combine with {flag} yet; "
                             "run one replica, or leave that option out")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.data_parallel_size)
    return DPAsyncLLM(model, config, args.data_parallel_size, args.data_parallel_routing,  # type: ignore[arg-type]
                      model_name=args.served_model_name or model, num_threads_per_replica=threads)


def _format_stats(stats: dict) -> str:
    keys = ["num_forward_passes", "num_prompt_tokens", "num_prompt_tokens_computed",
            "num_generated_tokens", "num_decode_row_steps", "num_wasted_row_steps",
            "kv_utilization", "peak_kv_bytes_reserved"]
    return "engine stats: " + ", ".join(f"{k}={stats[k]}" for k in keys)


def demo_workload(vocab_size: int, num_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """A fixed mixed workload: prompts of 8..128 tokens, outputs of 4..96 (a few long ones)."""
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(8, 128))]
        max_tokens = rng.randint(64, 96) if rng.random() < 0.2 else rng.randint(4, 24)
        work.append((prompt, max_tokens))
    return work


# What `folovllm demo --trained` asks the trained target to complete.
DEMO_CODE_PROMPT = 'def read_lines(path, encoding="utf-8"):\n    """Return the lines of the file at *path*."""\n'


def run_demo(args: argparse.Namespace) -> int:
    from folovllm import LLM, SamplingParams

    stages = args.stages or list(range(1, LATEST_STAGE + 1))
    if args.trained:
        if args.model:
            raise ValueError("give either --model or --trained, not both")
        from folovllm.tools.train_pair import train_pair

        args.model = str(train_pair()[0])  # trained once (minutes, with a progress bar), cached
    model = _model_or_demo(args)
    rows = []
    for stage in stages:
        llm = LLM(model, stage=stage, **_engine_kwargs(args))
        vocab = llm.llm_engine.vocab_size
        work = demo_workload(vocab, args.num_requests, seed=args.seed)
        prompts = [p for p, _ in work]
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in work]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        llm.llm_engine.stats.__init__(bytes_per_token=llm.stats.bytes_per_token)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        s = llm.stats
        rows.append([
            f"{stage:02d} {STAGE_NAMES[stage]}", f"{out_tokens / elapsed:.1f}",
            str(s.num_forward_passes), f"{s.num_wasted_row_steps}/{s.num_decode_row_steps}",
            f"{s.num_prompt_tokens_computed}/{s.num_prompt_tokens}",
            f"{100 * s.kv_utilization:.1f}%",
        ])
        print(f"stage {stage} done in {elapsed:.2f} s", file=sys.stderr)
    headers = ["stage", "output tok/s", "forward passes", "wasted/decode rows",
               "prompt tokens computed/real", "KV utilization"]
    print(f"\n{len(work)} requests, greedy, ignore_eos; model: {model}\n")
    print(_markdown_table(headers, rows))
    if args.trained:
        out = llm.generate([DEMO_CODE_PROMPT], SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
        print(f"\nThe trained target completes a prompt (greedy):\n\n{DEMO_CODE_PROMPT}{out[0].outputs[0].text}")
    return 0


# The stage pages' pictures: (file, stages side by side, workload). `folovllm trace --docs`
# draws those whose stages are built (stage 06's appears when it lands).
DOCS_TRACES = (
    ("trace_stage01.png", [1], "mixed"),
    ("trace_stage02.png", [1, 2], "mixed"),
    ("trace_stage03.png", [2, 3], "tight-kv"),
    ("trace_stage04.png", [3, 4], "mixed"),
    ("trace_stage05.png", [4, 5], "long-prompt"),
    ("trace_stage06.png", [5, 6], "shared-prefix"),
    ("trace_mixed.png", list(range(1, LATEST_STAGE + 1)), "mixed"),
)
DOCS_ASSETS = Path("docs") / "assets"  # run from the repository root, as mkdocs is


def run_trace(args: argparse.Namespace) -> int:
    from folovllm.trace.plot import plot_traces
    from folovllm.trace.recorder import StepTracer
    from folovllm.trace.workloads import WORKLOADS, engine_config, replay

    model = _model_or_demo(args)
    overrides = {k: v for k, v in _engine_kwargs(args).items() if v is not None}
    if args.serve:
        from folovllm.trace.page import serve

        config = engine_config(model, args.stage, WORKLOADS[args.workload], **overrides)
        return serve(model, config, WORKLOADS[args.workload], args.host, args.port, args.step_delay)
    stages = args.stages or list(range(1, LATEST_STAGE + 1))
    jobs = [(args.out or Path(f"trace_{args.workload}.png"), stages, args.workload)]
    if args.docs:
        if not DOCS_ASSETS.is_dir():
            raise ValueError(f"--docs writes into {DOCS_ASSETS}/: run it from the repository root")
        jobs = [(DOCS_ASSETS / name, s, w) for name, s, w in DOCS_TRACES if max(s) <= LATEST_STAGE]
    cache: dict[tuple[int, str], StepTracer] = {}  # a stage's trace of a workload, drawn once
    for out, job_stages, name in jobs:
        workload = WORKLOADS[name]
        columns = []
        for stage in job_stages:
            if (stage, name) not in cache:
                from folovllm.engine.llm_engine import LLMEngine

                engine = LLMEngine(model, engine_config(model, stage, workload, **overrides))
                tracer = cache[stage, name] = StepTracer.attach(engine)
                replay(engine, workload, seed=args.seed)
                if args.save_traces:
                    args.save_traces.mkdir(parents=True, exist_ok=True)
                    tracer.save_json(args.save_traces / f"trace_{name}_stage{stage:02d}.json")
                    tracer.save_perfetto(args.save_traces / f"trace_{name}_stage{stage:02d}.perfetto.json")
            tracer = cache[stage, name]
            columns.append((f"stage {stage:02d} {STAGE_NAMES[stage]}: {len(tracer.steps)} steps", tracer))
        # The committed pictures leave out step times: noise on a shared machine, and a redraw
        # would change every picture for nothing.
        # More than two stages wrap two to a row, so the picture stays readable on a page.
        plot_traces(columns, out, title=f"workload '{name}': {workload.description}",
                    step_time=not args.docs, columns_per_row=2)
        print(f"wrote {out}")
    return 0


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
