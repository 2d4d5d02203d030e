"""The C++ LoRA op alone (csrc/cpu/lora.cpp) on the bench model's four LoRA layers (qkv, o,
gate_up, down), 4 slots, one thread: CPU µs per call summed over the four layers, printed.

    python -m benchmarks.stage11_lora_op            # float32
    python -m benchmarks.stage11_lora_op bf16
    FOLOVLLM_CPU_ISA=avx2 python -m benchmarks.stage11_lora_op

Cases: a decode step (16 tokens over 4 adapters, interleaved: the gathered SGMV layout) and a
prefill (4 segments of 64 tokens), with rank-16 adapters in `max_lora_rank` 16 and 64 slots;
SGMV and BGMV each. Each call is timed with `time.thread_time` (the op runs in this thread on
one torch thread), median of 30-200 calls. Run from a checkout of an older commit, the script
calls that commit's kernel signature (before per-slot ranks: no `ranks` argument, slots in
vLLM's contiguous layout), which is how the stage page's "before" column was measured.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from typing import Callable

import torch

from folovllm.lora import punica_wrapper as pw

NEW = "ranks" in inspect.signature(pw.sgmv_add_lora_cpu).parameters
SLOTS = 4
LAYERS = {"qkv": (512, [512, 256, 256]), "o": (512, [512]), "gate_up": (512, [1536, 1536]), "down": (1536, [512])}


def stacks(n_in: int, parts: list[int], R: int, r: int, dtype: torch.dtype):
    """The slots as `LinearWithLoRA` stores them (Aᵀ rows padded to 16, Bᵀ; vLLM-layout views),
    every slot holding a rank-r adapter, and their true ranks."""
    g = torch.Generator().manual_seed(0)
    P = len(parts)
    W = -(-P * R // 16) * 16
    a = torch.zeros(SLOTS, n_in, W, dtype=dtype)[:, :, :P * R].transpose(1, 2)  # [S, P*R, in]
    bs = [torch.zeros(SLOTS, R, out, dtype=dtype).transpose(1, 2) for out in parts]  # [S, out, R]
    for p, out in enumerate(parts):
        a[:, p * R:p * R + r] = (torch.randn(SLOTS, r, n_in, generator=g) * 0.05).to(dtype)
        bs[p][:, :, :r] = (torch.randn(SLOTS, out, r, generator=g) * 0.05).to(dtype)
    if not NEW:  # the older kernel takes vLLM's contiguous layout
        a, bs = a.contiguous(), [b.contiguous() for b in bs]
    return a, bs, torch.full((SLOTS, P), r, dtype=torch.long)


def median_us(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1e3


def main() -> int:
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    for R, r in ((16, 16), (64, 16)):
        for case, token_slots in (("decode, 16 tokens", [i % SLOTS for i in range(16)]),
                                  ("prefill, 4 x 64 tokens", [i // 64 for i in range(256)])):
            total = {"sgmv": 0.0, "bgmv": 0.0}
            for n_in, parts in LAYERS.values():
                a, bs, ranks = stacks(n_in, parts, R, r, dtype)
                T = len(token_slots)
                x, y = torch.randn(T, n_in).to(dtype), torch.zeros(T, sum(parts), dtype=dtype)
                segments = pw.SGMVSegments.from_token_slots(token_slots, x.device)
                table, slots = segments.table(), torch.tensor(token_slots)
                kw = dict(ranks=ranks) if NEW else {}
                reps = 200 if T <= 16 else 30
                total["sgmv"] += median_us(lambda: pw.sgmv_add_lora_cpu(y, x, a, bs, table, segments.order, **kw), reps)
                total["bgmv"] += median_us(lambda: pw.bgmv_add_lora_cpu(y, x, a, bs, slots, **kw), reps)
            print(f"{name} max_lora_rank={R} rank={r} {case}: SGMV {total['sgmv']:.0f} us, "
                  f"BGMV {total['bgmv']:.0f} us (4 layers)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
