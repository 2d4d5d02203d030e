"""folovllm as a benchmarked system: `LLM(model, stage=N, **engine_args).generate(...)`, and the
per-step trace every folovllm benchmark keeps: the engine's step tracer (folovllm/trace/), one
subscriber of its per-step record, which costs one append per step."""

from __future__ import annotations

from typing import Any, Optional

from benchmarks.systems.base import BenchConfig, System
from benchmarks.workloads import Workload

# trace column -> `SchedulerStats` field (folovllm/engine/stats.py)
TRACE_FIELDS = dict(running="num_running_reqs", waiting="num_waiting_reqs",
                    kv_reserved="kv_tokens_reserved", kv_used="kv_tokens_used",
                    prompt_tokens="num_prefill_tokens", decode_tokens="num_decode_tokens")


def trace_columns(tracer: Any) -> dict[str, Any]:
    """A `StepTracer`'s steps as the results' columns: the seconds from its `clear()` to the end
    of each step (`t`), what each step left behind (requests running and waiting, KV tokens
    reserved and holding live tokens, prompt and decode tokens computed), and the cache's
    capacity in tokens."""
    steps, config = list(tracer.steps), tracer.config
    return {"t": [round(s.end_time - tracer.t0, 4) for s in steps],
            **{column: [getattr(s, stat) for s in steps] for column, stat in TRACE_FIELDS.items()},
            "kv_capacity_tokens": config["num_blocks"] * config["block_size"]}


class FolovllmSystem(System):
    """`folovllm.LLM(model, stage=N, **engine_args)`; a fresh engine per repeat (so nothing, e.g.
    a prefix cache, carries over), `LLM.generate` timed; its `EngineStats` and step trace.

    The overrides of `folovllm-stageN[key=value,...]` win over `BenchConfig`: any `EngineConfig`
    field, and `model` (another checkpoint, e.g. a GPTQ one: axis 07) or `dtype`."""

    def __init__(self, cfg: BenchConfig, stage: int, overrides: Optional[dict[str, Any]] = None) -> None:
        super().__init__(cfg)
        from folovllm.config import STAGE_NAMES

        self.stage = stage
        self.overrides = dict(overrides or {})
        self.name = f"folovllm-stage{stage}" + (
            "[" + ",".join(f"{k}={v}" for k, v in self.overrides.items()) + "]" if self.overrides else "")
        self.description = f"folovllm LLM.generate, stage {stage:02d} ({STAGE_NAMES.get(stage, '?')})"
        if self.engine_args:
            self.description += ", " + ", ".join(f"{k}={v}" for k, v in self.engine_args.items())

    @property
    def engine_args(self) -> dict[str, Any]:
        return {**self.cfg.engine_args, **self.overrides}

    def llm_args(self) -> dict[str, Any]:
        """`LLM(**llm_args())`: the config's model, dtype, device, batch and seed, then the
        engine arguments on top."""
        return dict(dict(model=self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device,
                         max_num_seqs=self.cfg.max_num_seqs, seed=self.cfg.seed), **self.engine_args)

    def check(self) -> None:
        from folovllm.config import EngineConfig

        args = self.llm_args()
        del args["model"], args["seed"]
        EngineConfig.for_stage(self.stage, **args)

    def build(self) -> Any:
        """A fresh `folovllm.LLM` of this system (the benchmarks that drive the engine
        themselves, e.g. step by step, build it here too)."""
        from folovllm import LLM

        return LLM(stage=self.stage, **self.llm_args())

    def prepare(self, workload: Workload) -> Any:
        from folovllm import SamplingParams
        from folovllm.trace.recorder import StepTracer

        llm = self.build()
        prompts = [list(r.prompt_token_ids) for r in workload.requests]
        params = [SamplingParams(temperature=workload.temperature, top_p=1.0, top_k=0,
                                 max_tokens=r.max_tokens, ignore_eos=workload.ignore_eos)
                  for r in workload.requests]
        return llm, prompts, params, StepTracer.attach(llm.llm_engine)

    def execute(self, prepared: Any) -> list[list[int]]:
        llm, prompts, params, tracer = prepared
        tracer.clear()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def stats(self, prepared: Any) -> dict[str, Any]:
        return dict(prepared[0].stats.as_dict())

    def trace(self, prepared: Any) -> Optional[dict[str, Any]]:
        return trace_columns(prepared[3])
