"""Benchmark workloads, defined once and reused by every stage's benchmark.

A workload is a seeded list of requests `(prompt_token_ids, max_tokens)`. Every request is run
greedy (temperature 0, unless the workload says otherwise) with `ignore_eos=True`, so each one
produces exactly `max_tokens` tokens on every system and run: the work is fixed, only the time
changes. Prompts are random token ids (the benchmark model has random weights, so text would
mean nothing anyway), drawn from the ordinary vocabulary, never a special token.

Workloads (full size / `--quick` size)::

    mixed      64 / 16 requests  prompt 16..512 / 16..128  output 8..256 / 8..32   (uniform)
               The all-round workload: lengths vary a lot inside each batch.
    long_tail  64 / 10 requests  prompt 16..512 / 16..64   output: 90% 8..32, 10% 200..256
               (quick: 8..16 and 48..64). Chat-like traffic: most answers are short, a few are
               long. Static batching keeps every row until the longest member is done, which is
               what continuous batching (stage 02) fixes.
    prompts_1024  8 / 4 requests  prompt 1024 / 256  output 64 / 16. Prefill-heavy (issue 13's
               "8 prompts x 1,024 tokens, 64 out"; measured against vLLM in docs/performance.md).
    nanovllm   256 / 16 requests prompt 100..1024 / 32..128  output 100..1024 / 16..64,
               temperature 0.6. The public nano-vllm benchmark (the reference GPU workload in
               DESIGN.md); needs a model with max_model_len >= 2048.
    shared_prefix  16 / 4 requests: one 512 / 128-token system prompt + a question of
               16..64 / 8..16 tokens each, output 16 / 4. Stage 06's workload: a chat service's
               system prompt or a few-shot header in front of every request.

`poisson_arrivals(n, rate, seed)` gives a seeded arrival trace for stages that replay one
(online serving): request i arrives at `arrivals[i]` seconds after the start.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

# Token ids below this are the tokenizer's special tokens (<|endoftext|>, <|im_start|>,
# <|im_end|> in folovllm.testing.tiny_model); prompts never contain them.
FIRST_ORDINARY_TOKEN_ID = 3


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """A fixed list of requests plus how to sample them (greedy + ignore_eos by default)."""

    name: str
    description: str
    requests: list[Request]
    seed: int
    temperature: float = 0.0
    ignore_eos: bool = True
    params: dict = field(default_factory=dict)  # the size knobs it was built with

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        """Useful output tokens: each request's own max_tokens (exact, since ignore_eos)."""
        return sum(r.max_tokens for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        return max(len(r.prompt_token_ids) + r.max_tokens for r in self.requests)

    def head(self, n: int) -> "Workload":
        """The first `n` requests (e.g. for a warm-up)."""
        return Workload(self.name + f"[:{n}]", self.description, self.requests[:n], self.seed,
                        self.temperature, self.ignore_eos, dict(self.params))

    def summary(self) -> dict:
        prompt = [len(r.prompt_token_ids) for r in self.requests]
        output = [r.max_tokens for r in self.requests]
        return dict(
            name=self.name, description=self.description, seed=self.seed,
            num_requests=len(self), temperature=self.temperature, ignore_eos=self.ignore_eos,
            num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self.num_output_tokens,
            prompt_len_min=min(prompt), prompt_len_max=max(prompt),
            output_len_min=min(output), output_len_max=max(output),
            params=dict(self.params),
        )


def _prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab_size) for _ in range(length)]


def uniform_workload(
    name: str, description: str, num_requests: int, prompt_len: tuple[int, int],
    output_len: tuple[int, int], vocab_size: int, seed: int, temperature: float = 0.0,
) -> Workload:
    """Prompt and output lengths drawn uniformly from the inclusive ranges."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        p = rng.randint(*prompt_len)
        requests.append(Request(_prompt(rng, p, vocab_size), rng.randint(*output_len)))
    params = dict(num_requests=num_requests, prompt_len=list(prompt_len),
                  output_len=list(output_len), vocab_size=vocab_size)
    return Workload(name, description, requests, seed, temperature, True, params)


def long_tail_workload(
    name: str, description: str, num_requests: int, prompt_len: tuple[int, int],
    short_output_len: tuple[int, int], long_output_len: tuple[int, int], long_fraction: float,
    vocab_size: int, seed: int,
) -> Workload:
    """Exactly round(long_fraction * n) (at least 1) requests get a long output, at seeded random
    positions; the rest a short one."""
    rng = random.Random(seed)
    num_long = max(1, round(long_fraction * num_requests))
    long_idx = set(rng.sample(range(num_requests), num_long))
    requests = []
    for i in range(num_requests):
        p = rng.randint(*prompt_len)
        out = rng.randint(*(long_output_len if i in long_idx else short_output_len))
        requests.append(Request(_prompt(rng, p, vocab_size), out))
    params = dict(num_requests=num_requests, prompt_len=list(prompt_len),
                  short_output_len=list(short_output_len), long_output_len=list(long_output_len),
                  long_fraction=long_fraction, vocab_size=vocab_size)
    return Workload(name, description, requests, seed, 0.0, True, params)


def long_prompts_workload(
    name: str, description: str, num_requests: int, short_prompt_len: tuple[int, int],
    short_output_len: tuple[int, int], long_prompt_len: tuple[int, int],
    long_output_len: tuple[int, int], long_fraction: float, vocab_size: int, seed: int,
) -> Workload:
    """Chat-like requests that decode for a while, and round(long_fraction * n) (at least 1)
    requests with a long prompt and a short answer at seeded random positions: the prompts that
    stall every decode without chunked prefill (stage 05's workload)."""
    rng = random.Random(seed)
    long_idx = set(rng.sample(range(num_requests), max(1, round(long_fraction * num_requests))))
    requests = []
    for i in range(num_requests):
        prompt_len, output_len = ((long_prompt_len, long_output_len) if i in long_idx
                                  else (short_prompt_len, short_output_len))
        requests.append(Request(_prompt(rng, rng.randint(*prompt_len), vocab_size), rng.randint(*output_len)))
    params = dict(num_requests=num_requests, short_prompt_len=list(short_prompt_len),
                  short_output_len=list(short_output_len), long_prompt_len=list(long_prompt_len),
                  long_output_len=list(long_output_len), long_fraction=long_fraction, vocab_size=vocab_size)
    return Workload(name, description, requests, seed, 0.0, True, params)


def shared_prefix_workload(
    name: str, description: str, num_requests: int, prefix_len: int,
    question_len: tuple[int, int], output_len: int, vocab_size: int, seed: int,
) -> Workload:
    """One seeded prefix of `prefix_len` tokens in front of every prompt, then a question of a
    length drawn uniformly from `question_len`; every request generates `output_len` tokens."""
    rng = random.Random(seed)
    prefix = _prompt(rng, prefix_len, vocab_size)
    requests = [Request(prefix + _prompt(rng, rng.randint(*question_len), vocab_size), output_len)
                for _ in range(num_requests)]
    params = dict(num_requests=num_requests, prefix_len=prefix_len,
                  question_len=list(question_len), output_len=output_len, vocab_size=vocab_size)
    return Workload(name, description, requests, seed, 0.0, True, params)


# name -> (builder(vocab_size, seed, quick, num_requests or None) -> Workload)
WorkloadBuilder = Callable[[int, int, bool, "int | None"], Workload]


def _mixed(vocab_size: int, seed: int, quick: bool, n: int | None) -> Workload:
    if quick:
        return uniform_workload("mixed", "uniform prompt 16..128, output 8..32 (quick)",
                                n or 16, (16, 128), (8, 32), vocab_size, seed)
    return uniform_workload("mixed", "uniform prompt 16..512, output 8..256",
                            n or 64, (16, 512), (8, 256), vocab_size, seed)


def _long_tail(vocab_size: int, seed: int, quick: bool, n: int | None) -> Workload:
    if quick:
        return long_tail_workload(
            "long_tail", "prompt 16..64; output 90% 8..16, 10% 48..64 (quick)",
            n or 10, (16, 64), (8, 16), (48, 64), 0.1, vocab_size, seed)
    return long_tail_workload(
        "long_tail", "prompt 16..512; output 90% 8..32, 10% 200..256 (chat-like)",
        n or 64, (16, 512), (8, 32), (200, 256), 0.1, vocab_size, seed)


def _nanovllm(vocab_size: int, seed: int, quick: bool, n: int | None) -> Workload:
    if quick:
        return uniform_workload("nanovllm", "nano-vllm benchmark shape, scaled down (quick)",
                                n or 16, (32, 128), (16, 64), vocab_size, seed, temperature=0.6)
    return uniform_workload("nanovllm", "nano-vllm benchmark: prompt 100..1024, output 100..1024, "
                            "temperature 0.6", n or 256, (100, 1024), (100, 1024), vocab_size,
                            seed, temperature=0.6)


def _long_prompts(vocab_size: int, seed: int, quick: bool, n: int | None) -> Workload:
    if quick:
        return long_prompts_workload(
            "long_prompts", "75% prompt 16..64 / output 32..64; 25% prompt 256..384 / output 4..8 (quick)",
            n or 12, (16, 64), (32, 64), (256, 384), (4, 8), 0.25, vocab_size, seed)
    return long_prompts_workload(
        "long_prompts", "65% prompt 16..64 / output 64..128 (decoding); 35% prompt 768..1280 / "
        "output 8..16 (long prompts arriving)", n or 40, (16, 64), (64, 128), (768, 1280), (8, 16),
        0.35, vocab_size, seed)


def _shared_prefix(vocab_size: int, seed: int, quick: bool, n: int | None) -> Workload:
    if quick:
        return shared_prefix_workload("shared_prefix", "128-token system prompt + 8..16-token "
                                      "questions, output 4 (quick)", n or 4, 128, (8, 16), 4,
                                      vocab_size, seed)
    return shared_prefix_workload("shared_prefix", "512-token system prompt + 16..64-token "
                                  "questions, output 16", n or 16, 512, (16, 64), 16, vocab_size,
                                  seed)


def _prompts_1024(vocab_size: int, seed: int, quick: bool, n: int | None) -> Workload:
    if quick:
        return uniform_workload("prompts_1024", "prompt 256, output 16 (quick)", n or 4,
                                (256, 256), (16, 16), vocab_size, seed)
    return uniform_workload("prompts_1024", "prompt 1024, output 64 (prefill-heavy)", n or 8,
                            (1024, 1024), (64, 64), vocab_size, seed)


WORKLOADS: dict[str, WorkloadBuilder] = {
    "mixed": _mixed,
    "long_tail": _long_tail,
    "nanovllm": _nanovllm,
    "long_prompts": _long_prompts,
    "prompts_1024": _prompts_1024,
    "shared_prefix": _shared_prefix,
}


def get_workload(
    name: str, vocab_size: int, seed: int = 0, quick: bool = False,
    num_requests: int | None = None,
) -> Workload:
    """Build workload `name` (see WORKLOADS). Same arguments, same requests, on every machine."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    if vocab_size <= FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {FIRST_ORDINARY_TOKEN_ID}, got {vocab_size}")
    return WORKLOADS[name](vocab_size, seed, quick, num_requests)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seeded Poisson arrival times in seconds: the first request arrives at 0, then the gaps are
    i.i.d. exponential with mean 1/rate (`rate` requests per second; math.inf = all at 0)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times
