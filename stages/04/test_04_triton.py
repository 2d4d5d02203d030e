"""Stage 04: our Triton kernels (`folovllm/model_executor/attention_backends/triton_kernels.py`) against the
plain-torch reference `naive_attention`, and the engine with the triton backend against HF.

On a CPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`), each group of cases in
a subprocess (`triton_cases.py`): a kernel that reads out of bounds segfaults that process and
fails its test, instead of taking pytest down. On a machine with CUDA the same cases also run
compiled, in bfloat16 too (the interpreter's bfloat16 arithmetic is not faithful).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_cases.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds per subprocess; a kernel stuck in a loop fails instead of hanging


def run_script(*args: str, device: str = "cpu") -> list[str]:
    """Run triton_cases.py; fail with its output unless it exits 0. Returns its stdout lines.
    (The script itself sets TRITON_INTERPRET=1 on CPU, except to compile for a GPU.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(
            [sys.executable, str(CASES), *args, "--device", device],
            capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"triton_cases.py {' '.join(args)} ran past {TIMEOUT}s:\n{e.stdout}")
    if proc.returncode < 0:
        why = f"killed by {signal.Signals(-proc.returncode).name} (an out-of-bounds access?)"
    else:
        why = f"exit status {proc.returncode}"
    assert proc.returncode == 0, (
        f"triton_cases.py {' '.join(args)}: {why}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout.splitlines()


@pytest.mark.parametrize("group", ["store", "decode", "prefill", "mixed"])
def test_kernels_match_naive_attention_interpreted(group):
    """store: bit-equal to `store_kv_cache` (strided k/v views of a fused qkv, head_dim 80).
    decode: lengths 1, 15, 16, 17, 33, 70, 130; GQA 1/2/4; head_dim 64/128; blocks 16/32;
    1, 2 (heuristic), 3 and 4 splits. prefill: varlen batches from 1 to 64 tokens, with cached
    context (query_len < seq_len), contexts ending one key before a KV tile. mixed: decodes,
    prefills and chunked prefills in one batch through `TritonAttentionBackend.forward`.
    float32 within 2e-5, float16 within 3e-3 of float32 naive attention on the same inputs."""
    lines = run_script(group, "--dtypes", "float32", "float16")
    assert lines and all(line.startswith("ok") for line in lines), "\n".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
def test_kernels_match_naive_attention_compiled_on_gpu():
    lines = run_script("all", "--dtypes", "float32", "float16", "bfloat16", device="cuda")
    assert lines and all(line.startswith("ok") for line in lines), "\n".join(lines)


def test_kernels_compile_for_h100_without_a_gpu():
    """Every kernel variant the launcher uses for Qwen3-0.6B shapes in bfloat16, compiled to an
    sm_90 cubin: the interpreter accepts code the compiler rejects, and this needs no GPU."""
    pytest.importorskip("triton.backends.nvidia")
    lines = run_script("compile", "--dtypes", "bfloat16")
    assert lines and all(line.startswith("ok") for line in lines), "\n".join(lines)


def test_engine_greedy_matches_hf_with_triton_backend(greedy_reference):
    """The whole engine at stage 4 with `attention_backend="triton"`: prompts of 1, 33 and 129
    tokens (across blocks and query tiles), two running at a time, so the third joins while the
    others decode (a step with a prefill and decodes). Greedy ids must equal HF's."""
    ref = greedy_reference("qwen3")
    lens = [len(p) for p in ref.prompts]
    picked = [lens.index(n) for n in (33, 1, 129)]
    prompts = [ref.prompts[i] for i in picked]
    max_tokens = [min(ref.max_tokens[i], cap) for i, cap in zip(picked, (3, 6, 5))]
    expected = [ref.outputs[i][:n] for i, n in zip(picked, max_tokens)]  # greedy: a prefix
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = {"prompts": prompts, "max_tokens": max_tokens, "max_num_seqs": 2, "device": device}
    lines = run_script("engine", "--model", str(ref.path), "--requests", json.dumps(spec),
                       device=device)
    assert json.loads(lines[-1]) == expected


def test_decode_split_heuristic():
    """Split a few long contexts; never split a batch that already fills the GPU, nor below
    MIN_KEYS_PER_SPLIT keys per split; always a power of two."""
    from folovllm.model_executor.attention_backends.triton_attn import MAX_DECODE_SPLITS, decode_num_splits

    assert decode_num_splits(1, 8, 4096, num_sms=132) == MAX_DECODE_SPLITS
    assert decode_num_splits(1, 1, 600, num_sms=132) == 2  # the `decode_auto` case
    assert decode_num_splits(256, 8, 4096, num_sms=132) == 1
    assert decode_num_splits(1, 8, 100, num_sms=132) == 1
    for seqs in (1, 3, 17, 64):
        for length in (1, 300, 1000, 5000, 100_000):
            n = decode_num_splits(seqs, 8, length, num_sms=132)
            assert 1 <= n <= MAX_DECODE_SPLITS and n & (n - 1) == 0


def test_registry_returns_the_triton_backend():
    from folovllm.model_executor.attention_backends import get_attn_backend
    from folovllm.model_executor.attention_backends.triton_attn import TritonAttentionBackend

    assert isinstance(get_attn_backend("triton"), TritonAttentionBackend)
