"""Cases for stage 04's Triton kernels, run as a script so that a kernel that reads out of bounds
kills this process, not pytest (`test_04_triton.py` runs it in a subprocess).

    python stages/04/triton_cases.py GROUP [--device cpu|cuda] [--dtypes float32 float16 bfloat16]

GROUP is `store` (more kernels to come). On CPU the script sets `TRITON_INTERPRET=1` before
triton is imported (the interpreter runs the kernels with numpy); with `--device cuda` the same
cases run compiled on a GPU. One line per case, `ok <case> ...` or `FAIL <case> ...`; exit
status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

GROUPS = ("store",)
DTYPES = ("float32", "float16", "bfloat16")


def run_store_cases(dtype_name: str, device: str, seed: int) -> list[tuple[str, bool, str]]:
    """The store kernel must write exactly what `store_kv_cache` writes, and nothing else."""
    import torch

    from folovllm.attention_backends.triton_attn import store_kv_cache_triton
    from folovllm.layers.attention import store_kv_cache

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    results = []
    for hq, hkv, d, bs, num_tokens in [(4, 2, 64, 16, 1), (4, 4, 128, 32, 37), (8, 2, 64, 32, 70),
                                       (3, 1, 80, 16, 9)]:
        num_blocks = math.ceil(num_tokens / bs) + 3
        slots = torch.randperm(num_blocks * bs, generator=g)[:num_tokens]
        # k and v as the model makes them: strided views of one fused qkv projection
        qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=g).to(dtype)
        k = qkv[:, hq * d:(hq + hkv) * d].view(num_tokens, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(num_tokens, hkv, d)
        caches = [torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype) for _ in range(2)]
        ref_k, ref_v = caches[0].clone(), caches[1].clone()
        store_kv_cache(k, v, ref_k, ref_v, slots)
        key_cache, value_cache = (c.to(device) for c in caches)
        store_kv_cache_triton(k.to(device), v.to(device), key_cache, value_cache, slots.to(device))
        ok = torch.equal(key_cache.cpu(), ref_k) and torch.equal(value_cache.cpu(), ref_v)
        name = f"store[T={num_tokens} Hkv={hkv} D={d} bs={bs} {dtype_name}]"
        results.append((name, ok, "" if ok else "cache differs from store_kv_cache"))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=(*GROUPS, "all"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

    import torch

    torch.set_num_threads(1)
    results = []
    for dtype in args.dtypes:
        results += run_store_cases(dtype, args.device, args.seed)
    for name, ok, msg in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name} {msg}", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
