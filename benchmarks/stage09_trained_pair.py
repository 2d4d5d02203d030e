"""Stage 09 on CPU: speculative decoding (n-gram and draft model) against no speculation, on
the trained target/draft pair (`folovllm train-pair`), side by side in one process, one thread.

    python -m benchmarks.stage09_trained_pair                 # full run (builds the pair once if missing)
    python -m benchmarks.stage09_trained_pair --quick         # smoke run on a tiny pair, printed only
    python -m benchmarks.stage09_trained_pair --systems none  # only the baseline (no speculation)

Why a trained pair: random weights accept drafts for the wrong reasons (a random model repeats
a few tokens, which n-gram lookup then "predicts"; a random draft never agrees with a random
target). The pair learned the standard library's sources; the prompts come from its *held-out*
files (never trained on), tokenized with its tokenizer.

Three workloads, greedy, `ignore_eos`, a fixed `max_tokens`; at batch 1 (the requests one
after another) and batch 8 (eight at once):

    editing     copy-heavy: the prompt holds a held-out function (40..110 tokens, so prompt
                and output stay within the 256 positions the pair was trained on), a comment asking for it
                again, and its `def` line; the target goes on to rewrite it (its own greedy
                output is the reference every system must reproduce): n-gram's case
    completion  the first lines of a held-out function; the target completes it: the draft
                model's case (nothing to copy but the draft knows the language)
    random      prompts of random token ids, so nothing in the context can be looked up; a
                repetition penalty keeps the output from looping (what costs nothing must
                cost nothing)

Systems: `none` (stage 06, no speculation), `ngram` (prompt lookup, min 1 max 4), `draft` (the
1-layer draft), each with `--k` drafts per step; then a sweep of k = 1..5 for both on one
workload, drawn as a plot (output tok/s and acceptance against k). Every system must give the
same tokens as `none` (asserted). The acceptance rate is accepted / drafted tokens; the mean
accepted length is accepted tokens per drafting step of a request; both come from the engine's
speculative-decoding counters (`llm.stats`), and tokens per target decode row-step (1 + the
mean accepted length when every step drafts) from the counters every stage has.

Writes `benchmarks/results/stage09_trained_pair_cpu.json` and `.md`, and `docs/assets/stage09_trained_pair_k_sweep.png`.
The speculative systems need stage 09's `LLM(..., speculative_config=...)`; where this build
has none, they are recorded as unavailable and only `none` runs.
"""

from __future__ import annotations

import argparse
import ast
import random
import statistics
from pathlib import Path
from typing import Any, Optional

from benchmarks.cli import bench_main
from benchmarks.harness import interleave, peak_loadavg, summarize, timed
from benchmarks.results import ASSETS_DIR, machine_short, shared_machine_note

SYSTEMS = ("none", "ngram", "draft", "distilled")
WORKLOADS = ("editing", "completion", "random")
# each proposer's k sweep on its own case (systems on one workload share the baseline)
SWEEP = {"ngram": "editing", "draft": "completion", "distilled": "completion"}
DRAFTS = ("draft", "distilled")  # the systems that run a draft model


def pair_recipe(pair_dir: Path) -> Any:
    """The `TrainRecipe` a pair folder was built with (its train_pair.json): its held-out split."""
    import json

    from folovllm.tools.train_pair import ModelShape, TrainRecipe

    fields = dict(json.loads((pair_dir / "train_pair.json").read_text())["stamp"]["recipe"])
    return TrainRecipe(**{**fields, "target": ModelShape(**fields["target"]), "draft": ModelShape(**fields["draft"])})


# -- workloads ---------------------------------------------------------------------------------


def held_out_functions(recipe: Any, tokenizer: Any, lo: int, hi: int) -> list[str]:
    """Source of every function (or method) in the pair's held-out files whose length is
    lo..hi tokens, in file order: the same list on every run of one Python version."""
    from folovllm.tools.train_pair import split_corpus, stdlib_files

    _, held = split_corpus(stdlib_files(recipe.max_files), recipe.held_out_every)
    found = []
    for text in held:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                body = lines[node.lineno - 1 : node.end_lineno]
                indent = len(body[0]) - len(body[0].lstrip())
                src = "\n".join(line[indent:] for line in body)  # dedented: a method reads as a function
                if lo <= len(tokenizer.encode(src, add_special_tokens=False)) <= hi:
                    found.append(src)
    return found


def make_workload(name: str, num: int, tokenizer: Any, recipe: Any, max_tokens: int,
                  seed: int = 0) -> dict[str, Any]:
    """-> {prompts: token ids, max_tokens, params: SamplingParams kwargs, description}."""
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    rng = random.Random(seed)
    if name == "editing":
        funcs = held_out_functions(recipe, tokenizer, 40, 110)
        picks = rng.sample(funcs, min(num, len(funcs)))
        prompts = [encode(f"{f}\n\n\n# The same function again, rewritten:\n{f.splitlines()[0]}\n")
                   for f in picks]
        params: dict[str, Any] = {}
        desc = "a held-out function, then its def line again: the target rewrites it"
    elif name == "completion":
        funcs = held_out_functions(recipe, tokenizer, 40, 110)
        picks = rng.sample(funcs, min(num, len(funcs)))
        prompts = [encode("\n".join(f.splitlines()[: max(2, len(f.splitlines()) // 3)]) + "\n")
                   for f in picks]
        params = {}
        desc = "the first third of a held-out function's lines: the target completes it"
    elif name == "random":
        vocab = len(tokenizer)
        prompts = [[rng.randrange(1, vocab) for _ in range(64)] for _ in range(num)]
        params = {"repetition_penalty": 1.3}
        desc = "64 random token ids, repetition_penalty 1.3: nothing to look up"
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    if not prompts:
        raise ValueError(f"no held-out function fits the {name} workload on this Python")
    return dict(prompts=prompts, max_tokens=max_tokens, params=params, description=desc,
                prompt_tokens=[len(p) for p in prompts])


# -- systems -----------------------------------------------------------------------------------


def spec_dict(system: str, k: int, drafts: dict[str, Path],
              confidence: Optional[float] = None, lookup_min: int = 1) -> Optional[dict[str, Any]]:
    """The speculative_config of a system; `drafts` maps "draft" / "distilled" to their folders;
    `lookup_min` is n-gram's shortest suffix looked up (1: a single repeated token proposes)."""
    if system == "none":
        return None
    if system == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lookup_min,
                "prompt_lookup_max": max(4, lookup_min)}
    if system in DRAFTS:
        spec = {"method": "draft_model", "model": str(drafts[system]), "num_speculative_tokens": k}
        if confidence is not None:
            spec["draft_confidence_threshold"] = confidence
        return spec
    raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")


def build(target: Path, spec: Optional[dict[str, Any]], batch: int) -> Any:
    """A fresh engine (stage 06, float32), warmed up on one short request."""
    from folovllm import LLM, SamplingParams

    extra = {} if spec is None else {"speculative_config": spec}
    llm = LLM(str(target), dtype="float32", max_num_seqs=batch, **extra)  # max_model_len: the model's
    llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.stats.__init__(bytes_per_token=llm.stats.bytes_per_token)
    return llm


def available(target: Path, spec: Optional[dict[str, Any]]) -> Optional[str]:
    """None if this build runs `spec`, else why not (stage 09 not merged yet, say)."""
    try:
        build(target, spec, 1)
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def spec_counters(stats: Any) -> dict[str, Any]:
    """The engine's speculative-decoding counters, by vLLM's names (`EngineStats.spec_decoding`,
    a `SpecDecodingStats`, on main); {} when there are none."""
    d = stats.as_dict()
    src = next((d[k] for k in ("spec_decoding", "spec_decode") if isinstance(d.get(k), dict)), d)
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")
    return {n: src[n] for n in names if n in src}


def run_once(llm: Any, work: dict[str, Any], batch: int) -> dict[str, Any]:
    """Generate the workload (in groups of `batch` submitted together), timed."""
    from folovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=work["max_tokens"], ignore_eos=True, **work["params"])
    prompts = work["prompts"]

    def go() -> list[list[int]]:
        out = []
        for i in range(0, len(prompts), batch):
            outs = llm.generate(prompts[i : i + batch], params, use_tqdm=False)
            out += [list(o.outputs[0].token_ids) for o in outs]
        return out

    llm.llm_engine.stats.__init__(bytes_per_token=llm.stats.bytes_per_token)
    t = timed(go)
    s = llm.stats
    return dict(timing=t, tokens=t.value, num_output_tokens=sum(len(x) for x in t.value),
                num_forward_passes=s.num_forward_passes, num_decode_row_steps=s.num_decode_row_steps,
                spec=spec_counters(s))


def measure(target: Path, drafts: dict[str, Path], systems: list[str], k: int, work: dict[str, Any], batch: int,
            repeats: int, draft_k: Optional[int] = None, confidence: Optional[float] = None,
            lookup_min: int = 1) -> dict[str, Any]:
    """Every system on one workload at one batch size, interleaved; medians and ratios (of wall
    time, and of this process's CPU time: other jobs on a shared machine do not stretch it).
    The draft-model systems draft `draft_k` tokens a step (default k)."""
    llms = {name: build(target, spec_dict(name, (draft_k or k) if name in DRAFTS else k, drafts, confidence,
                                          lookup_min), batch)
            for name in systems}
    runs = interleave({n: (lambda n=n: run_once(llms[n], work, batch)) for n in systems}, repeats)
    rows, reference = {}, runs[systems[0]][0]["tokens"]
    for name, rs in runs.items():
        for r in rs:
            assert r["tokens"] == reference, f"{name} gave other tokens than {systems[0]} (greedy)"
        r0 = rs[0]
        tok_s = [r["num_output_tokens"] / r["timing"].seconds for r in rs]
        cpu_tok_s = [r["num_output_tokens"] / r["timing"].cpu_seconds for r in rs]
        row = dict(**summarize([r["timing"] for r in rs]), output_tok_s=[round(x, 1) for x in tok_s],
                   median_output_tok_s=round(statistics.median(tok_s), 1),
                   median_output_tok_per_cpu_s=round(statistics.median(cpu_tok_s), 1),
                   num_output_tokens=r0["num_output_tokens"], num_forward_passes=r0["num_forward_passes"],
                   num_decode_row_steps=r0["num_decode_row_steps"], spec=r0["spec"])
        # Tokens per decode row-step: each request's first token comes from its prefill.
        decoded = r0["num_output_tokens"] - len(work["prompts"])
        row["tokens_per_row_step"] = round(decoded / max(1, r0["num_decode_row_steps"]), 3)
        sp = r0["spec"]
        if sp.get("num_draft_tokens"):
            row["acceptance_rate"] = round(sp["num_accepted_tokens"] / sp["num_draft_tokens"], 4)
        if sp.get("num_drafts"):
            row["mean_accepted_length"] = round(sp["num_accepted_tokens"] / sp["num_drafts"], 3)
        rows[name] = row
    base = rows[systems[0]]["median_output_tok_s"]
    cpu_base = rows[systems[0]]["median_output_tok_per_cpu_s"]
    for row in rows.values():
        row["speedup"] = round(row["median_output_tok_s"] / base, 3)
        row["cpu_speedup"] = round(row["median_output_tok_per_cpu_s"] / cpu_base, 3)
    return rows


# -- the draft model's acceptance, offline ------------------------------------------------------


def simulate_draft_acceptance(target: Path, draft: Path, work: dict[str, Any], reference: list[list[int]],
                              k: int) -> dict[str, Any]:
    """What greedy speculative decoding with the draft model would accept, without the engine:
    walk each request through the target's greedy tokens (the output every system must give);
    at each step the proposer drafts k tokens from the committed context, the accepted ones are
    the prefix that equals the reference, then the target's own token is committed too (the
    correction, or the bonus token when all k were accepted). It exercises the proposer's
    rollback exactly as the engine would, one request at a time."""
    from folovllm.config import EngineConfig
    from folovllm.core.request import Request
    from folovllm.sampling_params import SamplingParams
    from folovllm.spec_decode.config import SpeculativeConfig
    from folovllm.spec_decode.draft_model import DraftModelProposer

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(target).vocab_size
    spec = SpeculativeConfig(method="draft_model", num_speculative_tokens=k, model=str(draft))
    proposer = DraftModelProposer(spec, EngineConfig.for_stage(6, dtype="float32"), vocab)
    drafted = accepted = steps = 0
    per_pos = [0] * k
    seconds = 0.0
    for i, (prompt, ref) in enumerate(zip(work["prompts"], reference)):
        req = Request(f"sim{i}", prompt, SamplingParams(temperature=0), arrival_time=0.0)
        req.append_output_token(ref[0])  # the first token comes from the target's prefill
        t = 1
        while t < len(ref):
            want = min(k, len(ref) - t - 1)  # the engine drafts no token past max_tokens
            t0 = timed(lambda: proposer.propose([req], [want])[0])
            d, seconds = t0.value, seconds + t0.seconds
            n = 0
            while n < len(d) and d[n] == ref[t + n]:
                per_pos[n] += 1
                n += 1
            drafted, accepted, steps = drafted + len(d), accepted + n, steps + (1 if d else 0)
            for tok in ref[t : t + n + 1]:  # accepted drafts, then the target's own token
                req.append_output_token(tok)
            t += n + 1
        proposer.free(req.request_id)
    return dict(k=k, num_drafts=steps, num_draft_tokens=drafted, num_accepted_tokens=accepted,
                num_accepted_tokens_per_pos=per_pos,
                acceptance_rate=round(accepted / max(1, drafted), 4),
                mean_accepted_length=round(accepted / max(1, steps), 3),
                draft_tokens_computed=proposer.num_computed_tokens,
                draft_forward_passes=proposer.num_forward_passes,
                draft_ms_per_step=round(1e3 * seconds / max(1, steps), 3))


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import json
    import tempfile

    from folovllm.tools.train_pair import TINY_DISTILL, TINY_RECIPE, DistillRecipe, TrainRecipe, distill_draft, train_pair

    recipe = TINY_RECIPE if args.quick else TrainRecipe()
    if args.pair is not None:  # a pair built earlier (another recipe): its own held-out split
        target, draft = args.pair / "target", args.pair / "draft"
        pair = json.loads((args.pair / "train_pair.json").read_text())
        recipe = pair_recipe(args.pair)
    else:
        out = Path(tempfile.mkdtemp(prefix="stage09_")) / "pair" if args.quick else None
        target, draft = train_pair(out, recipe)
        pair = json.loads((target.parent / "train_pair.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    num, max_tokens = (2, 16) if args.quick else (args.num_requests, args.max_tokens)
    drafts = {"draft": draft}
    distilled: dict[str, Any] = {}
    if "distilled" in args.systems:  # the draft distilled from the target (built once, minutes)
        drafts["distilled"] = distill_draft(target.parent, TINY_DISTILL if args.quick else DistillRecipe())
        distilled = {k: v for k, v in json.loads((drafts["distilled"] / "distill.json").read_text()).items()
                     if k != "stamp"}
    dk, conf = args.draft_k, args.draft_confidence
    systems, unavailable = ["none"], {}
    for name in args.systems:
        if name == "none":
            continue
        why = available(target, spec_dict(name, args.k, drafts))
        if why is None:
            systems.append(name)
        else:
            unavailable[name] = why
            print(f"{name}: not available in this build ({why})", flush=True)
    results, loads = {}, []
    for wname in args.workloads:
        for batch in args.batch_sizes:
            work = make_workload(wname, max(num, batch), tokenizer, recipe, max_tokens, seed=0)
            rows = measure(target, drafts, systems, args.k, work, batch, args.repeats, dk, conf,
                           args.prompt_lookup_min)
            results[f"{wname}/batch{batch}"] = dict(
                workload=wname, batch=batch, description=work["description"],
                num_requests=len(work["prompts"]), prompt_tokens=work["prompt_tokens"],
                max_tokens=max_tokens, params=work["params"], systems=rows)
            loads += [x for r in rows.values() for x in r["loadavg_1m"]]
            print(f"{wname} batch {batch}: " + ", ".join(
                f"{n} {r['median_output_tok_s']:.0f} tok/s ({r['speedup']:.2f}x"
                + (f", accept {r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "") + ")"
                for n, r in rows.items()), flush=True)
    offline: dict[str, Any] = {}
    if "draft" in args.systems and args.offline:  # the draft's acceptance without stage 09's engine
        for wname in args.workloads:
            work = make_workload(wname, num, tokenizer, recipe, max_tokens, seed=0)
            llm = build(target, None, 1)
            reference = run_once(llm, work, len(work["prompts"]))["tokens"]
            offline[wname] = [simulate_draft_acceptance(target, draft, work, reference, k)
                              for k in range(1, 6)]
            print(f"draft acceptance offline, {wname}: " + ", ".join(
                f"k={o['k']} {o['acceptance_rate']:.2f}/{o['mean_accepted_length']:.2f}" for o in offline[wname]),
                flush=True)
    sweep: dict[str, Any] = {}
    for wname in dict.fromkeys(SWEEP.values()):  # per workload: its systems beside one baseline
        names = [s for s in SWEEP if SWEEP[s] == wname and s in systems and not args.no_sweep]
        if not names:
            continue
        work = make_workload(wname, num, tokenizer, recipe, max_tokens, seed=0)
        points: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        bases = []
        for k in range(1, 6):
            rows = measure(target, drafts, ["none", *names], k, work, 1, args.repeats, k, conf)
            bases.append(rows["none"]["median_output_tok_s"])
            for name in names:
                row = rows[name]
                points[name].append(dict(k=k, median_output_tok_s=row["median_output_tok_s"], speedup=row["speedup"],
                                         cpu_speedup=row["cpu_speedup"], acceptance_rate=row.get("acceptance_rate"),
                                         mean_accepted_length=row.get("mean_accepted_length")))
                print(f"sweep {name} k={k}: {points[name][-1]}", flush=True)
            loads += [x for r in rows.values() for x in r["loadavg_1m"]]
        for name in names:
            sweep[name] = dict(workload=wname, batch=1, baseline_tok_s=round(statistics.median(bases), 1),
                               points=points[name])
    batch_sweep: dict[str, Any] = {}
    if args.batch_sweep:  # where speculation stops paying: one workload, growing batches
        wname = args.batch_sweep_workload
        for batch in args.batch_sweep:
            work = make_workload(wname, max(num, batch), tokenizer, recipe, max_tokens, seed=0)
            rows = measure(target, drafts, systems, args.k, work, batch, args.repeats, dk, conf,
                           args.prompt_lookup_min)
            batch_sweep[str(batch)] = {n: {key: r.get(key) for key in (
                "median_output_tok_s", "speedup", "cpu_speedup", "acceptance_rate", "mean_accepted_length",
                "tokens_per_row_step")} for n, r in rows.items()}
            loads += [x for r in rows.values() for x in r["loadavg_1m"]]
            print(f"batch sweep {wname} batch {batch}: " + ", ".join(
                f"{n} {r['speedup']:.2f}x (CPU {r['cpu_speedup']:.2f}x)" for n, r in rows.items()), flush=True)
    return dict(pair={k: v for k, v in pair.items() if k != "stamp"}, recipe=pair["stamp"]["recipe"],
                k=args.k, draft_k=dk or args.k, draft_confidence_threshold=conf, distilled=distilled,
                systems=systems, unavailable=unavailable, results=results, sweep=sweep,
                batch_sweep=dict(workload=args.batch_sweep_workload, batches=batch_sweep) if batch_sweep else {},
                draft_acceptance_offline=offline,
                peak_loadavg_1m=peak_loadavg(loads))


def render_markdown(result: dict[str, Any]) -> str:
    pair = result["pair"]
    caption = (
        f"Stage 09 speculative decoding (k = {result['k']}) against no speculation, on the trained "
        f"pair (target {pair['target']['parameters'] / 1e6:.1f}M parameters, held-out perplexity "
        f"{pair['target']['held_out_perplexity']:.2f}; draft {pair['draft']['parameters'] / 1e6:.2f}M, "
        f"{pair['draft']['held_out_perplexity']:.2f}), float32, greedy, ignore_eos, stage 06 engine; "
        f"median of {result['repeats']} interleaved runs: `{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}." + shared_machine_note(result)
    )
    dk, conf = result.get("draft_k", result["k"]), result.get("draft_confidence_threshold")
    if dk != result["k"] or conf is not None:
        caption += (f" The draft-model systems draft k = {dk}"
                    + (f", stopping after a token the draft gives less than {conf}" if conf is not None else "") + ".")
    d = result.get("distilled") or {}
    if d:
        caption += (f" `distilled`: the same draft after {d['steps']} steps of distillation from the target "
                    f"(`folovllm train-pair --distill`, {d['train_seconds']:.0f} s); on the held-out windows its "
                    f"argmax equals the target's at {100 * d['before']['greedy_agreement']:.1f} % → "
                    f"{100 * d['after']['greedy_agreement']:.1f} % of positions, KL to the target "
                    f"{d['before']['held_out_kl']:.3f} → {d['after']['held_out_kl']:.3f}, loss on the text "
                    f"{d['before']['held_out_loss']:.3f} → {d['after']['held_out_loss']:.3f}.")
    lines = [caption, "", "| workload | batch | system | output tok/s | × none (CPU) | acceptance | mean accepted "
             "length | tokens per row-step | same tokens |", "|:--|--:|:--|--:|--:|--:|--:|--:|:-:|"]
    for m in result["results"].values():
        for name, r in m["systems"].items():
            acc = f"{100 * r['acceptance_rate']:.1f} %" if "acceptance_rate" in r else "-"
            mal = f"{r['mean_accepted_length']:.2f}" if "mean_accepted_length" in r else "-"
            cpu = f" ({r['cpu_speedup']:.2f})" if "cpu_speedup" in r else ""
            lines.append(f"| {m['workload']} | {m['batch']} | {name} | {r['median_output_tok_s']:.1f} "
                         f"| {r['speedup']:.2f}{cpu} | {acc} | {mal} | {r['tokens_per_row_step']:.2f} | yes |")
    for name, why in result["unavailable"].items():
        lines.append(f"\n`{name}`: not run, this build has no stage 09 ({why.splitlines()[0]}).")
    offline = result.get("draft_acceptance_offline") or {}
    if offline:
        lines += ["", "The draft model's proposals against the target's greedy tokens, offline "
                  "(`simulate_draft_acceptance`: no engine, one request at a time; acceptance = "
                  "accepted / drafted, mean accepted length = accepted per drafting step):", "",
                  "| workload | k | acceptance | mean accepted length | accepted by position | draft ms per step |",
                  "|:--|--:|--:|--:|:--|--:|"]
        for wname, rows in offline.items():
            for o in rows:
                pos = " ".join(f"{x / max(1, o['num_drafts']):.2f}" for x in o["num_accepted_tokens_per_pos"])
                lines.append(f"| {wname} | {o['k']} | {100 * o['acceptance_rate']:.1f} % "
                             f"| {o['mean_accepted_length']:.2f} | {pos} | {o['draft_ms_per_step']:.2f} |")
    for name, s in result["sweep"].items():
        lines += ["", f"k sweep, {name} on {s['workload']}, batch 1 (none: {s['baseline_tok_s']:.1f} tok/s; "
                  "each k against none in the same interleaved run):", "",
                  "| k | output tok/s | × none (CPU) | acceptance | mean accepted length |", "|--:|--:|--:|--:|--:|"]
        for p in s["points"]:
            acc = "-" if p["acceptance_rate"] is None else f"{100 * p['acceptance_rate']:.1f} %"
            mal = "-" if p["mean_accepted_length"] is None else f"{p['mean_accepted_length']:.2f}"
            cpu = f" ({p['cpu_speedup']:.2f})" if p.get("cpu_speedup") is not None else ""
            lines.append(f"| {p['k']} | {p['median_output_tok_s']:.1f} | {p['speedup']:.2f}{cpu} | {acc} | {mal} |")
    bs = result.get("batch_sweep") or {}
    if bs:
        names = list(next(iter(bs["batches"].values())))
        lines += ["", f"Batch sweep on {bs['workload']}: output tok/s × none (CPU time in brackets), "
                  "acceptance in the second line of each cell:", "",
                  "| batch | " + " | ".join(names) + " |", "|--:|" + "--:|" * len(names)]
        for batch, rows in bs["batches"].items():
            cells = []
            for n in names:
                r = rows[n]
                acc = "" if r.get("acceptance_rate") is None else f"<br>{100 * r['acceptance_rate']:.0f} %"
                cells.append(f"{r['speedup']:.2f} ({r['cpu_speedup']:.2f}){acc}")
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict[str, Any], out: Path) -> Optional[Path]:
    """Left: output tok/s (× none) against k, one line per proposer (the engine's sweep).
    Right: acceptance rate against k: the engine's sweep, and the draft model's offline
    measurement on each workload (dashed), which needs no stage-09 engine."""
    offline = result.get("draft_acceptance_offline") or {}
    if not result["sweep"] and not offline:
        return None
    from benchmarks.plots import _plt, _save

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, s) in enumerate(result["sweep"].items()):
        ks = [p["k"] for p in s["points"]]
        ax1.plot(ks, [p["speedup"] for p in s["points"]], marker="o", color=f"C{i}", label=f"{name} ({s['workload']})")
        ax2.plot(ks, [p["acceptance_rate"] or 0 for p in s["points"]], marker="o", color=f"C{i}", label=name)
    for j, (wname, rows) in enumerate(offline.items()):
        ax2.plot([o["k"] for o in rows], [o["acceptance_rate"] for o in rows], marker="s", ls="--",
                 color=f"C{j + 3}", label=f"draft, offline: {wname}")
    if not result["sweep"]:
        ax1.text(0.5, 0.5, "no stage-09 engine in this build:\nspeed not measured", ha="center",
                 va="center", transform=ax1.transAxes, color="gray")
    ax1.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax1.set_xlabel("k (drafted tokens per step)")
    ax1.set_ylabel("output tok/s, × no speculation")
    ax1.set_title("speed-up at batch 1")
    ax2.set_xlabel("k")
    ax2.set_ylabel("accepted / drafted")
    ax2.set_ylim(0, 1)
    ax2.set_title("acceptance rate")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"stage 09 on the trained pair, {machine_short(result['machine'])}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8])
    p.add_argument("--k", type=int, default=4, help="drafted tokens per step (the sweep runs 1..5)")
    p.add_argument("--prompt-lookup-min", type=int, default=1,
                   help="n-gram's shortest suffix looked up (default 1; 2-3 skip single-token coincidences)")
    p.add_argument("--draft-k", type=int, default=None, help="k of the draft-model systems (default --k)")
    p.add_argument("--draft-confidence", type=float, default=None,
                   help="draft_confidence_threshold of the draft-model systems (default: none, k drafts)")
    p.add_argument("--batch-sweep", type=int, nargs="*", default=[],
                   help="batch sizes of a sweep on one workload: where speculation stops paying")
    p.add_argument("--batch-sweep-workload", default="completion", choices=WORKLOADS)
    p.add_argument("--num-requests", type=int, default=8, help="requests per workload (at least the batch)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep over k")
    p.add_argument("--offline", action="store_true",
                   help="also measure the draft's acceptance offline, without the engine (k = 1..5 per "
                        "workload; slow: the engine's own counters give the same rates)")
    p.add_argument("--pair", type=Path, default=None,
                   help="a pair folder (target/, draft/, train_pair.json) instead of the cached one")


def _written(args: argparse.Namespace, result: dict[str, Any], name: str) -> None:
    path = plot_sweep(result, ASSETS_DIR / "stage09_trained_pair_k_sweep.png")
    if path is not None:
        print(f"wrote {path}")


def main(argv: Optional[list[str]] = None) -> None:
    bench_main("benchmarks.stage09_trained_pair", __doc__, argv, run, render_markdown, name="stage09_trained_pair_cpu",
               options=add_options, written=_written)


if __name__ == "__main__":
    main()
