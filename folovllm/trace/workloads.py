"""Small named workloads for `folovllm trace`, and `replay`, which drives an engine (with a
`StepTracer` attached, to see it) through one, adding each request at the step it arrives.

Each workload is chosen to show one stage's change in the pictures (docs/trace.md)::

    docs         the stage 02 docs example: outputs of 2/10/3 tokens, two seats
    mixed        8 requests, mixed prompt and output lengths, 4 seats: static vs continuous
    tight-kv     6 long-running requests in a KV cache of 256 tokens: slots vs blocks, preemption
    long-prompt  3 requests decoding when a 112-token prompt arrives: stalls vs chunks
    shared-prefix  6 requests that start with the same 64 tokens, arriving two steps apart:
                 what stage 06's prefix cache will skip ("hit N" in the lanes)

Every request is greedy with `ignore_eos`, so its length is its `max_tokens` and the picture is
the same on every run (only step times vary).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from folovllm.config import EngineConfig
from folovllm.sampling_params import SamplingParams

if TYPE_CHECKING:  # the CLI lists the workloads without loading the engine
    from folovllm.engine.llm_engine import LLMEngine
    from folovllm.outputs import RequestOutput


@dataclass(frozen=True)
class TraceRequest:
    prompt_len: int
    max_tokens: int
    arrival_step: int = 1  # added just before this engine step (1 = the first)


@dataclass(frozen=True)
class TraceWorkload:
    """Requests plus the engine sizes that make the workload's point.

    `engine` overrides `EngineConfig` fields at every stage; `kv_cache_tokens` sizes the KV cache
    in tokens (bytes depend on the model); `chunk_budget` is the token budget of the stages with
    chunked prefill (without it a prompt must fit one step, so the budget stays the default).
    """

    name: str
    description: str
    requests: tuple[TraceRequest, ...]
    engine: dict[str, Any] = field(default_factory=dict)
    kv_cache_tokens: Optional[int] = None
    chunk_budget: Optional[int] = None
    shared_prefix: int = 0  # every prompt starts with the same this-many tokens


def _requests(prompt_lens: list[int], max_tokens: list[int], arrivals: Optional[list[int]] = None
              ) -> tuple[TraceRequest, ...]:
    arrivals = arrivals or [1] * len(prompt_lens)
    return tuple(TraceRequest(p, m, a) for p, m, a in zip(prompt_lens, max_tokens, arrivals))


WORKLOADS: dict[str, TraceWorkload] = {w.name: w for w in (
    TraceWorkload(
        "docs", "the stage 02 docs example: outputs of 2, 10 and 3 tokens, two seats",
        _requests([4, 4, 4], [2, 10, 3]), engine=dict(max_num_seqs=2, max_model_len=128)),
    TraceWorkload(
        "mixed", "8 requests, prompts of 8-40 tokens, outputs of 3-20 tokens, 4 seats",
        _requests([12, 40, 8, 24, 16, 32, 10, 20], [4, 20, 6, 12, 3, 16, 8, 10]),
        engine=dict(max_num_seqs=4, max_model_len=128)),
    TraceWorkload(
        "tight-kv", "6 requests that grow to 60-90 tokens each, in a KV cache of 256 tokens",
        _requests([24, 16, 32, 20, 28, 12], [48, 56, 40, 60, 44, 52]),
        engine=dict(max_num_seqs=6, max_model_len=128, block_size=16), kv_cache_tokens=256),
    TraceWorkload(
        "long-prompt", "3 requests decoding when a 112-token prompt arrives at step 4",
        _requests([8, 10, 12, 112], [24, 24, 24, 6], [1, 1, 1, 4]),
        engine=dict(max_num_seqs=4, max_model_len=128), chunk_budget=32),
    TraceWorkload(
        "shared-prefix", "6 requests sharing a 64-token prefix, arriving two steps apart",
        _requests([72, 80, 76, 68, 84, 74], [8] * 6, [1, 3, 5, 7, 9, 11]),
        engine=dict(max_num_seqs=6, max_model_len=128), shared_prefix=64),
)}


def request_name(i: int, prefix: str = "") -> str:
    """A, B, ..., Z, then R26, R27, ...: short names that fit a lane label."""
    return prefix + (chr(ord("A") + i) if i < 26 else f"R{i}")


def engine_config(model: str, stage: int, workload: TraceWorkload, **overrides: Any) -> EngineConfig:
    """The stage's config with the workload's sizes; `overrides` (CLI flags) win."""
    kwargs: dict[str, Any] = dict(workload.engine)
    if workload.kv_cache_tokens is not None:
        kwargs["kv_cache_memory"] = workload.kv_cache_tokens * kv_bytes_per_token(model, overrides.get("dtype"))
    if workload.chunk_budget is not None and stage >= 5:
        kwargs["max_num_batched_tokens"] = workload.chunk_budget
    kwargs.update(overrides)
    return EngineConfig.for_stage(stage, **kwargs)


def kv_bytes_per_token(model: str, dtype: Optional[str] = None) -> int:
    """K and V of one token across the layers, read from the checkpoint's config.json (so a
    workload can size its cache in tokens before the engine is built)."""
    import torch

    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"a workload with kv_cache_tokens needs a local checkpoint; {config_file} is missing")
    cfg = json.loads(config_file.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    name = dtype if dtype not in (None, "auto") else cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    element = torch.empty((), dtype=getattr(torch, name)).element_size()
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * element


def replay(engine: "LLMEngine", workload: TraceWorkload, seed: int = 0, id_prefix: str = "",
           on_step: Optional[Callable[[list["RequestOutput"]], None]] = None) -> dict[str, list[int]]:
    """Run `workload` to the end on `engine`, each request added before the engine step it
    arrives at; returns each request's output tokens. `on_step` sees every step's outputs
    (the live page paces itself there)."""
    rng = random.Random(seed)
    vocab = engine.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(workload.shared_prefix)]
    pending = sorted(
        ((r.arrival_step, request_name(i, id_prefix), r) for i, r in enumerate(workload.requests)),
        key=lambda t: t[0],
    )
    tokens: dict[str, list[int]] = {}
    step = 1  # the engine step about to run
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests():
            step = max(step, pending[0][0])  # nothing runs until the next arrival
        while pending and pending[0][0] <= step:
            _, rid, r = pending.pop(0)
            prompt = prefix + [rng.randrange(3, vocab) for _ in range(r.prompt_len - len(prefix))]
            engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=r.max_tokens,
                                                           ignore_eos=True))
        outputs = engine.step()
        step += 1
        for out in outputs:
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        if on_step is not None:
            on_step(outputs)
    return tokens
