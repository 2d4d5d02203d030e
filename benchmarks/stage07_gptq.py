"""Stage 07 on CPU: GPTQ 4-bit weights against float32 and bfloat16, on one thread.

    python -m benchmarks.stage07_gptq            # ~30 minutes on a busy 2-core box
    python -m benchmarks.stage07_gptq --quick    # smoke run (small, not written)

Four measurements (each quoted with its setup in the .md):

    weight bytes   the linear layers' parameters and buffers, counted (deterministic), for the
                   Qwen3-0.6B shape and the 25M bench model: float32, bfloat16, GPTQ 4-bit with
                   groups of 128 (scales, zeros and g_idx included)
    decode tok/s   batch 1: prefill 32 tokens, then time `--steps` decode steps of our model
                   (no engine around it: stage 07 changes the matmuls, nothing else), for the
                   bench model and a Qwen3-0.6B-shaped model, random weights (speed does not
                   depend on the values); GPTQ runs in bfloat16 with the cpu_int4 kernel. The
                   three are timed interleaved; wall time and process CPU time (steadier on a
                   shared machine) are both reported
    one matmul     torch's int4 CPU kernel against dense matmuls in float32/bfloat16/float16, for
                   1 and 128 tokens: why the cpu_int4 path is used for bfloat16 models only
    perplexity     a small Qwen3 (4 layers, hidden 256) trained here for `--train-seconds` (one
                   thread too: on a loaded 2-core machine two threads were 10x slower per step) on
                   the Python standard library's
                   sources, then float32 vs round-to-nearest 4-bit vs our GPTQ 4-bit (groups of
                   128, and per-channel = group_size -1; with and without act-order; 32
                   calibration sequences of 256 training tokens), all in float32 with the
                   reference kernel, on 20 held-out files

Writes `benchmarks/results/stage07_gptq_cpu.json` and `.md` with the machine and git commit.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.cli import bench_main
from benchmarks.harness import interleave, summarize, time_calls, timed
from benchmarks.results import machine_short

QWEN3_06B = dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
    tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
)


# -- models in memory ------------------------------------------------------------------------


def build_model(hf_config: Any, dtype: torch.dtype, gptq: bool, group: int = 128, seed: int = 0) -> torch.nn.Module:
    """Our Qwen3 with random weights (float), or random 4-bit codes with plausible scales
    (GPTQ, symmetric v1), laid out for its kernel as the loader would."""
    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.layers.quantization.gptq import GPTQConfig
    from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen3ForCausalLM(hf_config, GPTQConfig(group_size=group) if gptq else None)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qweight"):
                p.copy_(torch.randint(-2**31, 2**31 - 1, p.shape, dtype=torch.int64).to(torch.int32))
            elif name.endswith("qzeros"):
                p.fill_(0x77777777)
            elif name.endswith("g_idx"):
                p.copy_(torch.arange(p.numel()) // group)
            elif name.endswith("scales"):
                p.uniform_(0.002, 0.004)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    for m in model.modules():
        if isinstance(m, LinearBase):
            m.quant_method.process_weights_after_loading(m)
    return model.eval()


def linear_bytes(model: torch.nn.Module) -> int:
    from folovllm.model_executor.layers.linear import LinearBase

    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, LinearBase)
               for t in list(m.parameters()) + list(m.buffers()))


def all_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


class DecodeRunner:
    """Batch 1 on one model: prefill `prompt_len` tokens, then `steps` single-token steps through
    a contiguous KV cache (no engine: stage 07 changes the matmuls, nothing else)."""

    def __init__(self, model: torch.nn.Module, prompt_len: int, steps: int) -> None:
        from folovllm.model_executor.layers.attention import Attention

        self.model, self.prompt_len, self.steps = model, prompt_len, steps
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.kv = {}
        for layer in (m for m in model.modules() if isinstance(m, Attention)):
            shape = (1, prompt_len + steps, layer.num_kv_heads, layer.head_dim)
            self.kv[layer] = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    def _step(self, start: int, n: int) -> None:
        from folovllm.model_executor.layers.attention import AttentionMetadata

        positions = torch.arange(start, start + n)
        md = AttentionMetadata.from_lists([n], [start + n], [[0]], positions, self.prompt_len + self.steps)
        h = self.model(torch.randint(0, 100, (n,)), positions, md)
        self.model.compute_logits(h[-1:])

    @torch.no_grad()
    def run(self) -> Any:
        """The prompt (untimed), then the decode steps timed by `harness.timed`."""
        for layer, cache in self.kv.items():
            layer.kv_cache = cache
        self._step(0, self.prompt_len)
        return timed(self.decode)

    @torch.no_grad()
    def decode(self) -> None:
        for i in range(self.steps):
            self._step(self.prompt_len + i, 1)


SYSTEMS = (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
           ("GPTQ 4-bit (bf16, cpu_int4)", torch.bfloat16, True))


def speed_section(name: str, hf_config: Any, steps: int, repeats: int) -> dict[str, Any]:
    """The three systems built side by side and timed interleaved (float32, bf16, GPTQ, float32,
    ...), one untimed warm-up each, so a change in the machine's load hits all of them."""
    runners, out = {}, {}
    for label, dtype, gptq in SYSTEMS:
        model = build_model(hf_config, dtype, gptq)
        if gptq:
            kernel = model.model.layers[0].mlp.down_proj.quant_method.kernel
            assert kernel == "cpu_int4", kernel
        out[label] = {"linear_bytes": linear_bytes(model), "all_bytes": all_bytes(model)}
        runners[label] = DecodeRunner(model, 32, steps)
    trials = {label: r.run for label, r in runners.items()}
    runs = interleave(trials, repeats, warmup=trials)
    for label, r in out.items():
        r.update(summarize(runs[label]))
        r["tok_per_s"] = steps / r["median_seconds"]
        r["tok_per_cpu_s"] = steps / r["median_cpu_seconds"]
        print(f"  {name} {label}: {r['tok_per_s']:.2f} tok/s ({r['tok_per_cpu_s']:.2f} per CPU s), "
              f"linear layers {r['linear_bytes'] / 2**20:.1f} MiB", flush=True)
    return out


# -- one matmul: why cpu_int4 only in bfloat16 ----------------------------------------------------


def kernels_section(repeats: int) -> dict[str, Any]:
    """One Qwen3-0.6B gate_up-sized matmul (1024 -> 3072, groups of 128) for 1 and 128 tokens:
    dense float32 / bfloat16 / float16 against torch's int4 kernel in each dtype, timed by
    `harness.time_calls` (interleaved): median of `repeats` process-CPU times of 10 calls each
    (2 for 128 tokens)."""
    from folovllm.model_executor.layers.quantization.gptq import CpuInt4Weight, pack_int32

    K, N, G = 1024, 3072, 128
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (K, N), generator=g)
    w = CpuInt4Weight.from_gptq(pack_int32(codes, 4, 0), pack_int32(torch.full((K // G, N), 8), 4, 1),
                                torch.rand(K // G, N, generator=g) * 0.01, torch.arange(K) // G)
    dense = torch.randn(N, K, generator=g)
    out: dict[str, Any] = {"shape": f"{K} -> {N}, groups of {G}"}

    cases, calls = {}, {}
    for M in (1, 128):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, wd = torch.randn(M, K, generator=g).to(dtype), dense.to(dtype)
            sz = w.scales_and_zeros.to(dtype)
            n = 10 if M == 1 else 2
            dense_mm = lambda x=x, wd=wd: x @ wd.t()  # noqa: E731
            int4_mm = lambda x=x, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, sz)  # noqa: E731
            for kind, fn in (("dense", dense_mm), ("int4", int4_mm)):
                key = f"M={M} {kind} {str(dtype)[6:]}"
                cases[key], calls[key] = (lambda fn=fn, n=n: [fn() for _ in range(n)]), n
    for key, ts in time_calls(cases, repeats).items():
        out[key] = summarize(ts)["median_cpu_seconds"] / calls[key] * 1000
    for k, v in out.items():
        if k != "shape":
            print(f"  {k}: {v:.3f} ms", flush=True)
    return out


# -- perplexity on a trained model ------------------------------------------------------------


def stdlib_files(seed: int = 0) -> tuple[list[str], list[str]]:
    """The standard library's .py files, shuffled: (train, held-out)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size < 200_000)
    random.Random(seed).shuffle(files)
    texts = [p.read_text(errors="replace") for p in files]
    return texts[20:], texts[:20]


def train_model(path: Path, seconds: float, seed: int = 0) -> tuple[Path, list[list[int]], int, list[list[int]]]:
    """Train a BPE tokenizer and a small Qwen3 on stdlib sources for `seconds` (batches of
    8 x 128 tokens, AdamW); save as an HF checkpoint. Returns (path, held-out sequences of 256
    tokens, training steps, calibration sequences of 256 training tokens)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train, held = stdlib_files(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf_tok.save_pretrained(path)
    ids = [t for text in train for t in tok.encode(text).ids]
    held_ids = [t for text in held for t in tok.encode(text).ids]
    L = 256
    config = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=0, bos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    data = torch.tensor(ids)
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        starts = torch.randint(0, len(data) - 129, (8,), generator=g)
        batch = torch.stack([data[s : s + 128] for s in starts])  # [8, 128]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"  train step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval().save_pretrained(path)
    held_seqs = [held_ids[i : i + L] for i in range(0, len(held_ids) - L, L)][:32]
    return path, held_seqs, step, [data[i : i + L].tolist() for i in range(0, 32 * L, L)]


def quality_section(seconds: float) -> dict[str, Any]:
    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.model_loader import load_model
    from folovllm.tools.gptq_quantizer import perplexity, quantize_checkpoint, rtn_quantize

    os.environ["FOLOVLLM_GPTQ_KERNEL"] = "reference"  # float32 everywhere: only the weights differ
    tmp = Path(tempfile.mkdtemp(prefix="stage07_"))
    path, held, steps, calib = train_model(tmp / "float", seconds)
    out: dict[str, Any] = {"train_seconds": seconds, "train_steps": steps, "held_out_tokens": 256 * len(held)}
    plain = load_model(str(path), torch.float32)[0]
    out["float32"] = perplexity(plain, held)
    floats = {n: m.weight.clone() for n, m in plain.named_modules() if isinstance(m, LinearBase)}
    for group in (128, -1):
        with torch.no_grad():
            for n, m in plain.named_modules():
                if isinstance(m, LinearBase):
                    m.weight.copy_(rtn_quantize(floats[n], 4, group, sym=True))
        out[f"RTN 4-bit {_g(group)}"] = perplexity(plain, held)
        for act in (False, True):
            label = f"GPTQ 4-bit {_g(group)}" + (" act-order" if act else "")
            q = quantize_checkpoint(str(path), str(tmp / label.replace(" ", "_")), group_size=group,
                                    desc_act=act, calibration=calib, progress=False)
            out[label] = perplexity(load_model(str(q), torch.float32)[0], held)
    for k in QUALITY_ROWS:
        print(f"  perplexity {k}: {out[k]:.3f}", flush=True)
    return out


def _g(group: int) -> str:
    return f"g{group}" if group > 0 else "per-channel"


QUALITY_ROWS = ("float32", "RTN 4-bit g128", "GPTQ 4-bit g128", "GPTQ 4-bit g128 act-order",
                "RTN 4-bit per-channel", "GPTQ 4-bit per-channel", "GPTQ 4-bit per-channel act-order")


def render(res: dict[str, Any]) -> str:
    lines = [f"Stage 07 GPTQ: `{res['command']}` on {machine_short(res['machine'])}, commit "
             f"{res['git_commit']}, {res['date'][:10]}.", ""]
    for name, sec in res["speed"].items():
        base = sec["float32"]
        lines += [f"**Decode, batch 1, {name}** (prefill 32, {res['steps']} decode steps, median of "
                  f"{res['repeats']} interleaved runs; wall time and process CPU time):", "",
                  "| weights | linear-layer bytes | all bytes | decode tok/s | vs float32 | tok per CPU s | vs float32 |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        for label, r in sec.items():
            lines.append(f"| {label} | {r['linear_bytes'] / 2**20:.1f} MiB | {r['all_bytes'] / 2**20:.1f} MiB | "
                         f"{r['tok_per_s']:.2f} | {r['tok_per_s'] / base['tok_per_s']:.2f}x | "
                         f"{r['tok_per_cpu_s']:.2f} | {r['tok_per_cpu_s'] / base['tok_per_cpu_s']:.2f}x |")
        lines.append("")
    if "kernels" in res:
        k = res["kernels"]
        lines += [f"**One matmul** ({k['shape']}), ms of process CPU time per call, median:", "",
                  "| tokens | dense float32 | dense bfloat16 | dense float16 | int4 float32 | int4 bfloat16 | int4 float16 |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        for M in (1, 128):
            cells = [f"{k[f'M={M} {kind} {dt}']:.2f}" for kind in ("dense", "int4")
                     for dt in ("float32", "bfloat16", "float16")]
            lines.append(f"| {M} | " + " | ".join(cells) + " |")
        lines.append("")
    if "quality" in res:
        q = res["quality"]
        lines += [f"**Perplexity** of a small Qwen3 (4 layers, hidden 256, vocab 2048) trained {q['train_seconds']:.0f} s "
                  f"({q['train_steps']} steps) on stdlib sources, on {q['held_out_tokens']} held-out tokens:", "",
                  "| weights | perplexity | change vs float32 |", "|---|---|---|"]
        for k in QUALITY_ROWS:
            lines.append(f"| {k} | {q[k]:.3f} | {q[k] - q['float32']:+.3f} |")
    return "\n".join(lines) + "\n"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat")
    p.add_argument("--train-seconds", type=float, default=780)
    p.add_argument("--no-06b", action="store_true", help="skip the Qwen3-0.6B shape")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    from folovllm.testing.tiny_model import SIZES

    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)
    res: dict[str, Any] = {"steps": steps, "repeats": repeats, "speed": {}}
    shapes = {"bench model (25M, hidden 512)": dict(SIZES["bench"], vocab_size=512, tie_word_embeddings=True)}
    if not (args.quick or args.no_06b):
        shapes["Qwen3-0.6B shape"] = QWEN3_06B
    for name, kw in shapes.items():
        print(f"decode: {name}", flush=True)
        res["speed"][name] = speed_section(name, transformers.Qwen3Config(**kw), steps, repeats)
    print("kernels", flush=True)
    res["kernels"] = kernels_section(repeats)
    print("quality", flush=True)
    res["quality"] = quality_section(10 if args.quick else args.train_seconds)
    return res


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage07_gptq", __doc__, argv, run, render, name="stage07_gptq_cpu",
               options=add_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
