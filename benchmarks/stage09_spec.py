"""Stage 09 on CPU: n-gram speculative decoding against the same engine without it, side by
side in one process, on one thread.

    python -m benchmarks.stage09_spec               # full run, a few minutes on one thread
    python -m benchmarks.stage09_spec --quick       # smoke run (small, printed, not written)

The bench model (`benchmarks.bench_model`: Qwen3 architecture, 8 layers, random weights),
float32, greedy, `ignore_eos`, stage 06 with its defaults; the systems differ only by
`speculative_config={"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": n}`
(n = 1, the default, and 2: a single repeated token is common in any text), and n = 1 with
`"disable_by_batch_size": 4` (no drafts while 4 or more requests run). Two workloads, each at
batch 1 and batch 8 (every request submitted at once):

    copy       a 64-token random block repeated 4 times (256 tokens), 128 output tokens: the
               prompt lookup finds what it needs in the prompt, if the model copies
    no_repeat  256 random tokens, 128 output tokens: the lookup finds little (cost of trying)

A random-weight model accepts drafts for the wrong reasons: it does not copy its prompt as a
trained model would; whatever it accepts comes from loops in its own greedy output. So a third
kind of system bounds what verification itself can give: `oracle k=5` drafts the true greedy
continuation (taken from the baseline's run), so every draft is accepted; it is not a proposer
anyone can have, it measures the engine's side of speculation (a 1 + k token step against k + 1
one-token steps). The acceptance counts are recorded beside the times, so read them together. A
fresh engine per run, warmed up on an unrelated prompt; `--repeats` runs with the systems
interleaved; medians. The systems must produce the same tokens (checked and recorded).

Writes `benchmarks/results/stage09_spec_cpu.json` (machine, commit, every repeat) and `.md`.
"""

from __future__ import annotations

import argparse
import random
from typing import Any, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import interleave, peak_loadavg, summarize, timed
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.workloads import FIRST_ORDINARY_TOKEN_ID

VOCAB = 512


def workload(name: str, batch: int, quick: bool, seed: int = 0) -> list[list[int]]:
    rng = random.Random(f"{name}-{batch}-{seed}")
    new = lambda n: [rng.randrange(FIRST_ORDINARY_TOKEN_ID, VOCAB) for _ in range(n)]  # noqa: E731
    block, repeats = (32, 2) if quick else (64, 4)
    if name == "copy":
        return [new(block) * repeats for _ in range(batch)]
    return [new(block * repeats) for _ in range(batch)]


class OracleProposer:
    """Drafts the known greedy continuation of each prompt (an upper bound, not a method)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations

    def propose(self, requests: Any, max_drafts: Any) -> list[list[int]]:
        return [self.continuations.get(tuple(r.prompt_token_ids), [])[r.num_output_tokens : r.num_output_tokens + m]
                for r, m in zip(requests, max_drafts)]

    def free(self, request_id: str) -> None:
        pass


def build(model: str, k: int, oracle: Optional[dict] = None, lookup_min: int = 1,
          disable_by_batch_size: Optional[int] = None) -> Any:
    from folovllm import LLM, SamplingParams

    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lookup_min,
            "disable_by_batch_size": disable_by_batch_size} if k else None
    llm = LLM(model, stage=6, max_model_len=2048, speculative_config=spec)
    if oracle is not None:
        llm.llm_engine.drafter.proposer = OracleProposer(oracle)
    warm = workload("warm", 1, True, seed=12345)
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.stats.__init__(bytes_per_token=llm.stats.bytes_per_token)
    return llm


def measure(model: str, k: int, prompts: list[list[int]], max_tokens: int,
            oracle: Optional[dict] = None, lookup_min: int = 1,
            disable_by_batch_size: Optional[int] = None) -> dict[str, Any]:
    from folovllm import SamplingParams

    llm = build(model, k, oracle, lookup_min, disable_by_batch_size)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = timed(lambda: [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)])
    s = llm.stats
    return dict(timing=t, num_forward_passes=s.num_forward_passes, num_generated_tokens=s.num_generated_tokens,
                num_draft_tokens=s.spec_decoding.num_draft_tokens,
                num_accepted_tokens=s.spec_decoding.num_accepted_tokens,
                acceptance_rate=round(s.spec_decoding.acceptance_rate, 4),
                mean_accepted_length=round(s.spec_decoding.mean_accepted_length, 4))


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, nargs="*", default=[3], help="num_speculative_tokens to run (default 3)")
    p.add_argument("--lookup-min", type=int, nargs="*", default=[1, 2],
                   help="prompt_lookup_min values to run (default 1 2; prompt_lookup_max stays 4)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--disable-by-batch-size", type=int, nargs="*", default=[4], metavar="N",
                   help="also run n=1 with speculative_config.disable_by_batch_size=N: no drafts "
                        "while N or more requests run (default 4; none: leave it out)")
    p.add_argument("--workloads", nargs="*", default=["copy", "no_repeat"], choices=["copy", "no_repeat"])
    p.add_argument("--no-oracle", action="store_true", help="leave out the oracle upper bound")


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = str(bench_model_path())
    max_tokens = 32 if args.quick else 128
    systems = {"stage 06": (0, 1, None), **{f"stage 06 + ngram k={k} n={lo}..4": (k, lo, None)
                                            for k in args.k for lo in args.lookup_min},
               **{f"stage 06 + ngram k={k} n=1..4, off from batch {n}": (k, 1, n)
                  for k in args.k for n in args.disable_by_batch_size}}
    cases, loads = [], []
    for name in args.workloads:
        for batch in args.batches:
            prompts = workload(name, batch, args.quick)
            trials = {s: (lambda k=k, lo=lo, n=n: measure(model, k, prompts, max_tokens, lookup_min=lo,
                                                          disable_by_batch_size=n))
                      for s, (k, lo, n) in systems.items()}
            if name == "copy" and not args.no_oracle:  # the oracle needs the continuation: one untimed baseline run
                answers = measure(model, 0, prompts, max_tokens)["timing"].value
                oracle = {tuple(p): a for p, a in zip(prompts, answers)}
                trials["oracle k=5 (upper bound)"] = lambda: measure(model, 5, prompts, max_tokens, oracle)
            runs = interleave(trials, args.repeats)
            rows, tokens = {}, {}
            for system, rs in runs.items():
                tokens[system] = rs[0]["timing"].value
                counts = {key: v for key, v in rs[0].items() if key != "timing"}
                summary = summarize([r["timing"] for r in rs])
                loads += summary["loadavg_1m"]
                rows[system] = dict(**summary, **counts,
                                    median_output_tok_s=round(batch * max_tokens / summary["median_seconds"], 2))
            first = next(iter(tokens.values()))
            base, base_cpu = rows["stage 06"]["median_seconds"], rows["stage 06"]["median_cpu_seconds"]
            for row in rows.values():
                row["speedup"] = round(base / row["median_seconds"], 3)
                row["cpu_speedup"] = round(base_cpu / row["median_cpu_seconds"], 3)
            cases.append(dict(workload=name, batch=batch, max_tokens=max_tokens, systems=rows,
                              same_tokens=all(t == first for t in tokens.values())))
    return dict(model=bench_model_info(model), cases=cases, peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    lines = [f"Stage 09, n-gram speculation vs none: bench model (random weights), stage 06, greedy, "
             f"{machine_short(result['machine'])}; medians of {result['repeats']} interleaved runs."
             + shared_machine_note(result), "",
             "| workload | batch | system | output tok/s | speedup (CPU time) | forward passes | drafts accepted / verified | mean accepted length | same tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case in result["cases"]:
        for system, row in case["systems"].items():
            drafts = f"{row['num_accepted_tokens']} / {row['num_draft_tokens']}" if row["num_draft_tokens"] else "-"
            mal = f"{row['mean_accepted_length']:.2f}" if row["num_draft_tokens"] else "-"
            lines.append(f"| {case['workload']} | {case['batch']} | {system} | {row['median_output_tok_s']:.0f} | "
                         f"{row['speedup']:.2f}x ({row['cpu_speedup']:.2f}x) | {row['num_forward_passes']} | {drafts} | {mal} | "
                         f"{'yes' if case['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage09_spec", __doc__, argv, run, render_markdown, name="stage09_spec_cpu",
               options=add_options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
