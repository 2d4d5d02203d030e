"""Where a speculative step's time goes (stage 09): a plain decode step against an n-gram
speculative step, by phase, on the trained pair's workloads, batch 1, greedy, k = 4.

    python -m benchmarks.stage09_step_phases                       # editing and random, none and ngram
    python -m benchmarks.stage09_step_phases --pair /tmp/pair      # another pair folder
    python -m benchmarks.stage09_step_phases --quick               # smoke run, printed only

Why: on the trained pair (a 4.2M-parameter target) a decode step is 1.4-1.8 ms, most of it
the host's work, so what speculation adds to a step on the host decides whether it pays. The
phases are those of `profile_step --host` (`host_phases.py`: exclusive CPU time of the
engine's parts, wrapped for the run only) plus speculation's own::

    propose      Drafter.propose                 the n-gram lookup (or the draft model), between steps
    verify       RejectionSampler.__call__       which drafts the target keeps
    sampler      Sampler.__call__                the plain sampler (a step without drafts)
    attention    the Attention layers' forwards  (not host) a verify row takes the prefill kernel
    forward      the rest of the model's forward and the LM head (not host)

Each workload is generated one request at a time (batch 1) by each system, once untimed and
once with the phase clocks; every decode step is put in one of three classes by what it
verified: `plain` (a step of the system without speculation), `no drafts` (the speculative
system's steps where the proposer found nothing: they should cost what a plain step costs) and
`drafts` (the steps that verified drafts). Means per step of each class (the output tok/s
follow from the means, not the medians); the last rows give the steps of each class, the
tokens they committed, and the cost per output token against plain's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from benchmarks.cli import bench_main
from benchmarks.harness import loadavg
from benchmarks.host_phases import PhaseClock, phase_spans

PHASES = ("schedule", "input_batch", "prepare_inputs", "metadata", "runner_other", "sample", "sampler",
          "verify", "update", "output", "stats", "propose", "other")
DEVICE_PHASES = ("attention", "forward")
CLASSES = ("plain", "no drafts", "drafts")


def pair_folder(args: argparse.Namespace) -> Path:
    """The trained pair (built once, `folovllm train-pair`), `--pair`, or with --quick a tiny one."""
    import tempfile

    from folovllm.tools.train_pair import TINY_RECIPE, default_pair_dir, train_pair

    if args.pair is not None:
        return args.pair
    if args.quick:
        out = Path(tempfile.mkdtemp(prefix="stage09_phases_")) / "pair"
        train_pair(out, TINY_RECIPE)
        return out
    train_pair()
    return default_pair_dir()


def measure_system(target: Path, spec: Optional[dict[str, Any]], work: dict[str, Any]) -> dict[str, Any]:
    """One engine generates the workload (batch 1) once untimed, once under the phase clocks ->
    CPU ms per decode step by phase, for each class of step, and the tokens it gave."""
    from benchmarks.stage09_trained_pair import build
    from folovllm import SamplingParams

    llm = build(target, spec, 1)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=work["max_tokens"], ignore_eos=True, **work["params"])
    generate = lambda: [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)  # noqa: E731
                        for p in work["prompts"]]
    generate()  # untimed: every path warm
    clock = PhaseClock()
    ns: dict[str, dict[str, int]] = {c: defaultdict(int) for c in CLASSES}
    steps: dict[str, int] = defaultdict(int)
    committed: dict[str, int] = defaultdict(int)
    step = engine.step

    def clocked_step() -> Any:
        clock.enter("other")
        outputs = step()
        clock.leave()
        record = engine.last_scheduler_stats
        taken = clock.take()
        if record is None or record.num_prefill_tokens:  # a prompt step: not a decode step
            return outputs
        kind = "plain" if spec is None else ("drafts" if record.spec_decoding_stats.num_drafts else "no drafts")
        steps[kind] += 1
        committed[kind] += record.num_generated_tokens
        for phase, t in taken.items():
            ns[kind][phase] += t
        return outputs

    # Sampler and RejectionSampler are called (`self.sampler(...)`): their __call__ is looked up
    # on the class, so the engine's attributes are swapped for wrapped callables while measuring.
    saved = {name: getattr(engine, name) for name in ("sampler", "rejection_sampler")}
    engine.drafter.propose = clock.wrap(engine.drafter.propose, "propose")  # type: ignore[method-assign]
    engine.sampler = clock.wrap(saved["sampler"], "sampler")
    engine.rejection_sampler = clock.wrap(saved["rejection_sampler"], "verify")
    engine.step = clocked_step  # type: ignore[method-assign]
    attention = _attention_hooks(engine.model_runner.model, clock)
    try:
        with phase_spans(engine, clock):
            tokens = generate()
    finally:
        del engine.step, engine.drafter.propose
        engine.sampler, engine.rejection_sampler = saved["sampler"], saved["rejection_sampler"]
        for h in attention:
            h.remove()
    per_class = {}
    for kind in CLASSES:
        if not steps[kind]:
            continue
        n = steps[kind]
        phases = {p: round(ns[kind].get(p, 0) / n / 1e6, 4) for p in (*PHASES, *DEVICE_PHASES)}
        host = sum(phases[p] for p in PHASES)
        per_class[kind] = dict(steps=n, tokens=committed[kind], phases_ms=phases, host_ms=round(host, 4),
                               step_ms=round(host + sum(phases[p] for p in DEVICE_PHASES), 4))
    return dict(tokens=tokens, classes=per_class, loadavg=loadavg())


def _attention_hooks(model: Any, clock: PhaseClock) -> list[Any]:
    """The Attention layers' forwards as the `attention` phase (inside `forward`)."""
    from folovllm.model_executor.layers.attention import Attention

    handles = []
    for m in model.modules():
        if isinstance(m, Attention):
            handles += [m.register_forward_pre_hook(lambda module, args: clock.enter("attention")),
                        m.register_forward_hook(lambda module, args, output: clock.leave())]
    return handles


def run(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from transformers import AutoTokenizer

    from benchmarks.stage09_trained_pair import make_workload, pair_recipe, spec_dict

    pair = pair_folder(args)
    target = pair / "target"
    tokenizer = AutoTokenizer.from_pretrained(target)
    recipe = pair_recipe(pair)
    num, max_tokens = (2, 16) if args.quick else (args.num_requests, args.max_tokens)
    results = {}
    for wname in args.workloads:
        work = make_workload(wname, num, tokenizer, recipe, max_tokens, seed=0)
        systems = {}
        for system in ("none", "ngram"):
            start = time.process_time()
            systems[system] = measure_system(target, spec_dict(system, args.k, {}), work)
            print(f"{wname} {system}: {time.process_time() - start:.1f} s CPU, "
                  + ", ".join(f"{c} {r['steps']} steps {r['step_ms']:.3f} ms (host {r['host_ms']:.3f})"
                              for c, r in systems[system]["classes"].items()), flush=True)
        assert systems["ngram"]["tokens"] == systems["none"]["tokens"], "n-gram changed a greedy token"
        for s in systems.values():
            del s["tokens"]
        results[wname] = dict(description=work["description"], num_requests=len(work["prompts"]),
                              max_tokens=max_tokens, params=work["params"], systems=systems)
    pair_info = json.loads((pair / "train_pair.json").read_text())
    return dict(pair={k: v for k, v in pair_info.items() if k != "stamp"}, k=args.k, results=results)


def render_markdown(result: dict[str, Any]) -> str:
    from benchmarks.results import machine_short

    loads = [s["loadavg"] for w in result["results"].values() for s in w["systems"].values()]
    lines = [f"A decode step by phase, plain against n-gram speculation (k = {result['k']}, min 1, max 4), "
             f"trained pair, batch 1, greedy, float32, stage 06: CPU ms per decode step (means; this "
             f"process's CPU time, exclusive per phase), `{result['command']}` on "
             f"{machine_short(result['machine'])}, {result['date'][:10]}, commit {result['git_commit'][:12]}; "
             f"1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 cores.", ""]
    for wname, w in result["results"].items():
        cols = [(s, c, r) for s, sr in w["systems"].items() for c, r in sr["classes"].items()]
        lines += [f"**{wname}** ({w['description']}; {w['num_requests']} requests x {w['max_tokens']} tokens"
                  + (f", {w['params']}" if w["params"] else "") + ")", "",
                  "| CPU ms per decode step | " + " | ".join(f"{s}: {c}" for s, c, _ in cols) + " |",
                  "|:--|" + "--:|" * len(cols)]
        for phase in (*PHASES, *DEVICE_PHASES):
            lines.append(f"| {phase} | " + " | ".join(f"{r['phases_ms'][phase]:.3f}" for _, _, r in cols) + " |")
        lines.append("| **host (step minus model)** | " + " | ".join(f"**{r['host_ms']:.3f}**" for _, _, r in cols) + " |")
        lines.append("| **step** | " + " | ".join(f"**{r['step_ms']:.3f}**" for _, _, r in cols) + " |")
        lines.append("| steps | " + " | ".join(f"{r['steps']}" for _, _, r in cols) + " |")
        lines.append("| tokens per step | " + " | ".join(f"{r['tokens'] / r['steps']:.2f}" for _, _, r in cols) + " |")
        base = next(r["step_ms"] for s, c, r in cols if c == "plain")
        lines.append("| step cost × plain | " + " | ".join(f"{r['step_ms'] / base:.2f}" for _, _, r in cols) + " |")
        spec = w["systems"]["ngram"]["classes"]
        total_ms = sum(r["step_ms"] * r["steps"] for r in spec.values())
        total_tok = sum(r["tokens"] for r in spec.values())
        plain = w["systems"]["none"]["classes"]["plain"]
        lines += ["", f"n-gram over all its decode steps: {total_tok / max(1, sum(r['steps'] for r in spec.values())):.2f} "
                  f"tokens per step, **{(plain['step_ms'] / (plain['tokens'] / plain['steps'])) / (total_ms / total_tok):.2f}x** "
                  "plain's decode tokens per CPU second (the phase clocks' own cost included in both).", ""]
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", nargs="*", default=["editing", "random"],
                   choices=["editing", "completion", "random"])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--pair", type=Path, default=None, help="a pair folder (target/, draft/, train_pair.json)")


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage09_step_phases", __doc__, argv, run, render_markdown, repeats=1,
               name="stage09_step_phases_cpu", options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
