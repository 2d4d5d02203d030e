"""Is a request's log-probability independent of the batch around it? A probe, not a timing.

    python -m benchmarks.logprobs_invariance                          # our kernels, float32
    python -m benchmarks.logprobs_invariance --custom-ops none        # the torch code (sdpa)
    python -m benchmarks.logprobs_invariance --batch-invariant        # the mode (batch_invariant=True)
    FOLOVLLM_CPU_ISA=avx2 python -m benchmarks.logprobs_invariance    # the AVX2 path

A seeded request (29-token prompt, temperature 0.8, `logprobs=5`, 24 tokens) runs alone on the
tiny Qwen3 of the tests, then in each situation below; each line says whether its tokens and its
log-probabilities (sampled token and top 5 at every position) are bitwise those of the run alone,
and the largest difference. The last line is the RL check: prompt + output fed back as a prompt
with `prompt_logprobs`, whose scores of the output positions should equal the sampled ones.
`--batch-invariant` runs every engine in the batch-invariant mode (folovllm/batch_invariant.py).
docs/logprobs.md quotes the output.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from folovllm import LLM, SamplingParams
from folovllm.testing.tiny_model import build_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--custom-ops", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-invariant", action="store_true", help="the engine's batch-invariant mode")
    args = parser.parse_args()
    path = str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "qwen3", arch="qwen3"))
    rng = random.Random(0)
    target = [rng.randrange(500) for _ in range(29)]
    others = [[rng.randrange(500) for _ in range(n)]
              for n in (1, 3, 5, 8, 11, 17, 23, 31, 40, 47, 55, 64, 70, 90, 120)]
    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=24, ignore_eos=True, logprobs=5)
    other_params = [SamplingParams(temperature=0.8, seed=i, max_tokens=5 + 3 * i, ignore_eos=True)
                    for i in range(15)]

    def engine(threads: int = 1, **kw: Any) -> LLM:
        torch.set_num_threads(threads)
        kw.setdefault("max_num_seqs", 16)
        return LLM(path, dtype=args.dtype, max_model_len=256, custom_ops=args.custom_ops,
                   attention_backend=args.attention_backend, batch_invariant=args.batch_invariant, **kw)

    def scored(completion: Any) -> tuple[list[int], list[list[tuple[int, float]]]]:
        return completion.token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in completion.logprobs]

    def alone(llm: LLM) -> Any:
        return scored(llm.generate([target], params, use_tqdm=False)[0].outputs[0])

    def in_batch(llm: LLM, n: int = 15) -> Any:
        outs = llm.generate([*others[:7], target, *others[7:n]], [*other_params[:7], params, *other_params[7:n]],
                            use_tqdm=False)
        return scored(outs[7].outputs[0])

    llm = engine()
    reference = alone(llm)
    runs = {"in a batch of 16": in_batch(llm), "prefix cached (run again)": alone(llm)}
    chunked = engine(max_num_batched_tokens=13, max_num_seqs=13)
    runs["chunked, budget 13 (13+13+3)"] = alone(chunked)
    runs["chunked, budget 13, in a batch of 13"] = in_batch(chunked, 12)
    runs["chunked, budget 14 (14+14+1: a 1-token chunk)"] = alone(engine(max_num_batched_tokens=14, max_num_seqs=14))
    two = engine(threads=2)
    runs["2 threads"] = alone(two)
    runs["2 threads, in a batch of 16"] = in_batch(two)
    torch.set_num_threads(1)
    tokens = reference[0]
    again = llm.generate([target + tokens], SamplingParams(max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    runs["RL: prompt + output scored as a prompt"] = (
        tokens, [sorted((t, lp.logprob) for t, lp in d.items()) for d in again.prompt_logprobs[len(target):]])
    print(f"{'situation':46s} tokens  bitwise  max |difference|")
    for name, (run_tokens, run_logprobs) in runs.items():
        diffs = [abs(a[1] - b[1]) for ra, rb in zip(run_logprobs, reference[1]) for a, b in zip(ra, rb) if a[0] == b[0]]
        same = run_tokens == reference[0]
        print(f"{name:46s} {'same' if same else 'DIFF':6s}  {str(same and run_logprobs == reference[1]):7s}  "
              f"{max(diffs, default=0.0):.2g}")


if __name__ == "__main__":
    main()
