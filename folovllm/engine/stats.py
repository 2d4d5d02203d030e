"""`EngineStats`: the counters each stage improves, kept as deterministic numbers.

Timing varies from run to run; these counts do not, so tests assert on them and the benchmarks
report them next to the times:

    num_forward_passes          model calls (engine steps that ran the model)
    num_prompt_tokens           real prompt tokens of the requests
    num_prompt_tokens_computed  prompt work the model computed: prompt positions (stage 01's
                                padding included) and, after a preemption, the recomputed output
    num_generated_tokens        output tokens kept
    num_decode_row_steps        decode rows: rows computing one token past their prompt
    num_wasted_row_steps        of those, rows of finished requests (stage 01's idle rows)
    max_num_running             most requests running at once (peak concurrency)
    num_preemptions             requests whose KV was dropped to make room (stage 03)
    kv_tokens_reserved/used     summed over steps: cache slots reserved vs holding live tokens
    prefix_cache                stage 06: tokens looked up and found at admission, blocks taken
                                by reference, cached blocks evicted, hash collisions caught
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from folovllm.core.prefix_cache import PrefixCacheStats


@dataclass(frozen=True)
class SchedulerStats:
    """What one engine step did and left behind (vLLM's `SchedulerStats`). The engine hands one
    to each of its `stat_loggers` after every step; traces and the server's metrics read it.

    Attributes:
        num_running_reqs: requests holding live KV after the step.
        num_waiting_reqs: requests in the waiting queue after the step.
        num_rows: rows computed in the step.
        num_scheduled_tokens: tokens computed in the step, padding included.
        num_prefill_tokens: of those, prompt work (whole prompts, chunks, recomputes; padding).
        num_decode_tokens: rows that computed one token past their prompt (stage 01's idle rows
            included).
        kv_tokens_reserved: cache slots set aside for requests after the step.
        kv_tokens_used: of those, slots holding a live token.
        num_preemptions: requests preempted so far (cumulative).
    """

    num_running_reqs: int
    num_waiting_reqs: int
    num_rows: int
    num_scheduled_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_tokens_reserved: int
    kv_tokens_used: int
    num_preemptions: int


@dataclass
class EngineStats:
    bytes_per_token: int = 0
    num_forward_passes: int = 0
    num_prompt_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_decode_row_steps: int = 0
    num_wasted_row_steps: int = 0
    max_num_running: int = 0
    num_preemptions: int = 0
    kv_tokens_reserved: int = 0  # sum over steps
    kv_tokens_used: int = 0  # sum over steps
    peak_kv_tokens_reserved: int = 0

    # stage 06: what the prefix cache did (all zero when it is off); see `PrefixCacheStats`
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    @property
    def kv_utilization(self) -> float:
        """Fraction of reserved KV memory that held a live token, averaged over steps."""
        return self.kv_tokens_used / self.kv_tokens_reserved if self.kv_tokens_reserved else 0.0

    @property
    def peak_kv_bytes_reserved(self) -> int:
        return self.peak_kv_tokens_reserved * self.bytes_per_token

    @property
    def wasted_row_fraction(self) -> float:
        return self.num_wasted_row_steps / self.num_decode_row_steps if self.num_decode_row_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            kv_utilization=round(self.kv_utilization, 4),
            peak_kv_bytes_reserved=self.peak_kv_bytes_reserved,
            wasted_row_fraction=round(self.wasted_row_fraction, 4),
        )
        d["prefix_cache"]["hit_rate"] = round(self.prefix_cache.hit_rate, 4)
        return d
