"""Cases for stage 04's Triton kernels, run as a script so that a kernel that reads out of bounds
kills this process, not pytest (`test_04_triton.py` runs it in a subprocess).

    python stages/04/triton_cases.py GROUP [--device cpu|cuda] [--dtypes float32 float16 bfloat16]

GROUP is one of `store`, `decode`, `prefill`, `mixed`, or `all`; `compile` builds the kernels for
an H100 without a GPU (`run_compile_cases`), `engine` runs the whole engine (`run_engine`). On CPU the script sets
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
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GROUPS = ("store", "decode", "prefill", "mixed")
# |triton - naive| <= atol + rtol * |naive|, per dtype
TOLERANCES = {"float32": (2e-5, 2e-5), "float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2)}


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
    path: str = "backend"  # backend | prefill (every row through the prefill kernel) | decode

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
    if group == "prefill":
        return [
            Case("prefill", (1, 5, 31, 33, 64), (1, 5, 31, 33, 64), heads=2, kv_heads=2,
                 path="prefill"),
            Case("prefill", (17, 40), (17, 40), heads=4, kv_heads=1, head_dim=128,
                 block_size=32, path="prefill"),
            # chunks of a prompt over cached context: query_len < seq_len
            Case("prefill_context", (17, 2, 40, 1), (50, 100, 41, 37), heads=4, kv_heads=2,
                 path="prefill"),
            Case("prefill_context", (33, 9), (65, 9), heads=4, kv_heads=4, head_dim=128,
                 block_size=32, path="prefill"),
            # contexts of 30 and 62 keys: the first query's last key is just below a KV tile
            # boundary (the unmasked loop must stop one tile early)
            Case("prefill_context", (5, 40), (35, 102), heads=2, kv_heads=1, path="prefill"),
        ]
    if group == "mixed":
        # decodes, prefills and chunked prefills in one batch, through TritonAttentionBackend
        return [
            Case("mixed", (1, 20, 1, 35, 3), (17, 20, 1, 80, 48), heads=4, kv_heads=1),
            Case("mixed", (1, 33, 1), (64, 33, 300), heads=2, kv_heads=2, head_dim=128,
                 block_size=32, num_splits=2),
        ]
    raise ValueError(group)


def build(case: Case, dtype, device, seed: int):
    """Random q [T, Hq, D], a paged cache holding every sequence's K/V, and the metadata."""
    from tests.attention_utils import Batch, random_paged_batch

    batch = Batch(case.query_lens, case.seq_lens, case.heads, case.kv_heads, case.head_dim, case.block_size)
    return random_paged_batch(batch, dtype, seed, device)


def run_attention_case(case: Case, dtype_name: str, device: str, seed: int) -> tuple[bool, str]:
    import torch

    from folovllm.model_executor.attention_backends.triton_attn import (
        TritonAttentionBackend,
        paged_decode_attention,
        prefill_attention,
    )
    from folovllm.model_executor.layers.attention import naive_attention
    from tests.attention_utils import run_backend

    dtype = getattr(torch, dtype_name)
    q, key_cache, value_cache, md = build(case, dtype, device, seed)
    scale = case.head_dim**-0.5
    ref = naive_attention(q.float(), key_cache.float(), value_cache.float(), md, scale)
    if case.path == "backend":
        out = run_backend(TritonAttentionBackend(decode_num_splits=case.num_splits),
                          q, key_cache, value_cache, md, scale)
        # The same two launches into a NaN-filled output: every row must be written once.
        again = torch.full_like(q, float("nan"))
        prefill_attention(q, key_cache, value_cache, md, scale, again, skip_decodes=True)
        paged_decode_attention(q, key_cache, value_cache, md, scale, again,
                               num_splits=case.num_splits)
        if not torch.equal(out, again):
            return False, "forward() differs from its two launches (a row left unwritten?)"
    elif case.path == "prefill":
        out = prefill_attention(q, key_cache, value_cache, md, scale,
                                torch.full_like(q, float("nan")))
    elif case.path == "decode":
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

    from folovllm.model_executor.attention_backends.triton_attn import store_kv_cache_triton
    from folovllm.model_executor.layers.attention import store_kv_cache

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


def run_compile_cases(dtype_name: str) -> list[tuple[str, bool, str]]:
    """Compile each kernel variant the launcher would use on an H100 down to a cubin (sm_90),
    no GPU needed: catches what the interpreter lets through but the compiler rejects (types
    of loop-carried values, dot shapes), and reports the shared memory each variant needs.

    Arguments are typed as the JIT would type them: `*_ptr` by their tensors' dtype, strides
    as i32 divisible by 16 (so loads vectorise and pipeline, as they do in a real launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from folovllm.model_executor.attention_backends import triton_kernels as K
    from folovllm.model_executor.attention_backends.triton_attn import decode_config, prefill_config

    import torch

    data = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype_name]
    dtype = getattr(torch, dtype_name)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    hq, hkv, d, bs = 16, 8, 128, 16  # Qwen3-0.6B
    pre, dec = prefill_config(d, dtype), decode_config(d, dtype)
    variants = [
        ("store", K.store_kvcache_kernel, 4, 1,
         dict(NUM_KV_HEADS=hkv, HEAD_DIM=d, HEADS_PAD=hkv, DIM_PAD=d)),
        (f"prefill {pre}", K.prefill_attention_kernel, pre.num_warps, pre.num_stages,
         dict(BLOCK_SIZE=bs, GROUP=hq // hkv, HEAD_DIM=d, DIM_PAD=d, BLOCK_M=pre.block_m,
              BLOCK_N=pre.block_n, SKIP_DECODES=True, DOT_PRECISION=precision)),
    ]
    for splits in (1, 4):
        variants.append((
            f"decode splits={splits} {dec}", K.paged_decode_kernel, dec.num_warps, dec.num_stages,
            dict(NUM_HEADS=hq, BLOCK_SIZE=bs, GROUP=hq // hkv, GROUP_PAD=dec.block_m,
                 HEAD_DIM=d, DIM_PAD=d, BLOCK_N=dec.block_n, NUM_SPLITS=splits,
                 DOT_PRECISION=precision)))
    variants.append(("reduce", K.decode_reduce_kernel, 4, 1,
                     dict(NUM_HEADS=hq, HEAD_DIM=d, DIM_PAD=d, NUM_SPLITS=4, SPLITS_PAD=4)))

    def arg_type(name: str) -> str:
        if name.startswith("part_"):
            return "*fp32"
        if name in ("query_start_loc_ptr", "seq_lens_ptr", "block_tables_ptr", "slot_mapping_ptr"):
            return "*i64"
        if name.endswith("_ptr"):
            return "*" + data
        return "fp32" if name == "scale_log2e" else "i32"

    results = []
    for name, fn, num_warps, num_stages, constexprs in variants:
        signature = {a: "constexpr" if a in constexprs else arg_type(a) for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in constexprs and (a.endswith("_ptr") or a.startswith("stride"))}
        label = f"compile sm_90 {name} {dtype_name}"
        try:
            kernel = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": num_warps, "num_stages": num_stages},
            )
            results.append((label, True, f"shared={kernel.metadata.shared}B"))
        except Exception as e:
            results.append((label, False, f"{type(e).__name__}: {str(e)[-2000:]}"))
    return results


def run_engine(model: str, requests: str) -> None:
    """Greedy generation through the whole engine (stage 4, paged cache, continuous batching)
    with the triton backend; prints the generated ids as JSON on the last line.

    `requests` is JSON: {"prompts": [[ids]], "max_tokens": [n], "max_num_seqs": n}."""
    from folovllm import LLM, SamplingParams

    spec = json.loads(requests)
    llm = LLM(model, stage=4, dtype="float32", device=spec.get("device", "cpu"),
              max_num_seqs=spec["max_num_seqs"], max_model_len=256, attention_backend="triton")
    params = [SamplingParams(temperature=0, max_tokens=n) for n in spec["max_tokens"]]
    outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    print(json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=(*GROUPS, "all", "compile", "engine"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=tuple(TOLERANCES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="engine: a checkpoint folder")
    parser.add_argument("--requests", help="engine: JSON, see run_engine")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.group != "compile":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

    import torch

    torch.set_num_threads(1)
    if args.group == "engine":
        run_engine(args.model, args.requests)
        return 0
    results = []
    if args.group == "compile":
        for dtype in args.dtypes:
            results += run_compile_cases(dtype)
    for dtype in args.dtypes if args.group != "compile" else ():
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
