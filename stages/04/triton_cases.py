"""Cases for stage 04's Triton kernels, run as a script so that a kernel that reads out of bounds
kills this process, not pytest (`test_04_triton.py` runs it in a subprocess).

    python stages/04/triton_cases.py GROUP [--device cpu|cuda] [--dtypes float32 float16 bfloat16]

GROUP is one of `store`, `decode`, or `all`. On CPU the script sets
`TRITON_INTERPRET=1` before triton is imported (the interpreter runs the kernels with numpy);
with `--device cuda` the same cases run compiled on a GPU. One line per case,
`ok <case> max_err=...` or `FAIL <case> ...`; exit status 1 if any case failed.

Every case builds a random paged cache the way the engine does: each sequence's blocks are
scattered over the pool in random order, the slots nobody owns hold 100.0 (a kernel that reads a
key it must not see gets a visibly wrong answer), and the reference is `naive_attention` in
float32 on the same (rounded) inputs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

GROUPS = ("store", "decode")
# |triton - naive| <= atol + rtol * |naive|, per dtype
TOLERANCES = {"float32": (2e-5, 2e-5), "float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2)}
UNOWNED = 100.0  # what the cache holds in slots that no sequence owns


@dataclass(frozen=True)
class Case:
    """One batch: sequence b has seq_lens[b] tokens, the last query_lens[b] of them new."""

    name: str
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    num_splits: Optional[int] = None  # decode: None lets the heuristic choose
    path: str = "decode"

    def label(self, dtype: str) -> str:
        return (f"{self.name}[q={list(self.query_lens)} s={list(self.seq_lens)} "
                f"H={self.heads}/{self.kv_heads} D={self.head_dim} bs={self.block_size} "
                f"splits={self.num_splits} {self.path} {dtype}]")


def cases(group: str) -> list[Case]:
    """Small shapes (the interpreter runs ~1 ms per tile op) that still cross every boundary:
    lengths 1, block +- 1, KV tile +- 1, query tiles of 32 +- 1, GQA ratios 1/2/4, head_dim
    64/128, block sizes 16/32."""
    if group == "decode":
        lens = (1, 15, 16, 17, 33, 70)
        ones = (1,) * len(lens)
        return [
            Case("decode", ones, lens, heads=4, kv_heads=4, num_splits=1, path="decode"),
            Case("decode", ones, lens, heads=4, kv_heads=2, block_size=32, num_splits=1,
                 path="decode"),
            Case("decode_split", ones, lens, heads=4, kv_heads=1, head_dim=128, num_splits=3,
                 path="decode"),
            Case("decode_split", (1, 1), (130, 64), heads=8, kv_heads=2, block_size=32,
                 num_splits=4, path="decode"),
            # the heuristic: 1 seq x 1 KV head, 600 keys -> 2 splits of >= 256 keys
            Case("decode_auto", (1,), (600,), heads=2, kv_heads=1, path="decode"),
        ]
    raise ValueError(group)


def build(case: Case, dtype, device, seed: int):
    """Random q [T, Hq, D], a paged cache holding every sequence's K/V, and the metadata."""
    import torch

    from folovllm.layers.attention import AttentionMetadata, store_kv_cache

    g = torch.Generator().manual_seed(seed)
    bs, hkv, d = case.block_size, case.kv_heads, case.head_dim
    blocks_per_seq = [math.ceil(n / bs) for n in case.seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # two blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in blocks_per_seq]
    key_cache = torch.full((num_blocks, bs, hkv, d), UNOWNED, dtype=dtype)
    value_cache = torch.full_like(key_cache, UNOWNED)
    for n, table in zip(case.seq_lens, tables):
        slots = torch.tensor([table[j // bs] * bs + j % bs for j in range(n)])
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        store_kv_cache(k, v, key_cache, value_cache, slots)
    q = torch.randn(sum(case.query_lens), case.heads, d, generator=g).to(dtype)
    width = max(blocks_per_seq)
    qsl = [0]
    for n in case.query_lens:
        qsl.append(qsl[-1] + n)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(len(q), dtype=torch.long, device=device),  # unused here
        query_start_loc=torch.tensor(qsl, device=device),
        seq_lens=torch.tensor(case.seq_lens, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        max_query_len=max(case.query_lens),
        max_seq_len=max(case.seq_lens),
    )
    return q.to(device), key_cache.to(device), value_cache.to(device), md


def run_attention_case(case: Case, dtype_name: str, device: str, seed: int) -> tuple[bool, str]:
    import torch

    from folovllm.attention_backends.triton_attn import paged_decode_attention
    from folovllm.layers.attention import naive_attention

    dtype = getattr(torch, dtype_name)
    q, key_cache, value_cache, md = build(case, dtype, device, seed)
    scale = case.head_dim**-0.5
    ref = naive_attention(q.float(), key_cache.float(), value_cache.float(), md, scale)
    if case.path == "decode":
        out = paged_decode_attention(q, key_cache, value_cache, md, scale,
                                     torch.full_like(q, float("nan")), num_splits=case.num_splits)
    else:
        raise ValueError(case.path)
    if out.dtype != dtype or out.shape != q.shape:
        return False, f"output {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(q.shape)}"
    atol, rtol = TOLERANCES[dtype_name]
    out, ref = out.float().cpu(), ref.cpu()
    err = (out - ref).abs()
    bad = ~(err <= atol + rtol * ref.abs())  # NaN counts as bad
    max_err = err.nan_to_num(float("inf")).max().item()
    if bad.any():
        token = bad.nonzero()[0].tolist()
        return False, f"max_err={max_err:.3g}, first bad [token, head, dim] {token}"
    return True, f"max_err={max_err:.3g}"


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
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=tuple(TOLERANCES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

    import torch

    torch.set_num_threads(1)
    results = []
    for dtype in args.dtypes:
        for group in GROUPS if args.group == "all" else (args.group,):
            if group == "store":
                results += run_store_cases(dtype, args.device, args.seed)
                continue
            for i, case in enumerate(cases(group)):
                try:
                    ok, msg = run_attention_case(case, dtype, args.device, args.seed + i)
                except Exception as e:  # a compile or launch error fails this case only
                    ok, msg = False, f"{type(e).__name__}: {e}"
                results.append((case.label(dtype), ok, msg))
    for name, ok, msg in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name} {msg}", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
