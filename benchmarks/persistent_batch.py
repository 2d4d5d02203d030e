"""The persistent input batch against the whole batch, side by side in one run: what a decode
step costs to hand the workers its inputs, without the model.

    python -m benchmarks.persistent_batch                       # 16 rows x 4,096 tokens
    python -m benchmarks.persistent_batch --rows 16 64 --context 256 4096

For each case (B rows decoding, each with `context` tokens, block size 16) the same steps go
through both paths, alternated step by step, and each part is timed by process CPU time:

    whole       LLMEngine.make_input_batch, then InputBuffers.prepare_inputs
                (+ at TP > 1: pickle the InputBatch once, unpickle it on each rank)
    persistent  LLMEngine.make_input_batch, InputBatchSender.make_message, then on the worker
                PersistentInputBatch.apply and InputBuffers.prepare_inputs_from_table
                (+ at TP > 1: the same pickling of the much smaller diff)

The bytes are those `MultiprocExecutor` sends each rank per step (`dumps(("execute_model",
(message,)))`): deterministic, and the same at any TP size. The prepared tensors of both paths
are checked equal at every step.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import loadavg
from benchmarks.results import machine_short

BLOCK_SIZE = 16


def measure(rows: int, context: int, steps: int) -> dict[str, Any]:
    from folovllm.core.request import Request
    from folovllm.core.scheduler_output import SchedulerOutput
    from folovllm.engine.llm_engine import LLMEngine
    from folovllm.executor.multiproc_executor import dumps
    from folovllm.sampling_params import SamplingParams
    from folovllm.worker.input_buffers import InputBuffers
    from folovllm.worker.persistent_batch import InputBatchSender, PersistentInputBatch

    requests = [Request(str(i), [3 + (7 * j + i) % 500 for j in range(context)],
                        SamplingParams(max_tokens=10 * steps), arrival_time=0.0) for i in range(rows)]
    blocks_per_req = -(-(context + steps + 1) // BLOCK_SIZE)
    tables = [list(range(i * blocks_per_req, i * blocks_per_req + -(-context // BLOCK_SIZE))) for i in range(rows)]
    sender, table = InputBatchSender(), PersistentInputBatch()
    whole_buffers, table_buffers = InputBuffers(BLOCK_SIZE, "cpu"), InputBuffers(BLOCK_SIZE, "cpu")
    ns: dict[str, list[int]] = {k: [] for k in ("make_input_batch", "prepare_inputs", "make_message", "apply",
                                                "prepare_inputs_from_table", "pickle_whole", "pickle_diff")}
    sizes: dict[str, list[int]] = {"whole": [], "diff": []}

    def timed(key: str, fn: Any, *args: Any) -> Any:
        start = time.process_time_ns()
        value = fn(*args)
        ns[key].append(time.process_time_ns() - start)
        return value

    warmup = 5
    for step in range(warmup + steps):
        output = SchedulerOutput()
        for request, t in zip(requests, tables):
            request.num_computed_tokens = request.num_tokens - 1
            output.add_row(request, 1, list(t))
        batch = timed("make_input_batch", LLMEngine.make_input_batch, output)
        whole = timed("prepare_inputs", whole_buffers.prepare_inputs, batch)
        diff = timed("make_message", sender.make_message, batch, output.requests)
        timed("apply", table.apply, diff)
        ours = timed("prepare_inputs_from_table", table_buffers.prepare_inputs_from_table, table, diff)
        wire_whole = timed("pickle_whole", lambda: pickle.loads(dumps(("execute_model", (batch,)))))
        wire_diff = timed("pickle_diff", lambda: pickle.loads(dumps(("execute_model", (diff,)))))
        sizes["whole"].append(len(dumps(("execute_model", (batch,)))))
        sizes["diff"].append(len(dumps(("execute_model", (diff,)))))
        assert wire_whole[1][0].req_ids == wire_diff[1][0].req_ids
        for a, b in [(whole.input_ids, ours.input_ids), (whole.positions, ours.positions),
                     (whole.attn_metadata.slot_mapping, ours.attn_metadata.slot_mapping),
                     (whole.attn_metadata.block_tables, ours.attn_metadata.block_tables)]:
            assert torch.equal(a, b)
        for request, t in zip(requests, tables):  # each row samples a token; a block fills now and then
            request.append_output_token(7)
            if request.num_tokens % BLOCK_SIZE == 1:
                t.append(t[-1] + 1)
        if step < warmup:
            for v in ns.values():
                v.clear()
            for v in sizes.values():
                v.clear()

    us = {k: round(statistics.median(v) / 1e3, 1) for k, v in ns.items()}
    whole_us = us["make_input_batch"] + us["prepare_inputs"]
    persistent_us = us["make_input_batch"] + us["make_message"] + us["apply"] + us["prepare_inputs_from_table"]
    return dict(rows=rows, context=context, steps=steps, us_per_step=us, whole_us=round(whole_us, 1),
                persistent_us=round(persistent_us, 1),
                whole_tp_us=round(whole_us + us["pickle_whole"], 1),
                persistent_tp_us=round(persistent_us + us["pickle_diff"], 1),
                whole_bytes=int(statistics.median(sizes["whole"])), diff_bytes=int(statistics.median(sizes["diff"])),
                loadavg=loadavg())


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--context", type=int, nargs="+", default=[4096])
    p.add_argument("--steps", type=int, default=200, help="timed decode steps per case")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.rows, args.context, args.steps = [4], [64], 5
    results = []
    for rows in args.rows:
        for context in args.context:
            r = measure(rows, context, args.steps)
            results.append(r)
            print(f"{rows} rows x {context}: whole {r['whole_us']} us, persistent {r['persistent_us']} us; "
                  f"bytes {r['whole_bytes']} -> {r['diff_bytes']}", flush=True)
    return dict(results=results)


def render_markdown(result: dict[str, Any]) -> str:
    rs = result["results"]
    label = lambda r: f"{r['rows']} rows x {r['context']}"  # noqa: E731
    lines = [f"A decode step's inputs, whole batch → persistent batch, median µs of process CPU time "
             f"over {rs[0]['steps']} steps (both paths alternated in one run, their tensors checked "
             f"equal every step): `{result['command']}` on {machine_short(result['machine'])}, "
             f"{result['date'][:10]}, commit {result['git_commit'][:12]}, 1-minute load "
             f"{min(r['loadavg'] for r in rs)}-{max(r['loadavg'] for r in rs)} on 2 cores.", "",
             "| µs per decode step | " + " | ".join(label(r) for r in rs) + " |", "|:--|" + "--:|" * len(rs)]
    rows = [("make_input_batch (both)", lambda r: f"{r['us_per_step']['make_input_batch']}"),
            ("whole: prepare_inputs", lambda r: f"{r['us_per_step']['prepare_inputs']}"),
            ("persistent: make_message", lambda r: f"{r['us_per_step']['make_message']}"),
            ("persistent: apply", lambda r: f"{r['us_per_step']['apply']}"),
            ("persistent: prepare_inputs_from_table", lambda r: f"{r['us_per_step']['prepare_inputs_from_table']}"),
            ("**one rank: whole → persistent**",
             lambda r: f"**{r['whole_us']} → {r['persistent_us']}** ({r['whole_us'] / r['persistent_us']:.2f}x)"),
            ("pickle + unpickle the message: whole → persistent",
             lambda r: f"{r['us_per_step']['pickle_whole']} → {r['us_per_step']['pickle_diff']}"),
            ("**TP > 1 (+ one pickle round trip): whole → persistent**",
             lambda r: f"**{r['whole_tp_us']} → {r['persistent_tp_us']}** ({r['whole_tp_us'] / r['persistent_tp_us']:.2f}x)"),
            ("bytes to each TP rank per step: whole → persistent",
             lambda r: f"{r['whole_bytes']:,} → {r['diff_bytes']:,} ({r['whole_bytes'] / r['diff_bytes']:.0f}x)")]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in rs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.persistent_batch", __doc__, argv, run, render_markdown, repeats=1,
               name="perf_persistent_batch", options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
