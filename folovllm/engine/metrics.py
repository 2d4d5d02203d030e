# --8<-- [start:metrics_doc]
"""`PrometheusMetrics`: what `GET /metrics` shows, with vLLM's metric names (`vllm:` ->
`folovllm:`), so a dashboard built for `vllm serve` reads this server too.

    per step      folovllm:num_requests_running     gauge    requests in the running batch
                  folovllm:num_requests_waiting     gauge    requests queued for admission
                  folovllm:kv_cache_usage_perc      gauge    KV cache slots in use, 0..1
                  folovllm:num_preemptions_total    counter  requests whose KV was dropped
    per request   folovllm:time_to_first_token_seconds   histogram  arrival -> first token
                  folovllm:inter_token_latency_seconds   histogram  gap between two tokens
                  folovllm:e2e_request_latency_seconds   histogram  arrival -> finished
                  folovllm:prompt_tokens_total           counter
                  folovllm:generation_tokens_total       counter
                  folovllm:request_success_total{finished_reason}  counter (stop, length, abort)
    stage 06      folovllm:prefix_cache_queries_total   counter  prompt tokens looked up at admission
                  folovllm:prefix_cache_hits_total      counter  of those, tokens found cached
    stage 09      folovllm:spec_decode_num_drafts_total           counter  rows that verified drafts
                  folovllm:spec_decode_num_draft_tokens_total     counter  drafts verified
                  folovllm:spec_decode_num_accepted_tokens_total  counter  drafts accepted
                  folovllm:spec_decode_num_accepted_tokens_per_pos_total{position}  counter
    MoE           folovllm:moe_expert_tokens_total{expert}  counter  tokens routed to each
                                                              expert, summed over MoE layers
                  folovllm:moe_experts_touched       gauge    experts with a token in the last
                                                              step, mean over MoE layers

The per-step values come from the engine's per-step record: `record` is one of its
`stat_loggers`, called with the step's `SchedulerStats` (in the engine thread; prometheus_client
is thread-safe). Latencies come from the engine's own `RequestMetrics` (times of the first
sample of a request), so they measure the engine and its queue, not the HTTP layer. Each
instance has its own registry: several servers in one process (the tests) do not share counters.
"""
# --8<-- [end:metrics_doc]

from __future__ import annotations

from typing import Any, Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from folovllm.engine.stats import ExpertLoadStats, SchedulerStats
from folovllm.outputs import RequestOutput

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# No `*_created` timestamp series next to every counter and histogram (as `vllm serve`).
prometheus_client.disable_created_metrics()

# Seconds; spans a tiny CPU model (ms) to a long prompt on a real one (tens of seconds).
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class PrometheusMetrics:
    def __init__(self, model_name: str, kv_cache_capacity_tokens: int,
                 engine_info: Optional[dict[str, str]] = None) -> None:
        """`engine_info`: what the engine runs (`config.describe_engine`), exported once as the
        labels of `folovllm:engine_info` (Prometheus' info pattern, value 1)."""
        self.kv_cache_capacity_tokens = kv_cache_capacity_tokens
        self._num_preemptions = 0  # the engine's count is cumulative; the counter takes steps
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"folovllm:{name}", doc, **labels).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"folovllm:{name}", doc, **labels).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"folovllm:{name}", doc, buckets=_LATENCY_BUCKETS, **labels).labels(model_name)

        self.num_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be admitted.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache slots in use (0..1).")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (KV dropped, recomputed later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between two generated tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token of a request.")
        self._success = Counter("folovllm:request_success", "Finished requests by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        # stage 06 (vLLM's names): prompt tokens looked up at admission and found cached; their
        # ratio is the hit rate that prefix-aware routing of data-parallel replicas raises
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        # stage 09 (vLLM's names); they stay at 0 without speculative decoding
        self.spec_num_drafts = counter("spec_decode_num_drafts", "Rows that verified draft tokens.")
        self.spec_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._spec_per_pos = Counter("folovllm:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the draft (0 = first).",
                                     labelnames=["model_name", "position"], registry=self.registry)
        # MoE (docs/moe.md "Routing counts"): series appear with the first MoE step; a dense
        # model never creates them
        self._expert_tokens = Counter("folovllm:moe_expert_tokens",
                                      "Tokens routed to each expert, summed over the MoE layers.",
                                      labelnames=["model_name", "expert"], registry=self.registry)
        self._expert_token_children: list[Any] = []
        self._experts_touched = Gauge("folovllm:moe_experts_touched",
                                      "Experts with at least one token in the last step, mean over MoE layers.",
                                      labelnames=["model_name"], registry=self.registry)
        if engine_info:
            info = Gauge("folovllm:engine_info", "What the engine runs: stage, axes, kernels (value 1).",
                         labelnames=["model_name", *engine_info], registry=self.registry)
            info.labels(model_name, *engine_info.values()).set(1)

    def record(self, stats: SchedulerStats) -> None:
        """A subscriber of the engine's per-step record (`LLMEngine.stat_loggers`)."""
        self.num_running.set(stats.num_running_reqs)
        self.num_waiting.set(stats.num_waiting_reqs)
        self.record_kv_cache(stats.kv_tokens_reserved)
        if stats.num_preemptions > self._num_preemptions:
            self.num_preemptions.inc(stats.num_preemptions - self._num_preemptions)
            self._num_preemptions = stats.num_preemptions
        if stats.prefix_cache.queries:
            self.prefix_cache_queries.inc(stats.prefix_cache.queries)
            self.prefix_cache_hits.inc(stats.prefix_cache.hits)
        spec = stats.spec_decoding_stats
        if spec is not None and spec.num_drafts:
            self.spec_num_drafts.inc(spec.num_drafts)
            self.spec_num_draft_tokens.inc(spec.num_draft_tokens)
            self.spec_num_accepted_tokens.inc(spec.num_accepted_tokens)
            for position, count in enumerate(spec.num_accepted_tokens_per_pos):
                self._spec_per_pos.labels(self._model_name, str(position)).inc(count)
        if stats.expert_load is not None:
            self.record_expert_load(stats.expert_load)

    def record_expert_load(self, load: ExpertLoadStats) -> None:
        """MoE: add one step's routing counts (the label children are made once, not per step)."""
        if not self._expert_token_children:
            self._expert_token_children = [self._expert_tokens.labels(self._model_name, str(e))
                                           for e in range(len(load.num_tokens_per_expert))]
        for child, count in zip(self._expert_token_children, load.num_tokens_per_expert):
            if count:
                child.inc(count)
        self._experts_touched.labels(self._model_name).set(load.mean_experts_touched)

    def record_kv_cache(self, kv_tokens_reserved: int) -> None:
        self.kv_cache_usage.set(kv_tokens_reserved / max(1, self.kv_cache_capacity_tokens))

    def record_idle(self) -> None:
        """No request left (the last ones were aborted between steps, so no step reported it)."""
        self.num_running.set(0)
        self.num_waiting.set(0)

    def record_finished(self, output: RequestOutput, num_generated_tokens: int) -> None:
        """A request finished normally (aborted ones are not counted)."""
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_generated_tokens)
        for completion in output.outputs:
            self._success.labels(self._model_name, completion.finish_reason or "unknown").inc()
        m = output.metrics
        if m is None:
            return
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)

    def record_aborted(self) -> None:
        """A request aborted (its client went away): counted, its latencies are not."""
        self._success.labels(self._model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
