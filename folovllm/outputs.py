"""What `LLM.generate` and `LLMEngine.step` return, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """One token's log-probability at one position (vLLM's `vllm/logprobs.py`).

    rank: 1 for the most likely token (ties share the worse rank: the count of tokens at least
    as likely); decoded_token: the token alone, decoded (special tokens included)."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# Per generated token, {token id: Logprob} holding the sampled token and the top `logprobs`
# (so `logprobs` or `logprobs + 1` entries: the sampled token may be one of the top ones).
SampleLogprobs = list[dict[int, Logprob]]
# The same per prompt token; the first is None (nothing comes before it to predict it from).
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class RequestMetrics:
    """Wall-clock times (seconds, `time.perf_counter`) of one request's life.

    ::

        arrival ──queue── scheduled ──prefill── first token ──decode── ... ── finished
    """

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    # time of every generated token; its differences are the inter-token latencies
    token_times: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> Optional[float]:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def time_per_output_token(self) -> Optional[float]:
        """Mean decode time per token after the first (TPOT)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def e2e_latency(self) -> Optional[float]:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One sample of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that matched
    error: Optional[str] = None  # what went wrong, when finish_reason is "error"
    # With SamplingParams.logprobs: per token in `token_ids`, and their sum (None otherwise)
    logprobs: Optional[SampleLogprobs] = None
    cumulative_logprob: Optional[float] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The output of one request: its prompt and its `n` completions."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None first
    prompt_logprobs: Optional[PromptLogprobs] = None
