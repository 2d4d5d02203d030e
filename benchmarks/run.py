"""One benchmark runner for every stage: folovllm stages and their peers, side by side, in ONE
process, on one seeded workload, several repeats, medians and ratios.

    python -m benchmarks.run --stages 1 --workload mixed            # stage 01 vs HF generate
    python -m benchmarks.run --stages 1 2 --workload long_tail      # later: 02 vs 01 vs peers
    python -m benchmarks.run --stages 1 --quick                     # ~1 minute smoke run

Writes `<out>/<name>.json` (machine, config, every repeat's time, medians, engine stats) and
`<out>/<name>.md` (a one-line caption and a markdown table; the docs include it by snippet).

Systems are looked up by name in `SYSTEMS`; `--stages N` runs `folovllm-stageN` (registered, or
built generically as `LLM(model, stage=N)`) plus the peers listed in `STAGE_PEERS[N]`. Adding a
stage's peer is one entry in each dict. Timing rules: `torch.set_num_threads(--threads)` (1 by
default on CPU), an untimed warm-up per system, then the repeats interleaved (system A, B, A, B,
...) so that a slow patch of the machine hits every system alike. Only the generation itself is
timed; building a fresh engine for each repeat (so no state, e.g. a prefix cache, survives from
one repeat to the next) and loading weights are not.

Tokens counted: every request produces exactly its own `max_tokens` (greedy, ignore_eos), on every
system, so output tok/s = sum(max_tokens) / seconds. A static batch that computes more rows (HF
generate runs every row of a batch to the batch's longest max_tokens) does not get credit for them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.bench_model import bench_model_info, bench_model_path, machine_description, machine_short, git_commit
from benchmarks.workloads import WORKLOADS, Workload, get_workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- systems ------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What every system is built with."""

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    max_num_seqs: int = 16
    seed: int = 0
    # Extra `EngineConfig` fields for every folovllm system (e.g. kv_cache_memory, block_size,
    # max_model_len); a system named `folovllm-stageN[key=value,...]` adds its own on top.
    engine_args: dict[str, Any] = field(default_factory=dict)


class System:
    """One thing to time. The runner calls `load()` once, then per repeat `prepare(workload)`
    (untimed) and `execute(prepared)` (timed), then `stats(prepared)` (untimed).

    `execute` returns each request's output token ids, in workload order.
    """

    name: str = "?"
    description: str = ""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg

    def load(self) -> None:
        pass

    def prepare(self, workload: Workload) -> Any:
        raise NotImplementedError

    def execute(self, prepared: Any) -> list[list[int]]:
        raise NotImplementedError

    def stats(self, prepared: Any) -> dict[str, Any]:
        """Deterministic counters of the run that just finished (same on every repeat)."""
        return {}

    def release(self, prepared: Any) -> None:
        """Untimed clean-up after a run (e.g. stop a background thread)."""

    def close(self) -> None:
        pass


class FolovllmSystem(System):
    """`folovllm.LLM(model, stage=N, **engine_args)`; a fresh engine per repeat, `LLM.generate`
    timed.

    Every `step()` of the engine is followed by a look at the engine's state (requests running
    and waiting, KV tokens reserved and holding live tokens), kept as `trace` for plots: a few
    attribute reads per step (microseconds, against steps of tens of milliseconds).
    """

    def __init__(self, cfg: BenchConfig, stage: int, overrides: Optional[dict[str, Any]] = None) -> None:
        super().__init__(cfg)
        self.stage = stage
        self.overrides = dict(overrides or {})
        self.name = f"folovllm-stage{stage}" + (
            "[" + ",".join(f"{k}={v}" for k, v in self.overrides.items()) + "]" if self.overrides else "")
        from folovllm.config import STAGE_NAMES

        self.description = f"folovllm LLM.generate, stage {stage:02d} ({STAGE_NAMES.get(stage, '?')})"
        if self.engine_args:
            self.description += ", " + ", ".join(f"{k}={v}" for k, v in self.engine_args.items())
        self.trace: dict[str, list] = {}

    @property
    def engine_args(self) -> dict[str, Any]:
        return {**self.cfg.engine_args, **self.overrides}

    def check(self) -> None:
        """Raise ValueError now if this stage is not built, before anything is timed."""
        from folovllm.config import EngineConfig

        EngineConfig.for_stage(self.stage, dtype=self.cfg.dtype, device=self.cfg.device,
                               max_num_seqs=self.cfg.max_num_seqs, **self.engine_args)

    def prepare(self, workload: Workload) -> Any:
        from folovllm import LLM, SamplingParams

        llm = LLM(self.cfg.model, stage=self.stage, dtype=self.cfg.dtype, device=self.cfg.device,
                  max_num_seqs=self.cfg.max_num_seqs, seed=self.cfg.seed, **self.engine_args)
        self._trace_steps(llm.llm_engine)
        prompts = [list(r.prompt_token_ids) for r in workload.requests]
        params = [
            SamplingParams(temperature=workload.temperature, top_p=1.0, top_k=0,
                           max_tokens=r.max_tokens, ignore_eos=workload.ignore_eos)
            for r in workload.requests
        ]
        return llm, prompts, params

    def execute(self, prepared: Any) -> list[list[int]]:
        llm, prompts, params = prepared
        self.trace = trace = dict(t=[], running=[], waiting=[], kv_reserved=[], kv_used=[],
                                  prompt_tokens=[], decode_rows=[])
        trace["t0"] = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def _trace_steps(self, engine: Any) -> None:
        """Wrap `engine.step` (an instance attribute shadows the method `LLM.generate` calls)."""
        step = engine.step
        scheduler, kv, stats = engine.scheduler, engine.kv_cache_manager, engine.stats

        def traced_step() -> Any:
            prompt, rows = stats.num_prompt_tokens_computed, stats.num_decode_row_steps
            out = step()
            tr = self.trace
            tr["prompt_tokens"].append(stats.num_prompt_tokens_computed - prompt)  # prefill step
            tr["decode_rows"].append(stats.num_decode_row_steps - rows)  # decode step
            tr["t"].append(round(time.perf_counter() - tr["t0"], 4))
            tr["running"].append(scheduler.num_live_requests())
            tr["waiting"].append(len(scheduler.waiting))
            tr["kv_reserved"].append(kv.num_reserved_tokens)
            tr["kv_used"].append(scheduler.live_kv_tokens())
            return out

        engine.step = traced_step

    def stats(self, prepared: Any) -> dict[str, Any]:
        return dict(prepared[0].stats.as_dict())

    def kv_capacity_tokens(self, prepared: Any) -> Optional[int]:
        """Tokens the KV cache can hold (stage 02 slots, stage 03 blocks); None for stage 01."""
        cache = getattr(prepared[0].llm_engine.kv_cache_manager, "kv_cache", None)
        if self.stage < 2 or cache is None:
            return None
        return cache.num_blocks * cache.block_size


def _load_hf_model_into(system: "System") -> Any:
    """Load the bench model with HF transformers on the system's device; returns its config."""
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, system.cfg.dtype)
    system.model = AutoModelForCausalLM.from_pretrained(system.cfg.model, dtype=dtype)
    system.model.to(system.cfg.device).eval()
    system.description += (f" (transformers {transformers.__version__}, attn "
                           f"{system.model.config._attn_implementation})")
    return system.model.config


class HFGenerateSystem(System):
    """HF transformers `model.generate` on the same checkpoint, in static batches.

    The requests are cut, in workload order, into batches of `max_num_seqs` (what folovllm stage
    01 does); each batch is left-padded, with an attention mask, and generates
    `max_new_tokens = the batch's largest max_tokens` for every row. Greedy (or the workload's
    temperature with top_k/top_p off, as in vLLM). HF's own defaults otherwise: DynamicCache,
    the "sdpa" attention.
    """

    name = "hf-generate"
    description = "HF transformers model.generate, static batches, left-padded"

    def load(self) -> None:
        cfg = _load_hf_model_into(self)
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        # Never stop on EOS (ignore_eos). HF fills an `eos_token_id=None` back in from the model's
        # generation_config, and `min_new_tokens` would change the logits (it masks EOS to -inf),
        # so give generate() an EOS id the model cannot emit: its logits have `vocab_size`
        # columns, ids 0..vocab_size-1, so `vocab_size` itself never occurs. Every row then runs
        # exactly max_new_tokens steps on the same logits as folovllm's ignore_eos.
        self.never_eos = cfg.vocab_size
        # Count the model calls and the rows/tokens each computes (a forward pre-hook: ~1 us).
        self._calls: list[tuple[int, int]] = []
        self.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._calls.append(tuple(ids.shape))

    def prepare(self, workload: Workload) -> Any:
        from transformers import GenerationConfig

        self._calls = []
        n = self.cfg.max_num_seqs
        batches = [workload.requests[i : i + n] for i in range(0, len(workload), n)]
        sampling = dict(do_sample=False)
        if workload.temperature > 0:
            sampling = dict(do_sample=True, temperature=workload.temperature, top_k=0, top_p=1.0)
        configs = [
            GenerationConfig(max_new_tokens=max(r.max_tokens for r in b), eos_token_id=self.never_eos,
                             pad_token_id=self.pad_token_id, **sampling)
            for b in batches
        ]
        return workload, batches, configs

    @torch.inference_mode()
    def execute(self, prepared: Any) -> list[list[int]]:
        _, batches, configs = prepared
        device, results = self.cfg.device, []
        for batch, gen_config in zip(batches, configs):
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):  # left padding
                ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
                mask[row, width - len(r.prompt_token_ids):] = 1
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=gen_config)
            new = out[:, width:].tolist()
            results += [row[: r.max_tokens] for row, r in zip(new, batch)]
        return results

    def stats(self, prepared: Any) -> dict[str, Any]:
        """The same counters as folovllm's EngineStats where they make sense, from the hook."""
        workload, batches, _ = prepared
        s = dict(num_forward_passes=len(self._calls), num_prompt_tokens=workload.num_prompt_tokens,
                 num_prompt_tokens_computed=0, num_generated_tokens=workload.num_output_tokens,
                 num_decode_row_steps=0, num_wasted_row_steps=0, kv_utilization=None)
        calls = iter(self._calls)
        for batch in batches:
            rows, width = next(calls)  # the prefill: [B, padded prompt length]
            s["num_prompt_tokens_computed"] += rows * width
            decodes = max(r.max_tokens for r in batch) - 1
            for _ in range(decodes):
                next(calls)
            s["num_decode_row_steps"] += rows * decodes
            # decode j (1-based) computes output token j+1; row i is idle once j >= max_tokens_i
            s["num_wasted_row_steps"] += sum(max(0, decodes - (r.max_tokens - 1)) for r in batch)
        return s


class HFGenerateBatchSystem(System):
    """HF transformers' own continuous batching (`transformers.generation.continuous_batching`,
    the engine behind `model.generate_batch`), on the same checkpoint.

    `generate_batch(inputs, generation_config)` takes ONE `max_new_tokens` for every request, so
    it would compute up to the longest request's length for every request: more work than the
    workload asks for. The manager it wraps takes a `max_new_tokens` per request
    (`ContinuousBatchingManager.add_request(input_ids, max_new_tokens=...)`), so this system does
    what `generate_batch` does, request by request: `model.init_continuous_batching(...)`, add
    every request with its own `max_tokens` and the never-emitted EOS id, start the generation
    thread, wait for every result. Same work as folovllm: exactly `max_tokens` per request.

    Sized like folovllm stage 02 (not HF's CPU defaults, which size the cache from the machine's
    RAM and spend ~30 s zeroing it): at most `max_num_seqs` requests per batch, 2048 tokens per
    batch, a paged cache of `max_num_seqs * 2048` tokens in pages of 256 (HF's default page
    size), no prefix sharing (the prompts share nothing; folovllm stage 02 has no prefix cache),
    no CUDA graphs, no torch.compile. Its scheduler mixes prefill and decode (and may split a
    prompt) in one batch, which folovllm's stage 02 does not (that is stage 05).

    Untimed: creating the manager and its cache (`manager.warmup()` builds the batch processor;
    there are no CUDA graphs to capture on CPU), and stopping the thread afterwards. Timed: adding
    the requests, starting the thread, receiving every finished result. The generation thread is
    pinned to the runner's torch thread count (torch.set_num_threads is per-thread for OpenMP).
    """

    name = "hf-generate-batch"
    description = "HF transformers continuous batching (generate_batch's manager), paged cache"
    page_size = 256
    max_batch_tokens = 2048
    max_len = 2048

    def load(self) -> None:
        cfg = _load_hf_model_into(self)
        self.never_eos = cfg.vocab_size  # as in HFGenerateSystem: an id the model cannot emit
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self._calls: list[tuple[int, ...]] = []
        self.model.register_forward_pre_hook(self._count, with_kwargs=True)
        self.threads = torch.get_num_threads()

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._calls.append(tuple(ids.shape))

    def prepare(self, workload: Workload) -> Any:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if workload.temperature > 0:
            raise ValueError("hf-generate-batch is set up for greedy workloads only")
        n = self.cfg.max_num_seqs
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size, num_blocks=n * self.max_len // self.page_size,
            max_batch_tokens=self.max_batch_tokens, max_requests_per_batch=n,
            allow_block_sharing=False, use_cuda_graph=False, use_async_batching=False,
        )
        gen_config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in workload.requests), do_sample=False,
            eos_token_id=self.never_eos, pad_token_id=self.pad_token_id,
        )
        manager = self.model.init_continuous_batching(gen_config, cb_config)
        manager.warmup()  # builds the batch processor and its paged cache now, untimed
        threads, loop = self.threads, manager._run_generation_loop

        def pinned_loop() -> None:  # the generation thread: same torch thread count as ours
            torch.set_num_threads(threads)
            loop()

        manager._run_generation_loop = pinned_loop
        self._calls = []
        return workload, manager

    @torch.inference_mode()
    def execute(self, prepared: Any) -> list[list[int]]:
        workload, manager = prepared
        ids = [f"r{i}" for i in range(len(workload))]
        for rid, r in zip(ids, workload.requests):
            manager.add_request(list(r.prompt_token_ids), request_id=rid,
                                max_new_tokens=r.max_tokens, eos_token_id=self.never_eos)
        manager.start()
        results: dict[str, Any] = {}
        try:
            while len(results) < len(ids):
                out = manager.get_result(timeout=1)
                if out is not None:
                    if out.is_finished():
                        if out.error is not None:
                            raise RuntimeError(f"hf-generate-batch: request {out.request_id} failed: {out.error}")
                        results[out.request_id] = out
                elif not manager.is_running():
                    raise RuntimeError("hf-generate-batch: the generation thread stopped early "
                                       f"({len(results)}/{len(ids)} requests done)")
        except BaseException:
            self.release(prepared)
            raise
        return [list(results[rid].generated_tokens) for rid in ids]

    def release(self, prepared: Any) -> None:
        """Untimed: stop the generation thread (it idles once the last result is out)."""
        manager = prepared[1]
        if manager.is_running():
            manager.stop(block=True)
            manager.destroy()

    def stats(self, prepared: Any) -> dict[str, Any]:
        workload, manager = prepared
        return dict(num_forward_passes=len(self._calls), num_prompt_tokens=workload.num_prompt_tokens,
                    num_tokens_computed=sum(int(torch.tensor(c).prod()) for c in self._calls),
                    num_generated_tokens=workload.num_output_tokens, kv_utilization=None)


def _vllm_system(cfg: BenchConfig, eager: bool) -> System:
    from benchmarks.vllm_peer import make_vllm_system

    return make_vllm_system(cfg, eager)


# Every system, by name. A stage's engineer adds `folovllm-stageN` here only if it needs more
# than `FolovllmSystem(cfg, N)`, and its peers (e.g. HF's continuous batching `generate_batch`).
SYSTEMS: dict[str, Callable[[BenchConfig], System]] = {
    "folovllm-stage1": lambda cfg: FolovllmSystem(cfg, 1),
    "hf-generate": HFGenerateSystem,
    "hf-generate-batch": HFGenerateBatchSystem,
    # real vLLM in its own venv (benchmarks/install_vllm_cpu.sh, benchmarks/vllm_peer.py)
    "vllm": lambda cfg: _vllm_system(cfg, eager=False),
    "vllm-eager": lambda cfg: _vllm_system(cfg, eager=True),
}
# The peers each stage is compared with (the previous folovllm stage counts as a peer: it is
# what the stage improves on).
STAGE_PEERS: dict[int, list[str]] = {
    1: ["hf-generate"],
    2: ["folovllm-stage1", "hf-generate", "hf-generate-batch"],
    3: ["folovllm-stage2"],
}

_FOLOVLLM_NAME = re.compile(r"folovllm-stage(\d+)(?:\[(.*)\])?")


def parse_folovllm_name(name: str) -> Optional[tuple[int, dict[str, Any]]]:
    """`folovllm-stage3[block_size=8,kv_cache_memory=67108864]` -> (3, {"block_size": 8, ...});
    None if `name` is not a folovllm system. Values are ints where they parse as ints."""
    m = _FOLOVLLM_NAME.fullmatch(name)
    if not m:
        return None
    overrides: dict[str, Any] = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad system {name!r}: expected key=value inside [...], got {item!r}")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            overrides[key.strip()] = value.strip()
    return int(m.group(1)), overrides


def make_system(name: str, cfg: BenchConfig) -> System:
    if name in SYSTEMS:
        return SYSTEMS[name](cfg)
    parsed = parse_folovllm_name(name)
    if parsed:
        return FolovllmSystem(cfg, *parsed)
    raise ValueError(f"unknown system {name!r}; known: {sorted(SYSTEMS)} or "
                     "folovllm-stageN[key=value,...]")


def systems_for_stages(stages: list[int], with_peers: bool = True) -> list[str]:
    """The stages' folovllm systems and peers: folovllm stages first, lowest stage first (the
    agreement reference and the "× previous stage" order), then the other peers."""
    names = [f"folovllm-stage{s}" for s in sorted(set(stages))]
    if with_peers:
        for s in sorted(set(stages)):
            names += [p for p in STAGE_PEERS.get(s, []) if p not in names]
    folovllm = sorted((n for n in names if parse_folovllm_name(n)), key=lambda n: parse_folovllm_name(n)[0])
    return folovllm + [n for n in names if not parse_folovllm_name(n)]


# -- timing -------------------------------------------------------------------------------------


@dataclass
class Measurement:
    seconds: float  # wall time of the generation
    outputs: list[list[int]]
    stats: dict[str, Any]
    cpu_seconds: float = 0.0  # this process's CPU time over the same span
    loadavg: Optional[float] = None  # 1-minute load average when it ended
    trace: Optional[dict[str, Any]] = None  # per engine step (folovllm systems), for plots


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def time_once(system: System, workload: Workload) -> Measurement:
    """One timed run of the whole workload on a freshly prepared system."""
    prepared = system.prepare(workload)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    cpu_start, start = time.process_time(), time.perf_counter()
    outputs = system.execute(prepared)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    if getattr(system, "child_cpu_seconds", None) is not None:  # a peer in its own process (vLLM)
        cpu_seconds = system.child_cpu_seconds
    lengths = [len(o) for o in outputs]
    expected = [r.max_tokens for r in workload.requests]
    if lengths != expected:
        bad = [(i, got, want) for i, (got, want) in enumerate(zip(lengths, expected)) if got != want]
        raise RuntimeError(f"{system.name}: output lengths differ from max_tokens "
                           f"(request, got, want): {bad[:5]}; the work would not be comparable")
    stats = system.stats(prepared)
    system.release(prepared)
    trace = dict(system.trace) if isinstance(system, FolovllmSystem) else None
    if trace is not None:
        trace.pop("t0", None)
        trace["kv_capacity_tokens"] = system.kv_capacity_tokens(prepared)
    del prepared
    return Measurement(seconds, outputs, stats, cpu_seconds, _loadavg(), trace)


def warmup_workload(workload: Workload, n: int) -> Workload:
    """The first `n` requests with at most 4 output tokens: real shapes, a few decode steps."""
    from benchmarks.workloads import Request

    w = workload.head(n)
    reqs = [Request(r.prompt_token_ids, min(r.max_tokens, 4)) for r in w.requests]
    return Workload(w.name + "-warmup", w.description, reqs, w.seed, w.temperature, w.ignore_eos)


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How many requests produced exactly the reference's tokens, and the mean fraction of each
    output that matches before the first difference (greedy, same weights: ~1.0 expected;
    float rounding in a different kernel or padding can flip a near-tie and diverge after)."""
    exact, prefix = 0, 0.0
    for a, b in zip(outputs, reference):
        exact += a == b
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k / max(len(b), 1)
    n = max(len(reference), 1)
    return dict(exact_fraction=round(exact / n, 4), mean_prefix_fraction=round(prefix / n, 4))


# -- report -------------------------------------------------------------------------------------


def _fmt_int(x: Any) -> str:
    return "—" if x is None else f"{int(x):,}"


def render_table(result: dict[str, Any]) -> str:
    baseline = result["baseline"]
    rows = result["systems"]
    show_prev = any(r.get("ratio_vs_previous_stage") is not None for r in rows.values())
    # Stage 02+ (continuous batching, paged KV): how many run at once, preemptions, KV waste.
    show_kv = any((parse_folovllm_name(n) or (0,))[0] >= 2 for n in rows)
    repeats = result["config"]["repeats"]
    show_cpu = all("median_cpu_seconds" in r for r in rows.values())
    head = ["system", f"output tok/s (median of {repeats})", "total tok/s", f"× {baseline}"]
    if show_prev:
        head.append("× previous stage")
    head += ["time s (min–max)"] + (["CPU s"] if show_cpu else []) + ["forward passes", "prompt tokens computed",
             "wasted row steps", "KV util"]
    if show_kv:
        head += ["KV waste", "peak running", "preemptions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(
        [":--"] + ["--:"] * (len(head) - 1)) + "|"]
    for name, r in rows.items():
        st = r["stats"]
        kv = st.get("kv_utilization")
        cells = [f"`{name}`", f"{r['output_tok_s']:,.1f}", f"{r['total_tok_s']:,.1f}",
                 f"{r['ratio_vs_baseline']:.2f}"]
        if show_cpu:  # the same ratio in CPU time (not stretched by waiting for a core)
            base_cpu = rows[baseline]["median_cpu_seconds"]
            cells[-1] += f" (CPU {base_cpu / r['median_cpu_seconds']:.2f})"
        if show_prev:
            prev, prev_cpu = r.get("ratio_vs_previous_stage"), r.get("ratio_vs_previous_stage_cpu")
            cells.append("—" if prev is None else f"{prev:.2f}" + (
                "" if prev_cpu is None else f" (CPU {prev_cpu:.2f})"))
        cells.append(f"{r['median_seconds']:.2f} ({min(r['seconds']):.2f}–{max(r['seconds']):.2f})")
        if show_cpu:
            cells.append(f"{r['median_cpu_seconds']:.2f}")
        cells += [_fmt_int(st.get("num_forward_passes")), _fmt_int(st.get("num_prompt_tokens_computed")),
                  _fmt_int(st.get("num_wasted_row_steps")), "—" if kv is None else f"{kv:.1%}"]
        if show_kv:
            cells += ["—" if kv is None else f"{1 - kv:.1%}", _fmt_int(st.get("max_num_running")),
                      _fmt_int(st.get("num_preemptions"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(result: dict[str, Any]) -> str:
    w = result["workload"]
    stages = ", ".join(f"{s:02d}" for s in result["config"]["stages"]) or "-"
    caption = (
        f"Stage {stages} vs peers, workload `{w['name']}` ({w['num_requests']} requests, prompt "
        f"{w['prompt_len_min']}..{w['prompt_len_max']}, output {w['output_len_min']}.."
        f"{w['output_len_max']} tokens, "
        f"{'greedy' if not w['temperature'] else 'temperature ' + str(w['temperature'])}, "
        f"ignore_eos), model {result['model']['name']}, {result['config']['dtype']}, "
        f"batch {result['config']['max_num_seqs']}{_engine_args_text(result['config'])}: "
        f"`{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}."
    )
    load, cores = result.get("peak_loadavg_1m"), result["machine"].get("cpu_cores") or 1
    if load is not None and result["machine"].get("gpu") is None and load > cores:
        caption += (f" The machine was shared (1-minute load average up to {load:.1f} on {cores} "
                    "cores): read the ratios, not the absolute numbers; the ratios of CPU time in "
                    "brackets are not stretched by waiting for a core.")
    return caption + "\n\n" + render_table(result) + "\n"


def _engine_args_text(config: dict[str, Any]) -> str:
    args = config.get("engine_args") or {}
    parts = []
    if "max_model_len" in args:
        parts.append(f"max_model_len {args['max_model_len']}")
    if "kv_cache_memory" in args:
        b = args["kv_cache_memory"]
        parts.append(f"KV cache {b:,} bytes ({b / 2**20:g} MiB)")
    if "block_size" in args:
        parts.append(f"block size {args['block_size']}")
    return "".join(", " + p for p in parts)


def dump_json(obj: Any) -> str:
    """Indented JSON, but a list of plain numbers (timings, per-step traces) on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-0-9.eE,\s]*?|(?:null|true|false|[-0-9.eE]+)(?:,\s*(?:null|[-0-9.eE]+))*)\s*\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1).strip()) + "]", text) + "\n"


# -- main ---------------------------------------------------------------------------------------


def run_benchmark(
    system_names: list[str], workload: Workload, cfg: BenchConfig, repeats: int,
    baseline: Optional[str], warmup: bool = True, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every system on `workload`, interleaved, and return the results dict."""
    systems = [make_system(n, cfg) for n in system_names]
    for s in systems:
        if isinstance(s, FolovllmSystem):
            s.check()
    for s in systems:
        log(f"loading {s.name} ...")
        s.load()
    if warmup:
        w = warmup_workload(workload, cfg.max_num_seqs)
        for s in systems:
            t = time_once(s, w).seconds
            log(f"warm-up {s.name}: {t:.2f}s")
    runs: dict[str, list[Measurement]] = {s.name: [] for s in systems}
    for i in range(repeats):
        for s in systems:
            m = time_once(s, workload)
            runs[s.name].append(m)
            tok_s = workload.num_output_tokens / m.seconds
            log(f"repeat {i + 1}/{repeats} {s.name}: {m.seconds:.2f}s, {tok_s:,.1f} output tok/s "
                f"(cpu {m.cpu_seconds:.2f}s, load {m.loadavg})")
    for s in systems:
        s.close()

    baseline = baseline or ("hf-generate" if "hf-generate" in runs else system_names[0])
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not among the systems run: {system_names}")
    out_tokens, all_tokens = workload.num_output_tokens, workload.num_output_tokens + workload.num_prompt_tokens
    reference = system_names[0]
    results: dict[str, Any] = {}
    for s in systems:
        ms = runs[s.name]
        secs = [m.seconds for m in ms]
        med = statistics.median(secs)
        stats = ms[0].stats
        results[s.name] = dict(
            description=s.description,
            seconds=[round(x, 4) for x in secs],
            median_seconds=round(med, 4),
            # CPU time of this process: on a CPU machine shared with other work, wall time
            # grows while we wait for a core and CPU time does not (with 1 thread, cpu ~= wall
            # on a quiet machine). loadavg: the 1-minute load average after each repeat.
            cpu_seconds=[round(m.cpu_seconds, 4) for m in ms],
            median_cpu_seconds=round(statistics.median(m.cpu_seconds for m in ms), 4),
            loadavg_1m=[m.loadavg for m in ms],
            output_tok_s=round(out_tokens / med, 2),
            total_tok_s=round(all_tokens / med, 2),
            output_tok_s_per_repeat=[round(out_tokens / x, 2) for x in secs],
            stats=stats,
            stats_identical_across_repeats=all(m.stats == stats for m in ms),
            outputs_identical_across_repeats=(
                all(m.outputs == ms[0].outputs for m in ms) if workload.temperature == 0 else None),
            agreement_with=reference,
            agreement=(agreement(ms[0].outputs, runs[reference][0].outputs)
                       if workload.temperature == 0 else None),
        )
        if ms[0].trace is not None:
            # per engine step of the first repeat: seconds since the start, requests running and
            # waiting after the step, KV tokens reserved and holding live tokens
            results[s.name]["trace"] = ms[0].trace
    base = results[baseline]["median_seconds"]
    # "× previous stage": plain `folovllm-stageN` systems only, each against the next lower stage
    plain = {parse_folovllm_name(n)[0]: n for n in results
             if parse_folovllm_name(n) and not parse_folovllm_name(n)[1]}
    for name, r in results.items():
        r["ratio_vs_baseline"] = round(base / r["median_seconds"], 4)
        r["ratio_vs_baseline_cpu"] = round(results[baseline]["median_cpu_seconds"] / r["median_cpu_seconds"], 4)
        parsed = parse_folovllm_name(name)
        if parsed:
            lower = [st for st in plain if st < parsed[0]]
            prev = plain[max(lower)] if lower and not parsed[1] else None
            r["ratio_vs_previous_stage"] = (
                None if prev is None else round(results[prev]["median_seconds"] / r["median_seconds"], 4))
            # the same ratio in CPU time of the process, which waiting for a core does not inflate
            r["ratio_vs_previous_stage_cpu"] = (
                None if prev is None else round(results[prev]["median_cpu_seconds"] / r["median_cpu_seconds"], 4))
    loads = [m.loadavg for ms in runs.values() for m in ms if m.loadavg is not None]
    return dict(baseline=baseline, systems=results, peak_loadavg_1m=max(loads) if loads else None)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[1],
                   help="folovllm stages to run, each with its peers (STAGE_PEERS)")
    p.add_argument("--systems", nargs="+", default=None,
                   help=f"run exactly these systems instead (known: {', '.join(SYSTEMS)}, "
                        "folovllm-stageN)")
    p.add_argument("--no-peers", action="store_true", help="only the folovllm stages")
    p.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS))
    p.add_argument("--num-requests", type=int, default=None, help="override the workload's size")
    p.add_argument("--quick", action="store_true", help="small workload, for a ~1 minute smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per system (default 3)")
    p.add_argument("--baseline", default=None, help="ratios are vs this system (default hf-generate)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="folovllm max_model_len (default: the model's 2048 positions)")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="folovllm KV cache bytes, stage 02 slots and stage 03 blocks alike "
                        "(default: max_num_seqs full-length sequences)")
    p.add_argument("--block-size", type=int, default=None, help="folovllm stage 03 block size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench model)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for <name>.json and <name>.md")
    p.add_argument("--name", default=None, help="results file name (default stageNN_<workload>_<cpu|gpu>)")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite <JSON minus .json>.md from an existing results file")
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render)
        md = render_markdown(json.loads(src.read_text()))
        src.with_suffix(".md").write_text(md)
        print(md + f"\nwrote {src.with_suffix('.md')}")
        return 0

    repeats = args.repeats if args.repeats is not None else 3
    if repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = args.model or str(bench_model_path())
    model_info = bench_model_info(Path(model))
    names = args.systems or systems_for_stages(args.stages, with_peers=not args.no_peers)
    stages = sorted({int(m.group(1)) for n in names if (m := re.fullmatch(r"folovllm-stage(\d+)", n))})
    workload = get_workload(args.workload, vocab_size=model_info["vocab_size"], seed=args.seed,
                            quick=args.quick, num_requests=args.num_requests)
    if workload.max_seq_len > model_info["max_position_embeddings"]:
        p.error(f"workload needs {workload.max_seq_len} positions; the model has "
                f"{model_info['max_position_embeddings']}")
    engine_args = {k: v for k, v in dict(max_model_len=args.max_model_len,
                                          kv_cache_memory=args.kv_cache_memory,
                                          block_size=args.block_size).items() if v is not None}
    cfg = BenchConfig(model=model, device=args.device, dtype=args.dtype,
                      max_num_seqs=args.max_num_seqs, seed=args.seed, engine_args=engine_args)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = machine_description()
    print(f"{command}\nmachine: {machine_short(machine)}\nworkload: {workload.summary()}")
    print(f"systems: {names}")

    try:
        bench = run_benchmark(names, workload, cfg, repeats, args.baseline)
    except ValueError as e:  # e.g. a stage that is not built yet
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = dict(
        command=command,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        machine=machine,
        model=model_info,
        config=dict(stages=stages, systems=names, workload=args.workload, quick=args.quick,
                    repeats=repeats, threads=args.threads, device=args.device, dtype=args.dtype,
                    max_num_seqs=args.max_num_seqs, seed=args.seed, engine_args=engine_args),
        workload=workload.summary(),
        **bench,
    )
    md = render_markdown(result)
    print()
    print(md)
    if not args.no_write:
        # named after the stages asked for (`--stages 2` runs stage 01 too, as a peer)
        named = stages if args.systems else sorted(set(args.stages))
        default = "stage" + "-".join(f"{s:02d}" for s in named) if named else "peers"
        name = args.name or f"{default}_{args.workload}_{'gpu' if args.device.startswith('cuda') else 'cpu'}" \
                            + ("_quick" if args.quick else "")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(dump_json(result))
        (out / f"{name}.md").write_text(md)
        print(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
