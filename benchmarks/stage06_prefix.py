"""Stage 06 on CPU: the whole engine with prefix caching (stage 06) against the stage before it
(05, chunked prefill; `--baseline-stage 4` for the one before that), side by side in one process,
on one thread.

    python -m benchmarks.stage06_prefix                # full run, a few minutes on one thread
    python -m benchmarks.stage06_prefix --quick        # smoke run (small, printed, not written)

Three workloads on the bench model (`benchmarks.bench_model`: Qwen3 architecture, 8 layers,
random weights), float32, greedy, `ignore_eos`, every request submitted at once:

    shared_prefix  `workloads.get_workload("shared_prefix")`: 16 requests, one 512-token system
                   prompt + a 16..64-token question each, 16 output tokens
    multi_turn     4 chats of 4 turns, each turn one `generate` over the 4 chats: turn t's prompt
                   is turn t-1's prompt + its 16-token answer + a new 16..32-token message
                   (the first message is 64..128 tokens)
    no_prefix      `workloads.get_workload("mixed", quick=True)`: 16 unrelated prompts of
                   16..128 tokens, output 8..32 (the cache can only cost here)

Both systems run `LLM(model, stage=N)` with its defaults, so they differ only by the cache.
Each run gets a fresh engine (a cache warmed by the previous repeat would
hit everything), warmed up on an unrelated prompt, then timed; `--repeats` runs with the systems
interleaved; medians. TTFT is per request, from submission to its first token, averaged over the
requests of a run. The two systems must produce the same tokens (checked and recorded).

Writes `benchmarks/results/stage06_prefix_cpu.json` (machine, commit, every repeat) and `.md`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import interleave, peak_loadavg, summarize, timed
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.systems import BenchConfig, make_system
from benchmarks.workloads import FIRST_ORDINARY_TOKEN_ID, get_workload

Batch = tuple[list[list[int]], list[int]]  # prompts, max_tokens
Batches = Callable[[list[list[int]]], "Batch | None"]  # last answers -> next batch, or None


def build(model: str, system: str) -> Any:
    """A fresh engine of registry entry `system` (a cache warmed by an earlier repeat would hit
    everything), warmed up on a prompt unrelated to every workload, its stats zeroed."""
    from folovllm import SamplingParams

    llm = make_system(system, BenchConfig(model=model, engine_args=dict(max_model_len=2048))).build()
    rng = random.Random(12345)
    warm = [rng.randrange(FIRST_ORDINARY_TOKEN_ID, 512) for _ in range(40)]
    llm.generate([warm], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.stats.__init__(bytes_per_token=llm.stats.bytes_per_token)
    return llm


def generate_all(llm: Any, batches: Batches) -> tuple[list[list[int]], list[float]]:
    """Generate batch after batch; every answer, and every request's TTFT."""
    from folovllm import SamplingParams

    answers: list[list[int]] = []
    every_answer: list[list[int]] = []
    ttfts: list[float] = []
    while (batch := batches(answers)) is not None:
        prompts, max_tokens = batch
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
        outs = llm.generate(prompts, params, use_tqdm=False)
        answers = [list(o.outputs[0].token_ids) for o in outs]
        every_answer += answers
        ttfts += [o.metrics.time_to_first_token for o in outs]
    return every_answer, ttfts


def measure(model: str, system: str, make_batches: Callable[[], Batches]) -> dict[str, Any]:
    """One repeat: a fresh engine (untimed), then the workload, timed."""
    llm = build(model, system)
    t = timed(lambda: generate_all(llm, make_batches()))
    answers, ttfts = t.value
    s = llm.stats
    t.value = answers
    return dict(timing=t, mean_ttft_s=statistics.mean(ttfts), p50_ttft_s=statistics.median(ttfts),
                num_prompt_tokens=s.num_prompt_tokens,
                num_prompt_tokens_computed=s.num_prompt_tokens_computed,
                prefix_cache_hit_rate=round(s.prefix_cache.hit_rate, 4),
                prefix_cache_blocks_saved=s.prefix_cache.blocks_saved,
                prefix_cache_evictions=s.prefix_cache.evictions)


def one_batch(prompts: list[list[int]], max_tokens: list[int]) -> Callable[[list[list[int]]], Batch | None]:
    done = [False]

    def batches(_answers: list[list[int]]) -> Batch | None:
        if done[0]:
            return None
        done[0] = True
        return prompts, max_tokens

    return batches


def multi_turn(num_chats: int, num_turns: int, vocab: int, seed: int) -> Callable[[list[list[int]]], Batch | None]:
    """Turn t's prompt = turn t-1's prompt + its answer + a new message (seeded lengths)."""
    rng = random.Random(seed)
    new = lambda lo, hi: [rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    messages = [[new(64, 128)] + [new(16, 32) for _ in range(num_turns - 1)] for _ in range(num_chats)]
    state = {"turn": 0, "prompts": [[] for _ in range(num_chats)]}

    def batches(answers: list[list[int]]) -> Batch | None:
        t = state["turn"]
        if t == num_turns:
            return None
        prev = state["prompts"]
        prompts = [p + (answers[i] if t else []) + messages[i][t] for i, p in enumerate(prev)]
        state["turn"], state["prompts"] = t + 1, prompts
        return prompts, [16] * num_chats

    return batches


def bench(model: str, systems: list[str], make_batches: Callable[[], Batches], repeats: int) -> dict[str, Any]:
    trials = {name: (lambda name=name: measure(model, name, make_batches)) for name in systems}
    runs = interleave(trials, repeats)
    rows, tokens = {}, {}
    for name, rs in runs.items():
        answers = [r["timing"].value for r in rs]
        assert all(a == answers[0] for a in answers), f"{name}: tokens changed between repeats"
        tokens[name] = answers[0]
        counts = {k: v for k, v in rs[0].items() if k not in ("timing", "mean_ttft_s", "p50_ttft_s")}
        rows[name] = dict(**summarize([r["timing"] for r in rs]),
                          mean_ttft_s=[r["mean_ttft_s"] for r in rs],
                          median_mean_ttft_s=statistics.median(r["mean_ttft_s"] for r in rs),
                          median_p50_ttft_s=statistics.median(r["p50_ttft_s"] for r in rs), **counts)
    first = next(iter(tokens.values()))
    return dict(systems=rows, same_tokens=all(t == first for t in tokens.values()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = str(bench_model_path())
    info = bench_model_info(Path(model))
    vocab = info["vocab_size"]
    baseline = f"folovllm-stage{args.baseline_stage}"
    systems = [baseline, "folovllm-stage6"]
    shared = get_workload("shared_prefix", vocab_size=vocab, seed=0, quick=args.quick)
    mixed = get_workload("mixed", vocab_size=vocab, seed=0, quick=True, num_requests=4 if args.quick else 16)
    workloads = {
        "shared_prefix": (shared.summary(), lambda: one_batch(
            [r.prompt_token_ids for r in shared.requests], [r.max_tokens for r in shared.requests])),
        "multi_turn": (dict(num_chats=4, num_turns=2 if args.quick else 4, seed=0), lambda: multi_turn(
            4, 2 if args.quick else 4, vocab, seed=0)),
        "no_prefix": (mixed.summary(), lambda: one_batch(
            [r.prompt_token_ids for r in mixed.requests], [r.max_tokens for r in mixed.requests])),
    }
    results, loads = {}, []
    for name, (summary, make) in workloads.items():
        m = bench(model, systems, make, args.repeats)
        results[name] = dict(workload=summary, **m)
        loads += [x for row in m["systems"].values() for x in row["loadavg_1m"]]
        print(name, {k: f"{v['median_seconds']:.2f} s, TTFT {v['median_mean_ttft_s'] * 1e3:.0f} ms, "
                        f"computed {v['num_prompt_tokens_computed']}/{v['num_prompt_tokens']}"
                     for k, v in m["systems"].items()}, flush=True)
    return dict(model=info, baseline=baseline, workloads=results,
                peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    machine, base = result["machine"], result["baseline"]
    caption = (
        f"Stage 06 (prefix caching) against {base}, whole engine, bench model (Qwen3, 8 layers, "
        f"8/4 heads of 64, random weights), float32, greedy, every request submitted at once; "
        f"median of {result['repeats']} interleaved runs, each on a fresh engine: "
        f"`{result['command']}` on {machine_short(machine)}, {result['date'][:10]}."
        + shared_machine_note(result)
    )
    lines = [caption, "",
             "| workload | system | mean TTFT | × | wall (CPU) | × wall (CPU) | prompt tokens computed "
             "| hit rate | same tokens |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|:-:|"]
    for label, m in result["workloads"].items():
        rows = m["systems"]
        b = rows[base]
        for name, r in rows.items():
            lines.append(
                f"| {label} | {name} | {r['median_mean_ttft_s'] * 1e3:.0f} ms "
                f"| {b['median_mean_ttft_s'] / r['median_mean_ttft_s']:.2f} "
                f"| {r['median_seconds']:.2f} s ({r['median_cpu_seconds']:.2f} s) "
                f"| {b['median_seconds'] / r['median_seconds']:.2f} "
                f"({b['median_cpu_seconds'] / r['median_cpu_seconds']:.2f}) "
                f"| {r['num_prompt_tokens_computed']:,} of {r['num_prompt_tokens']:,} "
                f"| {100 * r['prefix_cache_hit_rate']:.1f} % | {'yes' if m['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline-stage", type=int, default=5, help="the stage to compare with")


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage06_prefix", __doc__, argv, run, render_markdown,
               name="stage06_prefix_cpu", options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
