"""The engine's one per-step record, `SchedulerStats`, and `EngineStats`, the totals each stage
improves.

After every step the engine builds one `SchedulerStats` and publishes it: it adds it to its own
`EngineStats`, then hands it to every subscriber in `LLMEngine.stat_loggers` (the server's
Prometheus metrics, the step trace in folovllm/trace/, the benchmarks). The engine imports none
of them. One record of the stage 02 docs example (2/10/3 output tokens, two seats)::

    step  rows (request: kind new_tokens)   waiting  stalled  finished
    1     A: prefill 4   B: prefill 4       C
    2     A: decode 1    B: decode 1        C                 A (length)
    3     C: prefill 4                               B        <- C takes A's seat at once;
    4     B: decode 1    C: decode 1                             B waits a step (never mixed)

Row kinds: "prefill" computes the rest of a prompt (or a preempted request's recompute) and
samples; "chunk" computes part of a prompt and does not sample yet (stage 05); "decode" computes
one token past the prompt; "idle" is a finished member of a stage-01 static batch, computed for
nothing.

`EngineStats` keeps deterministic numbers: timing varies from run to run, these counts do not,
so tests assert on them and the benchmarks report them next to the times:

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
    spec_decoding               stage 09: drafts verified, accepted, per position
    expert_load                 MoE: tokens routed to each expert, summed over steps and MoE
                                layers (empty for a dense model)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from folovllm.core.prefix_cache import PrefixCacheStats
from folovllm.spec_decode.metrics import SpecDecodingStats

if TYPE_CHECKING:
    import torch

    from folovllm.core.scheduler_output import SchedulerOutput


@dataclass(slots=True)
class RowStats:
    """One row of a step: which request computed which tokens."""

    request_id: str
    kind: str  # "prefill" | "chunk" | "decode" | "idle"
    num_computed_tokens: int  # cached before the step (position of the row's first token)
    num_new_tokens: int
    num_blocks: int  # blocks (stage 01/02: slots) the request holds during the step
    finish_reason: Optional[str] = None  # it finished in this step ("stop", "length", "error")
    num_draft_tokens: int = 0  # stage 09: drafts the row verified (within num_new_tokens)
    num_accepted_tokens: int = 0  # stage 09: of those, kept (a stop inside the run cuts it)


def make_rows(output: "SchedulerOutput") -> list[RowStats]:
    """The step's rows, read after the update: a row that caught up has sampled, so its request
    is one token longer than what the row computed."""
    rows = []
    for i, (request, new, computed, table) in enumerate(
            zip(output.requests, output.num_new_tokens, output.num_computed_tokens, output.block_tables)):
        if new == 0:
            kind = "idle"
        elif output.is_decode(i):
            kind = "decode"
        else:
            kind = "prefill" if request.num_tokens == computed + new + 1 else "chunk"
        finish_reason = request.status.finish_reason if new and request.is_finished else None
        drafts = len(output.spec_token_ids(i))
        accepted = max(0, request.num_tokens - (computed + new - drafts) - 1) if drafts else 0
        rows.append(RowStats(request.request_id, kind, computed, new, len(table), finish_reason,
                             drafts, accepted))
    return rows


# --8<-- [start:expert_load_stats]
@dataclass(frozen=True)
class ExpertLoadStats:
    """MoE: where one step's tokens went (docs/moe.md "Routing counts"). Each MoE layer routes
    each of the step's T tokens to k experts, so the counts sum to T * k * L::

        num_tokens_per_expert  [E]  tokens routed to expert e, summed over the L MoE layers
        num_experts_touched    [L]  experts that got at least one token, per MoE layer: what
                                    a decode step reads (each touched expert's weights once)
    """

    num_tokens_per_expert: list[int]
    num_experts_touched: list[int]

    @classmethod
    def from_counts(cls, counts: Optional["torch.Tensor"]) -> Optional["ExpertLoadStats"]:
        """[L, E] counts of one step (`Executor.take_expert_load`) -> the step's record; None
        (a dense model) stays None."""
        if counts is None:
            return None
        return cls(counts.sum(0).tolist(), (counts > 0).sum(1).tolist())

    @property
    def mean_experts_touched(self) -> float:
        return sum(self.num_experts_touched) / max(1, len(self.num_experts_touched))
# --8<-- [end:expert_load_stats]


@dataclass(frozen=True)
class SchedulerStats:
    """What one engine step did and left behind (vLLM's `SchedulerStats`, with the step's rows).
    Every subscriber gets the same object: read it, keep it, never change it.

    Attributes:
        step: the engine's step number (1 = its first step that ran the model).
        start_time, end_time: `time.perf_counter()` when the step began and when it ended.
        rows: the step's rows (`RowStats`), in the model's order.
        waiting: ids of the requests waiting after the step, in queue order.
        stalled: ids of running requests (holding KV) given no row in the step.
        preempted: ids of the requests preempted in the step's scheduling (stage 03).
        num_running_reqs: requests holding live KV after the step.
        num_scheduled_tokens: tokens computed in the step, padding included.
        num_prefill_tokens: of those, prompt work (whole prompts, chunks, recomputes; padding).
        num_decode_tokens: rows that computed one token past their prompt (stage 01's idle rows
            included).
        num_generated_tokens: tokens sampled (rows that caught up).
        kv_blocks_used: KV blocks (stage 01/02: slots) held after the step, a shared block once.
        kv_tokens_reserved: cache slots set aside for requests after the step.
        kv_tokens_used: of those, slots holding a live token.
        num_preemptions: requests preempted so far (cumulative).
        prefix_cache: what the prefix cache did in the step (stage 06; zeros without it).
        spec_decoding_stats: drafts verified and accepted in the step (stage 09; None without
            speculation).
        expert_load: tokens routed to each expert in the step (a MoE model; None for a dense
            one).
    """

    step: int
    start_time: float
    end_time: float
    rows: list[RowStats]
    waiting: list[str]
    stalled: list[str]
    preempted: list[str]
    num_running_reqs: int
    num_scheduled_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_generated_tokens: int
    kv_blocks_used: int
    kv_tokens_reserved: int
    kv_tokens_used: int
    num_preemptions: int
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    spec_decoding_stats: Optional[SpecDecodingStats] = None
    expert_load: Optional[ExpertLoadStats] = None

    @property
    def num_waiting_reqs(self) -> int:
        return len(self.waiting)

    @property
    def finished(self) -> dict[str, str]:
        """Request id -> finish reason, for the requests that finished in this step."""
        return {r.request_id: r.finish_reason for r in self.rows if r.finish_reason}


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
    # stage 09: drafts verified and accepted (all zero without speculation); see `SpecDecodingStats`
    spec_decoding: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    # MoE: tokens routed to each expert, summed over steps and MoE layers (dense: empty)
    expert_load: list[int] = field(default_factory=list)

    def add(self, step: SchedulerStats) -> None:
        """Count one step's record in (the engine does, before any subscriber sees it)."""
        self.num_forward_passes += 1
        self.num_generated_tokens += step.num_generated_tokens
        self.num_prompt_tokens_computed += step.num_prefill_tokens
        self.num_decode_row_steps += step.num_decode_tokens
        self.num_wasted_row_steps += sum(1 for r in step.rows if r.kind == "idle")
        self.num_preemptions = step.num_preemptions
        self.max_num_running = max(self.max_num_running, step.num_running_reqs)
        self.kv_tokens_reserved += step.kv_tokens_reserved
        self.kv_tokens_used += step.kv_tokens_used
        self.peak_kv_tokens_reserved = max(self.peak_kv_tokens_reserved, step.kv_tokens_reserved)
        self.prefix_cache += step.prefix_cache
        if step.spec_decoding_stats is not None:
            self.spec_decoding += step.spec_decoding_stats
        if step.expert_load is not None:
            self.expert_load = _add_counts(self.expert_load, step.expert_load.num_tokens_per_expert)

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
        d["spec_decoding"].update(acceptance_rate=round(self.spec_decoding.acceptance_rate, 4),
                                  mean_accepted_length=round(self.spec_decoding.mean_accepted_length, 4))
        return d


def _add_counts(total: list[int], counts: Sequence[int]) -> list[int]:
    return [a + b for a, b in zip(total, counts)] if total else list(counts)
