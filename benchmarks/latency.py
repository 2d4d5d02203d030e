"""Online-serving latency: replay a seeded Poisson arrival trace against folovllm engines.

    python -m benchmarks.latency --stages 1 2 --workload mixed --num-requests 48   # stage 02's
    python -m benchmarks.latency --stages 1 2 --rate 0.5 --no-write                # fixed rate
    python -m benchmarks.latency --systems folovllm-stage4 \
        'folovllm-stage5[max_num_batched_tokens=256]' --workload long_prompts      # stage 05's

Each stage gets a fresh `LLMEngine` (through `folovllm.LLM`) per repeat and the same trace:
request i arrives `arrivals[i]` seconds after the start (`workloads.poisson_arrivals`). The loop
adds every request whose arrival time has passed (with that arrival time, so the time it waited
while a step was running counts as queueing), then runs one `step()`; when nothing is left to
run it sleeps until the next arrival. Requests are greedy with ignore_eos, so every one produces
exactly its `max_tokens`, on every stage.

Rate: `--rate` requests/s, or (default) `--load` x the capacity of the highest stage, measured
first on the same workload with every request arriving at 0 (its offline throughput in requests
per second on this machine now). At 0.8 the newest stage is busy but keeps up; an older, slower
stage may not, and its queue (and TTFT) then grows over the trace: that is the point.

Per request, from `RequestOutput.metrics` (`folovllm.outputs.RequestMetrics`): queue time, time
to first token (TTFT), inter-token latencies (ITL, pooled over all requests), time per output
token (TPOT, each request's mean decode gap), end-to-end latency. Throughput: output tokens /
(last finish - first arrival). Repeats are interleaved (stage 1, stage 2, stage 1, ...) and the
report quotes the median over repeats of each statistic.

Writes `<out>/<name>.json` (every request's metrics, per-step traces of requests running and
waiting) and `<out>/<name>.md`, and the plot `docs/assets/stage02_latency.png`
(`benchmarks.plots.plot_latency`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import interleave, peak_loadavg, timed, warmup_workload
from benchmarks.results import ASSETS_DIR, machine_short, shared_machine_note
from benchmarks.systems import BenchConfig, make_system
from benchmarks.systems.folovllm import FolovllmSystem, trace_columns
from benchmarks.workloads import WORKLOADS, Workload, get_workload, poisson_arrivals


def percentile(xs: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def replay(llm: Any, workload: Workload, arrivals: list[float]) -> dict[str, Any]:
    """Run `workload` on `llm`'s engine, request i arriving at `arrivals[i]` s after the start."""
    from folovllm import SamplingParams
    from folovllm.sampling_params import RequestOutputKind
    from folovllm.trace.recorder import StepTracer

    engine = llm.llm_engine
    tracer = StepTracer.attach(engine)  # requests running and waiting, KV reserved, every step
    # DELTA outputs: every step says which requests got a token, so each token also gets the
    # process CPU time at which it came (`cpu_token_times`): inter-token gaps in CPU seconds do not
    # grow when other processes share the machine, wall-clock ones do.
    params = [SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=r.max_tokens,
                             ignore_eos=True, output_kind=RequestOutputKind.DELTA)
              for r in workload.requests]
    prompts = [list(r.prompt_token_ids) for r in workload.requests]
    n = len(workload)
    finished: dict[str, Any] = {}
    num_tokens: dict[str, int] = {}
    cpu_token_times: dict[str, list[float]] = {}

    def serve() -> float:
        """The serving loop; returns its start time (the zero of `arrivals`)."""
        tracer.clear()
        start, nxt, cpu0 = tracer.t0, 0, time.process_time()
        while nxt < n or engine.has_unfinished_requests():
            now = time.perf_counter()
            while nxt < n and start + arrivals[nxt] <= now:
                engine.add_request(str(nxt), prompts[nxt], params[nxt], arrival_time=start + arrivals[nxt])
                nxt += 1
            if engine.has_unfinished_requests():
                outputs = engine.step()
                cpu = time.process_time() - cpu0
                for out in outputs:
                    new = len(out.outputs[0].token_ids)
                    num_tokens[out.request_id] = num_tokens.get(out.request_id, 0) + new
                    cpu_token_times.setdefault(out.request_id, []).extend([cpu] * new)
                    if out.finished:
                        finished[out.request_id] = out
            elif nxt < n:
                time.sleep(max(0.0, start + arrivals[nxt] - time.perf_counter()))
        return start

    run = timed(serve)
    start = run.value

    requests = []
    for i, r in enumerate(workload.requests):
        out = finished[str(i)]
        got = num_tokens[str(i)]
        cpu_times = cpu_token_times[str(i)]
        if got != r.max_tokens:
            raise RuntimeError(f"request {i}: {got} tokens, expected {r.max_tokens}")
        m = out.metrics
        requests.append(dict(
            arrival=round(m.arrival_time - start, 5),
            queue=round(m.queue_time, 5),
            ttft=round(m.time_to_first_token, 5),
            tpot=None if m.time_per_output_token is None else round(m.time_per_output_token, 5),
            e2e=round(m.e2e_latency, 5),
            itl=[round(x, 5) for x in m.inter_token_latencies],
            itl_cpu=[round(b - a, 5) for a, b in zip(cpu_times, cpu_times[1:])],
            prompt_tokens=len(r.prompt_token_ids), output_tokens=got,
        ))
    last_finish = max(q["arrival"] + q["e2e"] for q in requests)
    return dict(seconds=round(run.seconds, 4), cpu_seconds=round(run.cpu_seconds, 4),
                makespan=round(last_finish, 4), loadavg=run.loadavg, requests=requests,
                trace=trace_columns(tracer), stats=dict(engine.stats.as_dict()))


def latency_stats(run: dict[str, Any], workload: Workload) -> dict[str, Any]:
    reqs = run["requests"]
    ttft = [q["ttft"] for q in reqs]
    itl = [x for q in reqs for x in q["itl"]]
    itl_cpu = [x for q in reqs for x in q.get("itl_cpu", [])]
    tpot = [q["tpot"] for q in reqs if q["tpot"] is not None]
    e2e = [q["e2e"] for q in reqs]
    queue = [q["queue"] for q in reqs]
    span = run["makespan"]
    return dict(
        ttft_p50=percentile(ttft, 50), ttft_p90=percentile(ttft, 90), ttft_p99=percentile(ttft, 99),
        itl_p50=percentile(itl, 50), itl_p99=percentile(itl, 99),
        itl_cpu_p50=percentile(itl_cpu, 50), itl_cpu_p99=percentile(itl_cpu, 99),
        itl_cpu_max=max(itl_cpu) if itl_cpu else None,
        tpot_mean=statistics.fmean(tpot) if tpot else None, tpot_p50=percentile(tpot, 50),
        e2e_p50=percentile(e2e, 50), e2e_p99=percentile(e2e, 99), queue_p50=percentile(queue, 50),
        output_tok_s=workload.num_output_tokens / span, requests_per_s=len(reqs) / span,
        makespan=span, max_num_running=run["stats"]["max_num_running"],
    )


def render_markdown(result: dict[str, Any]) -> str:
    w, c = result["workload"], result["config"]
    cap = result.get("capacity")
    of = cap.get("system") or f"stage {cap['stage']:02d}"
    how = (f"{c['load']:.0%} of {of}'s capacity of {cap['requests_per_s']:.3f} "
           f"requests/s (measured first: all {w['num_requests']} requests at once, "
           f"{cap['seconds']:.1f} s)" if cap else "set by --rate")
    caption = (
        f"Online latency, Poisson arrivals at {c['rate']:.3f} requests/s ({how}), seed "
        f"{c['arrival_seed']}; workload `{w['name']}` ({w['num_requests']} requests, prompt "
        f"{w['prompt_len_min']}..{w['prompt_len_max']}, output {w['output_len_min']}.."
        f"{w['output_len_max']} tokens, greedy, ignore_eos), model {result['model']['name']}, "
        f"float32, max_num_seqs {c['max_num_seqs']}, median of {c['repeats']} interleaved "
        f"repeat{'s' if c['repeats'] != 1 else ''}: `{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}. Latencies in seconds; p99 of "
        f"{w['num_requests']} requests is close to the maximum."
    )
    caption += shared_machine_note(result, cpu_ratios=False)
    cols = [("TTFT p50", "ttft_p50", 2), ("TTFT p90", "ttft_p90", 2), ("TTFT p99", "ttft_p99", 2),
            ("ITL p50", "itl_p50", 3), ("ITL p99", "itl_p99", 3),
            ("ITL p50 (CPU s)", "itl_cpu_p50", 3), ("ITL p99 (CPU s)", "itl_cpu_p99", 3),
            ("ITL max (CPU s)", "itl_cpu_max", 3),
            ("TPOT mean", "tpot_mean", 3),
            ("e2e p50", "e2e_p50", 2), ("queue p50", "queue_p50", 2),
            ("output tok/s", "output_tok_s", 1), ("requests/s", "requests_per_s", 3),
            ("peak running", "max_num_running", 0)]
    head = ["system"] + [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":--"] + ["--:"] * len(cols)) + "|"]
    for name, r in result["systems"].items():
        cells = [f"`{name}`"]
        for _, key, digits in cols:
            v = r["median"].get(key)
            cells.append("—" if v is None else f"{v:,.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    ratios = result.get("ratios")
    tail = ""
    if ratios:
        tail = "\n" + (f"{ratios['older']} / {ratios['newer']}: TTFT p50 {ratios['ttft_p50']:.1f}×, "
                       f"TTFT p99 {ratios['ttft_p99']:.1f}×, e2e p50 {ratios['e2e_p50']:.1f}×, "
                       + (f"ITL p99 {ratios['itl_p99']:.1f}× (in CPU time {ratios['itl_cpu_p99']:.1f}×), "
                          if "itl_cpu_p99" in ratios else "")
                       + f"throughput {ratios['throughput']:.2f}× (newer / older).") + "\n"
    return caption + "\n\n" + "\n".join(lines) + "\n" + tail


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--systems", nargs="+", default=None,
                   help="folovllm-stageN[key=value,...] systems instead of --stages (e.g. a budget sweep)")
    p.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS))
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="arrivals per second (default: --load x capacity)")
    p.add_argument("--load", type=float, default=0.8,
                   help="rate as a fraction of the highest stage's measured capacity (default 0.8)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--arrival-seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="PNG path (default docs/assets/<name minus _cpu>.png)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = str(bench_model_path())
    info = bench_model_info(Path(model))
    workload = get_workload(args.workload, vocab_size=info["vocab_size"], seed=args.seed,
                            quick=args.quick, num_requests=args.num_requests)
    names = args.systems or [f"folovllm-stage{s}" for s in sorted(set(args.stages))]
    cfg = BenchConfig(model=model, max_num_seqs=args.max_num_seqs)
    systems_ = {name: make_system(name, cfg) for name in names}
    if not all(isinstance(s, FolovllmSystem) for s in systems_.values()):
        raise SystemExit(f"error: only folovllm-stageN[key=value,...] systems replay a trace: {names}")
    stages = sorted({s.stage for s in systems_.values()})
    print(f"workload: {workload.summary()}")

    def serve(name: str, w: Workload, arrivals: list[float]) -> dict[str, Any]:
        """One replay on a fresh engine of system `name` (built untimed: `replay` times the serving)."""
        return replay(systems_[name].build(), w, arrivals)

    # Warm-up (untimed): each system once, the first max_num_seqs prompts at once, 4 tokens each.
    warm = warmup_workload(workload, args.max_num_seqs)
    for name in names:
        serve(name, warm, [0.0] * len(warm))
    capacity = None
    rate = args.rate
    if rate is None:
        top = names[-1]
        run = serve(top, workload, [0.0] * len(workload))
        capacity = dict(stage=systems_[top].stage, system=top, seconds=run["seconds"], cpu_seconds=run["cpu_seconds"],
                        loadavg=run["loadavg"], requests_per_s=round(len(workload) / run["seconds"], 5),
                        output_tok_s=round(workload.num_output_tokens / run["seconds"], 3))
        rate = args.load * capacity["requests_per_s"]
        print(f"capacity of {top}: {capacity['requests_per_s']:.3f} requests/s "
              f"({run['seconds']:.1f}s for {len(workload)} requests, load {run['loadavg']}); "
              f"rate = {args.load} x that = {rate:.3f} requests/s")
    arrivals = poisson_arrivals(len(workload), rate, seed=args.arrival_seed)
    print(f"trace: {len(arrivals)} arrivals over {arrivals[-1]:.1f}s")

    def log(name: str, i: int, run: dict[str, Any]) -> None:
        s = latency_stats(run, workload)
        print(f"repeat {i + 1}/{args.repeats} {name}: {run['seconds']:.1f}s (cpu "
              f"{run['cpu_seconds']:.1f}s, load {run['loadavg']}), TTFT p50 {s['ttft_p50']:.2f}s "
              f"p99 {s['ttft_p99']:.2f}s, ITL p50 {s['itl_p50'] * 1e3:.0f}ms, "
              f"{s['output_tok_s']:.1f} output tok/s, peak running {s['max_num_running']}")

    runs = interleave({n: (lambda n=n: serve(n, workload, arrivals)) for n in names}, args.repeats, log=log)

    systems: dict[str, Any] = {}
    for name in names:
        sums = [latency_stats(r, workload) for r in runs[name]]
        median = {k: (None if any(s[k] is None for s in sums) else
                      round(statistics.median(s[k] for s in sums), 5)) for k in sums[0]}
        systems[name] = dict(median=median, per_repeat=sums, runs=runs[name])
    ratios = None
    if len(names) >= 2:  # the first system against the last
        old, new = systems[names[0]]["median"], systems[names[-1]]["median"]
        ratios = dict(older=names[0], newer=names[-1],
                      ttft_p50=old["ttft_p50"] / new["ttft_p50"], ttft_p99=old["ttft_p99"] / new["ttft_p99"],
                      e2e_p50=old["e2e_p50"] / new["e2e_p50"], itl_p99=old["itl_p99"] / new["itl_p99"],
                      itl_cpu_p99=old["itl_cpu_p99"] / new["itl_cpu_p99"],
                      throughput=new["output_tok_s"] / old["output_tok_s"])
    return dict(
        model=info,
        config=dict(stages=stages, systems=names, workload=args.workload, quick=args.quick, repeats=args.repeats,
                    threads=args.threads, max_num_seqs=args.max_num_seqs, seed=args.seed,
                    arrival_seed=args.arrival_seed, rate=rate, load=args.load if args.rate is None else None),
        workload=workload.summary(), capacity=capacity, arrivals=[round(a, 5) for a in arrivals],
        systems=systems, ratios=ratios,
        peak_loadavg_1m=peak_loadavg([r["loadavg"] for rs in runs.values() for r in rs]
                                     + [capacity and capacity["loadavg"]]),
    )


def plot(args: argparse.Namespace, result: dict[str, Any], name: str) -> None:
    """docs/assets/<name minus _cpu>.png (or --plot): the TTFT CDFs and requests over time."""
    from benchmarks.plots import plot_itl_ttft_tradeoff, plot_latency

    png = Path(args.plot) if args.plot else ASSETS_DIR / f"{name.removesuffix('_cpu')}.png"
    try:  # plots imports matplotlib when it draws
        print(f"wrote {plot_latency(result, png)}")
        if len(result["config"]["systems"]) > 2:
            print(f"wrote {plot_itl_ttft_tradeoff(result, png.with_name(png.stem + '_tradeoff.png'))}")
    except ImportError as e:  # matplotlib missing: results are written anyway
        print(f"no plot ({e}); pip install matplotlib, then python -m benchmarks.plots")


def main(argv: Optional[list[str]] = None) -> int:
    def name(args: argparse.Namespace, result: dict[str, Any]) -> str:  # NN: the highest stage
        return f"stage{result['config']['stages'][-1]:02d}_latency_cpu"

    bench_main("benchmarks.latency", __doc__, argv, run, render_markdown, name=name, repeats=1,
               options=add_options, written=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
