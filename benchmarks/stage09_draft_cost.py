"""Where a draft-model speculative step spends its time (stage 09), on the trained pair, batch 1.

    python -m benchmarks.stage09_draft_cost                 # k = 4 on the completion workload
    python -m benchmarks.stage09_draft_cost --k 2 4 --workload editing
    python -m benchmarks.stage09_draft_cost --quick         # smoke run on a tiny pair

The target has 4.2M parameters: a forward pass of it, or of its 1-layer draft, is mostly the
host's work per layer (Python, dispatch, small kernels), not arithmetic. So a drafted token
costs a draft forward pass whose price is not a fraction of the target's in proportion to the
parameters, and the speed-up depends on what each pass costs. This splits the CPU time of the
steps (`time.process_time`, this process only: other jobs on a shared machine do not stretch
it) into

    draft prepare     the draft runner's input tensors and attention metadata, per pass
    draft forward     the draft model's layers, per pass
    draft LM head     its logits and the greedy argmax, per pass
    draft bookkeeping the proposer's own Python (rollback by longest common prefix, blocks, rows)
    target            the target's forward pass (a verify step: 1 + k tokens a row)
    sampler           the rejection sampler (or the plain sampler without speculation)
    rest              scheduler, update, outputs, stats: the engine's step minus the above

by wrapping those calls, for: `none` (no speculation), `draft-unpacked` (the draft's weights
left in the checkpoint's layout, as the proposer first loaded them: oneDNN then re-lays every
weight at every call), `draft-table` (packed as the target's are: per shape, the measured
table's pick of oneDNN or our decode kernel) and `draft` (the proposer as it is: every weight in
the decode kernel's panels, since every draft pass is a decode of a few rows). Every system
gives the same tokens (asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg, timed
from benchmarks.results import machine_short, shared_machine_note

SYSTEMS = ("none", "draft-unpacked", "draft-table", "draft")
PHASES = ("draft prepare", "draft forward", "draft LM head", "draft bookkeeping", "target", "sampler", "rest")


@contextlib.contextmanager
def draft_layout(system: str) -> Iterator[None]:
    """Inside: a draft model loads its weights as `system` says: "draft-unpacked" leaves them
    [out, in]; "draft-table" packs them as the target's are (the measured table's pick per
    shape); "draft" is the proposer as it is (every weight in the decode kernel's panels)."""
    from folovllm.model_executor.layers import cpu_gemm

    real = cpu_gemm.weight_packing
    if system == "draft-unpacked":
        cpu_gemm.weight_packing = lambda enabled, gemm=None: real(False)
    elif system == "draft-table":
        cpu_gemm.weight_packing = lambda enabled, gemm=None: real(enabled)
    try:
        yield
    finally:
        cpu_gemm.weight_packing = real


def _wrap(obj: Any, name: str, totals: dict[str, float], key: str) -> None:
    """Add the CPU seconds of every call of obj.name to totals[key] (an instance attribute)."""
    fn = getattr(obj, name)

    def timed_call(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.process_time() - start

    setattr(obj, name, timed_call)


def measure(system: str, target: Path, draft: Path, k: int, work: dict[str, Any],
            confidence: Optional[float] = None) -> dict[str, Any]:
    from folovllm import LLM, SamplingParams

    spec = None if system == "none" else {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k,
                                          "draft_confidence_threshold": confidence}
    with draft_layout(system):
        llm = LLM(str(target), dtype="float32", max_num_seqs=1, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=work["max_tokens"], ignore_eos=True, **work["params"])
    llm.generate([work["prompts"][0]], params, use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    totals: dict[str, float] = defaultdict(float)
    _wrap(engine, "step", totals, "step")
    _wrap(engine.model_executor, "execute_model", totals, "target")
    if spec is None:
        _wrap(engine, "sampler", totals, "sampler")
    else:
        _wrap(engine, "rejection_sampler", totals, "sampler")
        proposer = engine.drafter.proposer
        _wrap(proposer, "propose", totals, "propose")
        _wrap(proposer.runner.input_buffers, "prepare_inputs", totals, "draft prepare")
        _wrap(proposer.runner, "execute_model", totals, "draft pass")
        _wrap(proposer.model, "compute_logits", totals, "draft logits")
        passes0 = proposer.num_forward_passes
    engine.stats.__init__(bytes_per_token=engine.stats.bytes_per_token)

    def go() -> list[list[int]]:
        outs = []
        for p in work["prompts"]:  # batch 1: one request after another
            outs += [list(o.outputs[0].token_ids) for o in llm.generate([p], params, use_tqdm=False)]
        return outs

    t = timed(go)
    steps = engine.stats.num_forward_passes
    tokens = sum(len(x) for x in t.value)
    ms = {key: 1e3 * v / steps for key, v in totals.items()}
    phases = {p: 0.0 for p in PHASES}
    phases["target"], phases["sampler"] = ms["target"], ms["sampler"]
    passes = 0
    if spec is not None:
        passes = proposer.num_forward_passes - passes0
        phases["draft prepare"] = ms["draft prepare"]
        # the pass minus its inputs; the LM head's argmax (`.argmax().tolist()`) is in the pass's
        # remainder, counted with the LM head
        phases["draft LM head"] = ms["draft logits"]
        inside = ms["draft pass"] - ms["draft prepare"] - ms["draft logits"]
        phases["draft forward"] = inside
        phases["draft bookkeeping"] = ms["propose"] - ms["draft pass"]
        phases["rest"] = ms["step"] - ms["target"] - ms["sampler"] - ms["propose"]
    else:
        phases["rest"] = ms["step"] - ms["target"] - ms["sampler"]
    sd = engine.stats.spec_decoding if spec is not None else None
    return dict(system=system, tokens=t.value, num_output_tokens=tokens, steps=steps,
                cpu_seconds=t.cpu_seconds, wall_seconds=t.seconds, loadavg_1m=t.loadavg,
                cpu_ms_per_step=round(ms["step"], 3),
                phases_ms_per_step={p: round(v, 3) for p, v in phases.items()},
                draft_passes_per_step=round(passes / steps, 2),
                draft_ms_per_pass=round((ms.get("draft pass", 0.0) * steps / passes) if passes else 0.0, 3),
                tokens_per_step=round(tokens / steps, 3),
                output_tok_per_cpu_s=round(tokens / t.cpu_seconds, 1),
                acceptance_rate=(round(sd.num_accepted_tokens / sd.num_draft_tokens, 4)
                                 if sd is not None and sd.num_draft_tokens else None))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from transformers import AutoTokenizer

    from benchmarks.stage09_trained_pair import make_workload, pair_recipe
    from folovllm.tools.train_pair import TINY_RECIPE, train_pair

    if args.quick:
        target, draft = train_pair(Path(tempfile.mkdtemp(prefix="stage09_")) / "pair", TINY_RECIPE, progress=False)
        args.k, args.num_requests, args.max_tokens = [2], 2, 16
    else:
        target, draft = train_pair()
    if args.draft is not None:
        draft = args.draft
    recipe = pair_recipe(target.parent)
    tokenizer = AutoTokenizer.from_pretrained(target)
    work = make_workload(args.workload, args.num_requests, tokenizer, recipe, args.max_tokens)
    results, loads = [], []
    reference: Optional[list[list[int]]] = None
    for k in args.k:
        for system in ["none", *[s for s in args.systems if s != "none"]]:
            if system == "none" and results:
                continue
            r = measure(system, target, draft, k, work, args.draft_confidence)
            reference = reference or r["tokens"]
            assert r.pop("tokens") == reference, f"{system} k={k} gave other tokens than no speculation"
            r["k"] = 0 if system == "none" else k
            loads.append(r.pop("loadavg_1m"))
            results.append(r)
            print(f"{system} k={r['k']}: {r['cpu_ms_per_step']:.2f} ms CPU/step, {r['tokens_per_step']:.2f} "
                  f"tokens/step, {r['output_tok_per_cpu_s']:.0f} tok per CPU s, {r['phases_ms_per_step']}", flush=True)
    base = results[0]["output_tok_per_cpu_s"]
    for r in results:
        r["cpu_speedup"] = round(r["output_tok_per_cpu_s"] / base, 3)
    return dict(workload=args.workload, description=work["description"], num_requests=len(work["prompts"]),
                max_tokens=args.max_tokens, draft=str(draft), draft_confidence_threshold=args.draft_confidence,
                results=results, peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    rs = result["results"]
    label: Callable[[dict[str, Any]], str] = lambda r: r["system"] if not r["k"] else f"{r['system']} k={r['k']}"  # noqa: E731
    lines = [f"A draft-model speculative step by phase, trained pair, batch 1, {result['workload']} workload "
             f"({result['num_requests']} requests x {result['max_tokens']} tokens), float32, stage 06: CPU ms "
             f"per engine step (this process's `time.process_time`, so other jobs do not stretch it); "
             f"{machine_short(result['machine'])}." + shared_machine_note(result, cpu_ratios=False), "",
             "| CPU ms per step | " + " | ".join(label(r) for r in rs) + " |", "|:--|" + "--:|" * len(rs)]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{r['phases_ms_per_step'][phase]:.2f}" for r in rs) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['cpu_ms_per_step']:.2f}**" for r in rs) + " |")
    lines.append("| draft passes per step | " + " | ".join(f"{r['draft_passes_per_step']:.2f}" for r in rs) + " |")
    lines.append("| CPU ms per draft pass | " + " | ".join(
        f"{r['draft_ms_per_pass']:.3f}" if r["draft_ms_per_pass"] else "-" for r in rs) + " |")
    lines.append("| tokens per step | " + " | ".join(f"{r['tokens_per_step']:.2f}" for r in rs) + " |")
    lines.append("| acceptance | " + " | ".join(
        "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.1f} %" for r in rs) + " |")
    lines.append("| output tok per CPU second, × none | " + " | ".join(
        f"{r['output_tok_per_cpu_s']:.0f}, {r['cpu_speedup']:.2f}x" for r in rs) + " |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, nargs="+", default=[4])
    p.add_argument("--workload", default="completion", choices=("editing", "completion", "random"))
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--draft", type=Path, default=None, help="another draft folder (e.g. the distilled one)")
    p.add_argument("--draft-confidence", type=float, default=None, help="draft_confidence_threshold")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage09_draft_cost", __doc__, argv, run, render_markdown, repeats=1,
               name="stage09_draft_cost_cpu", options=add_options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
