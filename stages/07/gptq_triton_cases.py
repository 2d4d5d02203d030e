"""Cases for stage 07's Triton GPTQ kernel, run as a script so that a kernel that reads out of
bounds kills this process, not pytest (`test_07_gptq.py` runs it in a subprocess).

    python stages/07/gptq_triton_cases.py [--device cpu|cuda]

On CPU it sets `TRITON_INTERPRET=1` before triton is imported. Each case draws random codes,
zeros, scales and a g_idx (in order, or an act-order permutation), runs `gptq_matmul_triton` and
`gptq_matmul_reference` on the same inputs, and prints `ok <case> max_err=...` or `FAIL ...`;
exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# (M tokens, K inputs, N outputs, group size, act-order, bits, bias); zeros are v2 (real zeros):
# a v1 checkpoint is converted once at load, before any kernel sees it
CASES = [
    (1, 64, 32, 32, False, 4, False),
    (3, 128, 96, 32, True, 4, True),
    (17, 96, 64, -1, False, 4, True),  # M and N not multiples of the tiles
    (5, 128, 48, 64, True, 8, False),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from folovllm.model_executor.layers.quantization.gptq import gptq_matmul_reference, pack_int32
    from folovllm.model_executor.layers.quantization.gptq_triton import gptq_matmul_triton

    failed = 0
    for i, (M, K, N, gs, act_order, bits, bias) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        group = K if gs == -1 else gs
        maxq = 2**bits - 1
        codes = torch.randint(0, maxq + 1, (K, N), generator=g)
        zeros = torch.randint(0, maxq + 1, (K // group, N), generator=g)
        order = torch.randperm(K, generator=g) if act_order else torch.arange(K)
        g_idx = (order // group).to(torch.int32)  # input order[k] ... any permutation of groups
        scales = torch.rand(K // group, N, generator=g) * 0.1 + 0.01
        qweight = pack_int32(codes, bits, 0)
        qzeros = pack_int32(zeros, bits, 1)
        x = torch.randn(M, K, generator=g)
        b = torch.randn(N, generator=g) if bias else None
        dev = torch.device(args.device)
        t = [t.to(dev) if t is not None else None for t in (x, qweight, qzeros, scales, g_idx, b)]
        got = gptq_matmul_triton(t[0], t[1], t[2], t[3], t[4], bits, t[5]).cpu()
        want = gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bits, b)
        err = (got - want).abs().max().item()
        tol = 1e-4 * max(1.0, want.abs().max().item()) if args.device == "cpu" else 2e-2 * want.abs().max().item()
        name = f"M{M}_K{K}_N{N}_g{gs}_{'act' if act_order else 'seq'}_b{bits}"
        ok = err <= tol
        failed += not ok
        print(f"{'ok' if ok else 'FAIL'} {name} max_err={err:.3g} tol={tol:.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
