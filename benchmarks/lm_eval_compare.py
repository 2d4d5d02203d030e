"""lm-evaluation-harness against `folovllm serve` and against HF transformers, side by side.

    bash benchmarks/install_lm_eval.sh                 # once: lm-eval 0.4.x in /work/venvs/lm-eval
    python -m benchmarks.lm_eval_compare               # the bench model, the three tasks below
    python -m benchmarks.lm_eval_compare --model PATH --tasks folo_mc --no-write

What it runs, from the repository root:

1. `folovllm serve MODEL --dtype float32` on a free port (benchmarks/serving.py's start_server);
2. `lm_eval --model local-completions` (lm-eval's client of an OpenAI-compatible completions
   server, as for vLLM) against it: loglikelihood requests are echo + max_tokens 0 + logprobs,
   token-id prompts (`tokenized_requests`), several per request (`batch_size`);
3. `lm_eval --model hf` on the same checkpoint, float32, CPU;
4. both with `--log_samples`, then per task: the metrics side by side, and per sample the
   largest |difference| of a log-likelihood (every choice of every multiple-choice question,
   every passage of the perplexity task), absolute, relative and per scored token, and whether
   the generated texts are identical;
5. HF once more at another batch size (`--hf-batch-size-too`, default 1), compared with itself
   the same way: how far HF's own float32 numbers move, the scale to read 4. against.

The bench model has random weights, so a continuation's log-likelihood is hundreds of nats
(-280 for 28 tokens), where one float32 ulp is 3e-5 and HF sums the tokens in float32. The
check is therefore 1e-4 *per scored token* of each sample (and identical picks, accuracies and
generations), not 1e-4 on the sum; the table gives both.

The tasks are offline and kept in the repository (benchmarks/lm_eval_tasks/, lm-eval's
`dataset_path: json`): `folo_mc` (multiple choice: loglikelihood), `folo_ppl` (perplexity:
loglikelihood_rolling), `folo_gen` (greedy generation: generate_until). The bench model has
random weights, so its accuracies are chance; what is compared is that the two implementations
give the same numbers. Results: benchmarks/results/lm_eval_compare_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from benchmarks.results import RESULTS_DIR, result_record, write_results
from benchmarks.serving import MODEL_NAME, start_server, stop_server

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ("folo_mc", "folo_ppl", "folo_gen")
DEFAULT_VENV = Path("/work/venvs/lm-eval")
TOLERANCE = 1e-4  # per token of a sample's log-likelihood, folovllm vs HF (both float32)


def lm_eval(venv: Path, model: str, model_args: str, tasks: list[str], out: Path, batch_size: int,
            log: Path) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR), "--output_path", str(out),
           "--log_samples", "--batch_size", str(batch_size), "--seed", "0"]
    if model == "hf":
        cmd += ["--device", "cpu"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": "EMPTY"}
    env.pop("PYTHONPATH", None)  # the venv's own packages, not folovllm's
    print("$ " + " ".join(cmd), file=sys.stderr)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"lm_eval --model {model} exited with {rc}; its output: {log}\n"
                           + "".join(open(log).readlines()[-30:]))


def read_run(out: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """lm-eval's results_*.json and samples_<task>_*.jsonl under `out` (one run)."""
    results = json.loads(max(out.rglob("results_*.json")).read_text())
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                               key=lambda s: s["doc_id"])
    return results, samples


def loglikelihoods(sample: dict[str, Any]) -> list[float]:
    """Every log-likelihood lm-eval got for one document (one per choice, or the passage's)."""
    out = []
    for resp in sample["resps"]:
        value = resp[0]
        out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
    return out


def scored_tokens(sample: dict[str, Any], tokenizer: Any) -> list[int]:
    """How many tokens each log-likelihood of `sample` sums: the continuation's (loglikelihood),
    the passage's (loglikelihood_rolling)."""
    args = [a for _, a in sorted(sample["arguments"].items())]
    texts = [a.get("arg_1", a.get("arg_0")) for a in args]
    return [max(1, len(tokenizer.encode(t, add_special_tokens=False))) for t in texts]


def compare(tasks: list[str], ours: tuple[dict, dict], hf: tuple[dict, dict], tokenizer: Any) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        metrics_ours, metrics_hf = ours[0]["results"][task], hf[0]["results"][task]
        s_ours, s_hf = ours[1][task], hf[1][task]
        assert [s["doc_id"] for s in s_ours] == [s["doc_id"] for s in s_hf], task
        row: dict[str, Any] = dict(task=task, samples=len(s_ours), metrics={
            k: dict(folovllm=v, hf=metrics_hf.get(k)) for k, v in metrics_ours.items()
            if isinstance(v, (int, float)) and "stderr" not in k})
        if task == "folo_gen":
            texts = [(a["resps"][0][0], b["resps"][0][0]) for a, b in zip(s_ours, s_hf)]
            row["identical_generations"] = sum(a == b for a, b in texts)
            row["generations"] = [dict(folovllm=a, hf=b) for a, b in texts]
        else:
            pairs = [(a, b, n) for x, y in zip(s_ours, s_hf)
                     for a, b, n in zip(loglikelihoods(x), loglikelihoods(y), scored_tokens(x, tokenizer))]
            row["loglikelihoods"] = len(pairs)
            row["max_abs_diff"] = max(abs(a - b) for a, b, _ in pairs)
            row["max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b, _ in pairs)
            row["max_abs_diff_per_token"] = max(abs(a - b) / n for a, b, n in pairs)
            row["largest_abs_loglikelihood"] = max(abs(b) for _, b, _ in pairs)
            row["within_tolerance"] = all(abs(a - b) <= TOLERANCE * n for a, b, n in pairs)
            if task == "folo_mc":
                picks = lambda ss: [max(range(len(loglikelihoods(s))), key=lambda i: loglikelihoods(s)[i]) for s in ss]  # noqa: E731
                row["identical_choices"] = sum(a == b for a, b in zip(picks(s_ours), picks(s_hf)))
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["# lm-evaluation-harness: folovllm serve vs HF transformers", "",
             f"`{result['command']}` at {result['git_commit']}, {result['date']}; lm-eval {result['lm_eval_version']}, "
             f"model {result['model']} (float32, random weights: accuracies are chance, the comparison is the point).",
             f"folovllm: `lm_eval --model local-completions --model_args {result['model_args']['folovllm']}` "
             f"against `folovllm serve {result['model']} --dtype float32` (batch size {result['batch_size']}); "
             f"HF: `lm_eval --model hf --model_args {result['model_args']['hf']} --device cpu`.", "",
             "| task | metric | folovllm | hf |", "|---|---|---|---|"]
    for row in result["tasks"]:
        for metric, v in row["metrics"].items():
            lines.append(f"| {row['task']} | {metric} | {v['folovllm']:.6g} | {v['hf']:.6g} |")
    def table(rows: list[dict[str, Any]], a: str, b: str) -> list[str]:
        out = ["", f"Per sample, {a} vs {b}:", "",
               "| task | samples | compared | largest \\|log-likelihood\\| | max abs difference | max relative | "
               "max abs difference per scored token | within 1e-4 per token | identical |",
               "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row["task"] == "folo_gen":
                out.append(f"| {row['task']} | {row['samples']} | generated texts | - | - | - | - | - | "
                           f"{row['identical_generations']} of {row['samples']} |")
            else:
                extra = (f"{row['identical_choices']} of {row['samples']} picks" if "identical_choices" in row else "-")
                out.append(f"| {row['task']} | {row['samples']} | {row['loglikelihoods']} log-likelihoods | "
                           f"{row['largest_abs_loglikelihood']:.1f} | {row['max_abs_diff']:.2g} | {row['max_rel_diff']:.2g} | "
                           f"{row['max_abs_diff_per_token']:.2g} | {'yes' if row['within_tolerance'] else '**no**'} | {extra} |")
        return out

    lines += table(result["tasks"], "folovllm", "HF")
    if result.get("hf_vs_hf"):
        lines += table(result["hf_vs_hf"], f"HF at batch size {result['hf_batch_size_too']}",
                       f"HF at batch size {result['batch_size']} (HF's own float32 noise)")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bench model)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per completions request")
    parser.add_argument("--hf-batch-size-too", type=int, default=1,
                        help="also run HF at this batch size and compare HF with itself (0: skip)")
    parser.add_argument("--serve-args", default="", help="more `folovllm serve` arguments, e.g. --batch-invariant")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--name", default="lm_eval_compare_cpu")
    args = parser.parse_args(argv)
    if not (args.venv / "bin" / "python").exists():
        raise SystemExit(f"no lm-eval venv at {args.venv}: run `bash benchmarks/install_lm_eval.sh {args.venv}`")
    if args.model is None:
        from benchmarks.bench_model import bench_model_path

        args.model = str(bench_model_path())
    version = subprocess.run([str(args.venv / "bin" / "python"), "-c", "import lm_eval; print(lm_eval.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="lm_eval_compare_"))
    with open(work / "server.log", "w") as log:
        proc, base = start_server(Path(args.model), 6, 16, log, extra_args=args.serve_args.split())
        ours_args = (f"model={MODEL_NAME},base_url={base}/v1/completions,tokenizer_backend=huggingface,"
                     f"tokenizer={args.model},tokenized_requests=True,num_concurrent=1,max_retries=1")
        try:
            lm_eval(args.venv, "local-completions", ours_args, args.tasks, work / "folovllm", args.batch_size,
                    work / "lm_eval_folovllm.log")
        finally:
            stop_server(proc)
    hf_args = f"pretrained={args.model},dtype=float32"
    lm_eval(args.venv, "hf", hf_args, args.tasks, work / "hf", args.batch_size, work / "lm_eval_hf.log")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = compare(args.tasks, read_run(work / "folovllm"), read_run(work / "hf"), tokenizer)
    hf_spread = None
    if args.hf_batch_size_too:  # HF against itself at another batch size: its own float32 noise
        lm_eval(args.venv, "hf", hf_args, args.tasks, work / "hf2", args.hf_batch_size_too, work / "lm_eval_hf2.log")
        hf_spread = compare(args.tasks, read_run(work / "hf2"), read_run(work / "hf"), tokenizer)
    result = result_record("benchmarks.lm_eval_compare", argv, lm_eval_version=version, model=args.model,
                           batch_size=args.batch_size, model_args=dict(folovllm=ours_args.replace(base, "http://HOST:PORT"),
                                                                       hf=hf_args), tasks=rows,
                           hf_batch_size_too=args.hf_batch_size_too, hf_vs_hf=hf_spread, work_dir=str(work))
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(RESULTS_DIR, args.name, result, text)
    # float32 sums of a random model's log-likelihoods reach hundreds of nats, where one float32
    # ulp is ~3e-5: the tolerance is per scored token (HF itself sums in float32)
    ok = all(r.get("within_tolerance", True) for r in rows) and all(
        r.get("identical_generations", r["samples"]) == r["samples"] for r in rows) and all(
        v["folovllm"] == v["hf"] for r in rows if r["task"] != "folo_ppl" for v in r["metrics"].values())
    print("lm-eval comparison:", "OK" if ok else "DIFFERENCES (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
