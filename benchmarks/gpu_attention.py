"""Stage 04 on a GPU: are our Triton attention kernels right, and how fast are they?

    python -m benchmarks.gpu_attention              # correctness, prefill, decode (~2-3 min, H100)
    python -m benchmarks.gpu_attention --sweep      # + other prefill tiles and decode splits
    python -m benchmarks.gpu_attention --quick      # smaller sizes, a smoke run

Everything uses Qwen3-0.6B's attention shapes (16 query heads, 8 KV heads, head_dim 128) and a
paged cache of 16-token blocks scattered over the pool in random order, as the engine makes it.

1. Correctness, float16 and bfloat16: a mixed batch (prefills, prefills over cached context,
   decodes, a long decode) through `TritonAttentionBackend` against `naive_attention` in
   float32 on the same inputs, and against torch SDPA in the same dtype; the decode kernel with
   1, 4 and 16 splits too.
2. Prefill: one causal sequence of 1k/2k/4k/8k tokens, and a varlen batch of 16 prompts of
   100..1024 tokens. TFLOP/s counts the useful work of causal attention,
   4 * Hq * D * N(N+1)/2 per sequence, for every system: triton (K/V read through the block
   table), sdpa (dense contiguous K/V, GQA heads expanded beforehand: SDPA's best case),
   naive (gather + materialised scores; skipped when it does not fit).
3. Decode: 64 sequences x 1k / 4k context, one new token each. Achieved GB/s = K/V bytes read
   (2 * B * ctx * Hkv * D * 2 bytes) / time, next to what `torch.Tensor.copy_` reaches on the
   same GPU (read + write bytes / time), for the split heuristic and every fixed split count.

Times are medians of `triton.testing.do_bench` (which flushes L2 between runs). Results go to
`$OUT/gpu_attention.json` when $OUT is set, else `benchmarks/results/gpu_attention_<gpu>.json`,
with the GPU name, versions and git commit. Importing this module needs no GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.results import RESULTS_DIR, result_record, write_results
from folovllm.model_executor.layers.attention import AttentionMetadata, naive_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16  # Qwen3-0.6B attention
DEVICE = "cuda"
PREFILL_LENS = (1024, 2048, 4096, 8192)   # one sequence each; --quick keeps the first two
VARLEN_PROMPTS = (16, 100, 1024)          # a batch of 16 prompts, lengths uniform in 100..1024
DECODE_BATCH, DECODE_CONTEXTS = 64, (1024, 4096)   # --quick keeps the first context
CHECK_BATCH = ([1, 300, 1, 77, 1, 16], [1000, 300, 4097, 200, 17, 40])  # query lens, seq lens
# |triton - naive float32| <= atol + rtol * |naive| (one rounding of the output and of p to the
# dtype, over contexts of thousands of keys)
TOLERANCE = {torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


# -- inputs ------------------------------------------------------------------------------------

def paged_batch(
    query_lens: list[int], seq_lens: list[int], dtype: torch.dtype, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor],
           list[torch.Tensor]]:
    """q [T, Hq, D], caches [num_blocks, 16, Hkv, D] with every sequence's K/V in randomly
    placed blocks, the metadata, and each sequence's dense K and V [seq_len, Hkv, D]."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks) + 1
    perm = torch.randperm(num_blocks, device=DEVICE, generator=g)
    tables, start = [], 0
    for n in blocks:
        tables.append(perm[start:start + n].tolist())
        start += n
    positions = torch.cat([torch.arange(n - m, n) for n, m in zip(seq_lens, query_lens)])
    md = AttentionMetadata.from_lists(query_lens, seq_lens, tables, positions.to(DEVICE), BLOCK_SIZE)
    block_tables = md.block_tables
    key_cache = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    ks, vs = [], []
    for b, n in enumerate(seq_lens):
        k = torch.randn(n, KV_HEADS, HEAD_DIM, device=DEVICE, generator=g).to(dtype)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, device=DEVICE, generator=g).to(dtype)
        pos = torch.arange(n, device=DEVICE)
        slots = block_tables[b, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        key_cache.view(-1, KV_HEADS, HEAD_DIM)[slots] = k
        value_cache.view(-1, KV_HEADS, HEAD_DIM)[slots] = v
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, device=DEVICE, generator=g).to(dtype)
    return q, key_cache, value_cache, md, ks, vs


def sdpa_reference(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                   query_lens: list[int], scale: float) -> torch.Tensor:
    """torch SDPA one sequence at a time, in q's dtype; the mask puts query i at position
    seq_len - query_len + i (is_causal would align it to key 0, wrong with cached context)."""
    outs, start = [], 0
    group = HEADS // KV_HEADS
    for k, v, n in zip(ks, vs, query_lens):
        qb = q[start:start + n].transpose(0, 1)[None]  # [1, Hq, n, D]
        kb = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, Hq, L, D]
        vb = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        pos = len(k) - n + torch.arange(n, device=q.device)
        mask = torch.arange(len(k), device=q.device)[None, :] <= pos[:, None]  # [n, L]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        outs.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


# -- timing ------------------------------------------------------------------------------------

def bench_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gb_s() -> float:
    """What a plain device-to-device copy reaches: (read + write) bytes / time."""
    x = torch.empty(256 * 2**20, dtype=torch.bfloat16, device=DEVICE)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def causal_flops(query_lens: list[int], seq_lens: list[int]) -> float:
    """Useful FLOPs: 2 matmuls x 2 FLOPs x D per visible (query, key) pair, every head."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens))
    return 4.0 * HEADS * HEAD_DIM * pairs


# -- the three parts ---------------------------------------------------------------------------

def check_correctness(backend_cls: Any, decode_fn: Callable, quick: bool) -> list[dict]:
    rows = []
    query_lens, seq_lens = CHECK_BATCH
    for dtype in (torch.float16, torch.bfloat16):
        q, kc, vc, md, ks, vs = paged_batch(query_lens, seq_lens, dtype, seed=1)
        scale = HEAD_DIM**-0.5
        ref = naive_attention(q.float(), kc.float(), vc.float(), md, scale)
        sdpa = sdpa_reference(q, ks, vs, query_lens, scale).float()
        atol, rtol = TOLERANCE[dtype]
        backend = backend_cls()
        outs = {"triton": backend.forward(q, kc, vc, backend.build_metadata(md, kc), scale)}
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        for splits in (1, 4, 16):
            out = torch.full_like(q, float("nan"))
            decode_fn(q, kc, vc, md, scale, out, num_splits=splits)
            outs[f"decode kernel, {splits} splits"] = out
        qsl = md.query_start_loc_cpu
        decode_rows = torch.tensor([qsl[i] for i in decodes], device=DEVICE)
        for name, out in outs.items():
            rows_used = decode_rows if name.startswith("decode") else slice(None)
            o, r, s = out.float()[rows_used], ref[rows_used], sdpa[rows_used]
            err = (o - r).abs()
            ok = bool((err <= atol + rtol * r.abs()).all())  # NaN fails
            rows.append(dict(
                dtype=str(dtype).removeprefix("torch."), system=name,
                max_err_vs_naive_fp32=float(err.nan_to_num(float("inf")).max()),
                max_err_vs_sdpa=float((o - s).abs().nan_to_num(float("inf")).max()),
                sdpa_max_err_vs_naive_fp32=float((s - r).abs().max()),
                ok=ok,
            ))
    return rows


def bench_prefill(backend: Any, prefill_fn: Callable, tile_config_cls: Any, dtype: torch.dtype,
                  quick: bool, sweep: bool) -> list[dict]:
    rows = []
    workloads: list[tuple[str, list[int]]] = [
        (f"1 x {n}", [n]) for n in (PREFILL_LENS[:2] if quick else PREFILL_LENS)
    ]
    g = torch.Generator().manual_seed(0)
    count, low, high = VARLEN_PROMPTS
    workloads.append((f"{count} x {low}..{high}",
                      torch.randint(low, high + 1, (count,), generator=g).tolist()))
    scale = HEAD_DIM**-0.5
    group = HEADS // KV_HEADS
    for name, lens in workloads:
        q, kc, vc, md, ks, vs = paged_batch(lens, lens, dtype)
        backend_md = backend.build_metadata(md, kc)  # once per step, outside the timed layer
        flops = causal_flops(lens, lens)
        # SDPA's best case: dense per-sequence K/V with the GQA heads expanded beforehand.
        dense = []
        start = 0
        for k, v, n in zip(ks, vs, lens):
            dense.append((q[start:start + n].transpose(0, 1)[None],
                          k.repeat_interleave(group, 1).transpose(0, 1)[None].contiguous(),
                          v.repeat_interleave(group, 1).transpose(0, 1)[None].contiguous()))
            start += n

        def sdpa() -> None:
            for qb, kb, vb in dense:
                F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)

        systems: dict[str, Callable[[], Any]] = {
            "triton": lambda: backend.forward(q, kc, vc, backend_md, scale),
            "sdpa": sdpa,
            "naive": lambda: naive_attention(q, kc, vc, md, scale),
        }
        if sweep:
            out = torch.empty_like(q)
            for bm, bn, warps, stages in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                          (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)]:
                cfg = tile_config_cls(bm, bn, warps, stages)
                systems[f"triton {bm}x{bn} w{warps} s{stages}"] = (
                    lambda cfg=cfg: prefill_fn(q, kc, vc, md, scale, out, config=cfg))
        for system, fn in systems.items():
            try:
                ms = bench_ms(fn)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(workload=name, tokens=sum(lens), system=system, ms=None,
                                 tflops=None, note="out of memory"))
                continue
            except Exception as e:  # a tile config that does not compile: keep going
                rows.append(dict(workload=name, tokens=sum(lens), system=system, ms=None,
                                 tflops=None, note=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            rows.append(dict(workload=name, tokens=sum(lens), system=system, ms=ms,
                             tflops=flops / (ms * 1e-3) / 1e12))
        del q, kc, vc, ks, vs, dense
        torch.cuda.empty_cache()
    return rows


def bench_decode(backend_cls: Any, split_heuristic: Callable, dtype: torch.dtype, quick: bool,
                 copy_gb_s: float, num_sms: int) -> list[dict]:
    rows = []
    batch = DECODE_BATCH
    scale = HEAD_DIM**-0.5
    group = HEADS // KV_HEADS
    for ctx in DECODE_CONTEXTS[:1] if quick else DECODE_CONTEXTS:
        q, kc, vc, md, ks, vs = paged_batch([1] * batch, [ctx] * batch, dtype)
        kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * kc.element_size()
        kd = torch.stack(ks).repeat_interleave(group, 2).transpose(1, 2).contiguous()  # [B,Hq,L,D]
        vd = torch.stack(vs).repeat_interleave(group, 2).transpose(1, 2).contiguous()
        qd = q[:, :, None, :]  # [B, Hq, 1, D]
        auto = split_heuristic(batch, KV_HEADS, ctx, num_sms)
        backend_md = backend_cls().build_metadata(md, kc)  # once per step, outside the timing
        systems: dict[str, tuple[Optional[int], Callable[[], Any]]] = {
            f"triton (heuristic: {auto} splits)": (auto, lambda: backend_cls().forward(
                q, kc, vc, backend_md, scale)),
        }
        for splits in (1, 2, 4, 8, 16):
            backend = backend_cls(decode_num_splits=splits)
            systems[f"triton {splits} splits"] = (
                splits, lambda backend=backend: backend.forward(q, kc, vc, backend_md, scale))
        systems["sdpa (dense, GQA expanded)"] = (
            None, lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale))
        systems["naive"] = (None, lambda: naive_attention(q, kc, vc, md, scale))
        for system, (splits, fn) in systems.items():
            ms = bench_ms(fn)
            gb_s = kv_bytes / (ms * 1e-3) / 1e9
            rows.append(dict(batch=batch, context=ctx, system=system, splits=splits, ms=ms,
                             kv_gb=kv_bytes / 1e9, gb_s=gb_s, fraction_of_copy=gb_s / copy_gb_s))
        del q, kc, vc, ks, vs, kd, vd
        torch.cuda.empty_cache()
    return rows


# -- output ------------------------------------------------------------------------------------

def output_path(gpu: str) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_attention.json"
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    return RESULTS_DIR / f"gpu_attention_{slug}.json"


def print_table(title: str, rows: list[dict], keys: list[str]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--sweep", action="store_true", help="also time other prefill tiles")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                        help="dtype of the timed runs (correctness checks both)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu_attention needs a CUDA GPU (the kernels' CPU tests are "
              "`pytest stages/04/test_04_triton.py`)", file=sys.stderr)
        return 2

    import triton

    from folovllm.model_executor.attention_backends.triton_attn import (
        TileConfig,
        TritonAttentionBackend,
        decode_num_splits,
        paged_decode_attention,
        prefill_attention,
    )

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    record = result_record("benchmarks.gpu_attention", argv)
    machine = record["machine"]
    machine.update(triton=triton.__version__, gpu_sms=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}")
    print(f"{machine['gpu']}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)

    correctness = check_correctness(TritonAttentionBackend, paged_decode_attention, args.quick)
    print_table("correctness (max |error|)", correctness,
                ["dtype", "system", "max_err_vs_naive_fp32", "max_err_vs_sdpa",
                 "sdpa_max_err_vs_naive_fp32", "ok"])
    copy_gb_s = copy_bandwidth_gb_s()
    print(f"\ncopy_ bandwidth: {copy_gb_s:.0f} GB/s", flush=True)
    prefill = bench_prefill(TritonAttentionBackend(), prefill_attention, TileConfig, dtype,
                            args.quick, args.sweep)
    print_table(f"prefill, {args.dtype}", prefill, ["workload", "system", "ms", "tflops", "note"])
    decode = bench_decode(TritonAttentionBackend, decode_num_splits, dtype, args.quick, copy_gb_s,
                          props.multi_processor_count)
    print_table(f"decode, {args.dtype}", decode,
                ["batch", "context", "system", "ms", "gb_s", "fraction_of_copy"])

    result = dict(
        record, benchmark="gpu_attention",
        shapes=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE,
                    dtype=args.dtype),
        correctness=correctness, copy_bandwidth_gb_s=copy_gb_s, prefill=prefill, decode=decode,
    )
    path = output_path(machine["gpu"])
    write_results(path.parent, path.stem, result, None)
    return 0 if all(row["ok"] for row in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
