"""Make stage 07's GPTQ test fixtures with GPTQModel itself, and check that folovllm reads them.

GPTQModel is never a dependency of folovllm: it runs in a venv of its own
(`bash tools/make_gptqmodel_venv.sh`, GPTQModel 7.7.0 with torch 2.14.1), in a child process of
this script (the way `tools/llmcompressor_checkpoint.py` drives llm-compressor)::

    bash tools/make_gptqmodel_venv.sh /work/venvs/gptqmodel
    python tools/gptqmodel_fixtures.py --gptqmodel-python /work/venvs/gptqmodel/bin/python \\
        --table benchmarks/results/stage07_gptqmodel_cpu.md

What it does, for each of the 8 variants in `VARIANTS` (v1 and v2 zeros, sym and asym, 4 and 8
bits, groups 32/64/128/-1, act-order; one asymmetric v1 variant quantizes a model whose rows of
q_proj and gate_proj are all positive, so some groups get a zero point of 0):

1. here: a tiny random Qwen3 / Qwen2 / Llama (`folovllm.testing.tiny_model`, "tiny" size cut
   to one decoder layer so the committed files stay small);
2. in GPTQModel's venv: `GPTQModel.load(float) .quantize(random calibration tokens) .save(out)`,
   then GPTQModel's own reading of what it wrote: `GPTQModel.load(out, backend=TORCH)` (which
   converts v1 zeros to v2 the way GPTQModel's kernels do), the model cast to float32 with the
   checkpoint's own float tensors copied in exactly, each `TorchLinear.dequantize_weight()` (the
   sha256 of its float32 [out, in] bytes is the reference) and the float32 logits of its forward
   on a fixed 8-token prompt (the first 4 positions are committed) plus 8 greedy tokens (full
   recompute, no cache). It also runs GPTQModel's
   offline `dequantize_model` tool and records whether its weights agree with the kernels';
3. here: the checkpoint is split into what is shared per architecture (`base-ARCH.safetensors`:
   embeddings, norms and biases exactly as GPTQModel wrote them, checked identical across the
   variants) and what is not (`NAME.safetensors`: qweight/qzeros/scales/g_idx; `NAME.json`:
   GPTQModel's config.json and the reference; `NAME.reference.safetensors`: the logits), written
   to `tests/fixtures/gptqmodel/`; then folovllm loads each one (`checkpoint_dir`, the test's
   way) and a markdown table compares it with the reference (exit status 1 if any weight
   differs). `stages/07/test_07_gptqmodel_fixtures.py` checks the same with no GPTQModel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gptqmodel"
QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
PROMPT = [5, 17, 42, 99, 200, 311, 400, 7]  # the fixed prompt the logits are compared on
GREEDY_TOKENS = 8
LOGIT_ROWS = 4  # the logits of the prompt's first 4 positions are committed (2 KiB a row)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# name -> the quantization GPTQModel is asked for
VARIANTS: dict[str, dict[str, Any]] = {
    "qwen3-v1-sym-4b-g32": dict(arch="qwen3", bits=4, group_size=32, sym=True, desc_act=False, format="gptq"),
    # the silent bug of issue 24: asymmetric v1 with zero points of 0 (rows made all positive)
    "qwen3-v1-asym-4b-g32-zero0": dict(arch="qwen3", bits=4, group_size=32, sym=False, desc_act=False,
                                       format="gptq", zero0=True),
    "qwen2-v2-asym-4b-g64": dict(arch="qwen2", bits=4, group_size=64, sym=False, desc_act=False, format="gptq_v2"),
    "llama-v2-sym-4b-gm1": dict(arch="llama", bits=4, group_size=-1, sym=True, desc_act=False, format="gptq_v2"),
    "qwen3-v1-sym-8b-g64": dict(arch="qwen3", bits=8, group_size=64, sym=True, desc_act=False, format="gptq"),
    "qwen3-v2-asym-8b-g128": dict(arch="qwen3", bits=8, group_size=128, sym=False, desc_act=False, format="gptq_v2"),
    "qwen3-v1-sym-4b-g32-act": dict(arch="qwen3", bits=4, group_size=32, sym=True, desc_act=True, format="gptq"),
    "llama-v1-asym-4b-g64-act": dict(arch="llama", bits=4, group_size=64, sym=False, desc_act=True, format="gptq",
                                     zero0=True),
}


def weight_digest(w) -> str:  # noqa: ANN001 - a torch tensor in either venv
    """sha256 of a float32 [out, in] weight's bytes: what 'exactly equal' is checked on."""
    import torch

    return hashlib.sha256(w.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


# -- the child: runs in GPTQModel's venv, imports nothing of folovllm ----------------------------


def _child(src: str, out: str, spec_json: str) -> None:  # pragma: no cover - runs in the other venv
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # it refuses to pick a worker count on 2 cores
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from safetensors.torch import load_file, save_file

    spec = json.loads(spec_json)
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    quant = QuantizeConfig(
        bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"], desc_act=spec["desc_act"],
        format=spec["format"],
        # its default (group-aware reordering) refuses group_size=-1 and desc_act=True
        act_group_aware=False if spec["desc_act"] or spec["group_size"] == -1 else None,
    )
    model = GPTQModel.load(src, quant, device="cpu")
    model.quantize(calibration, batch_size=4)
    model.save(out)
    del model

    # GPTQModel's own reading: its loader (v1 -> v2 zeros), its torch kernel, in float32.
    loaded = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    net = loaded.model.float().eval()
    stored = load_file(f"{out}/model.safetensors")
    state = net.state_dict()
    with torch.no_grad():  # the checkpoint's float tensors exactly (the fp16 load rounded bf16 ones)
        for name, tensor in stored.items():
            if not name.endswith(QUANT_KEYS):
                state[name].copy_(tensor.float())
    digests, zero_points_of_0, kernels = {}, 0, set()
    for name, mod in net.named_modules():
        if isinstance(mod, BaseQuantLinear):
            kernels.add(type(mod).__name__)
            mod.clear_weight_cache()
            w = mod.dequantize_weight().t()  # [out, in]
            assert w.dtype == torch.float32, w.dtype
            digests[name] = {"sha256": weight_digest(w), "abs_sum": float(w.double().abs().sum())}
            shifts = torch.arange(32 // spec["bits"], dtype=torch.int32) * spec["bits"]
            zeros = (mod.qzeros.unsqueeze(-1) >> shifts) & (2 ** spec["bits"] - 1)  # v2 now
            zero_points_of_0 += int((zeros == 0).sum())
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = net(input_ids=prompt).logits[0].float()  # [len(PROMPT), vocab]
        seq = list(PROMPT)
        for _ in range(GREEDY_TOKENS):  # greedy, recomputing the whole sequence: no cache involved
            seq.append(int(net(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))

    # GPTQModel's offline dequantizer, in float32: does it agree with its own kernels?
    from gptqmodel.utils.model_dequant import dequantize_model

    deq_dir = f"{out}.dequantized"
    shutil.rmtree(deq_dir, ignore_errors=True)
    dequantize_model(out, deq_dir, target_dtype=torch.float32)
    deq = {}
    for f in Path(deq_dir).glob("*.safetensors"):
        deq.update(load_file(str(f)))
    tool_differs = sorted(n for n in digests if weight_digest(deq[f"{n}.weight"]) != digests[n]["sha256"])

    import gptqmodel
    import transformers

    save_file({"logits": logits, "input_ids": prompt[0]}, f"{out}/reference.safetensors")
    (Path(out) / "reference.json").write_text(json.dumps({
        "weights": digests,
        "greedy_tokens": seq[len(PROMPT):],
        "zero_points_of_0": zero_points_of_0,
        "kernels": sorted(kernels),
        "dequantize_model_differs": tool_differs,
        "versions": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }, indent=1))


# -- the parent: folovllm's venv ------------------------------------------------------------------


def _float_model(root: Path, arch: str, zero0: bool) -> Path:
    """The tiny random model of `arch`, cut to one decoder layer; with `zero0`, every 4th row of
    each q_proj and gate_proj made positive (|w| + 0.05), so asymmetric min-max grids put those
    groups' zero point at 0."""
    import torch
    from safetensors.torch import load_file, save_file

    from folovllm.testing.tiny_model import build_tiny_checkpoint

    full = build_tiny_checkpoint(root / f"float-{arch}", arch=arch)
    dst = root / f"float-{arch}-1layer{'-zero0' if zero0 else ''}"
    if dst.is_dir():
        shutil.rmtree(dst)
    shutil.copytree(full, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = 1
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:1]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v for k, v in load_file(str(dst / "model.safetensors")).items() if ".layers.1." not in k}
    if zero0:
        with torch.no_grad():
            for name in [n for n in tensors if n.endswith(("q_proj.weight", "gate_proj.weight"))]:
                tensors[name][::4] = tensors[name][::4].abs() + 0.05
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def checkpoint_dir(name: str, dst: Path, fixtures: Path = FIXTURES) -> Path:
    """Assemble fixture `name` into a checkpoint folder `dst` (config.json, model.safetensors,
    the tokenizer): exactly the files GPTQModel wrote, less its logs and meta files."""
    from safetensors.torch import load_file, save_file

    meta = json.loads((fixtures / f"{name}.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(fixtures / f"base-{meta['arch']}.safetensors"))
    tensors.update(load_file(str(fixtures / f"{name}.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(meta["config"], indent=2))
    for f in TOKENIZER_FILES:
        shutil.copy(fixtures / f, dst / f)
    return dst


def _pack(name: str, out: Path, fixtures: Path, command: str) -> None:
    """Split GPTQModel's checkpoint `out` into the committed fixture files."""
    from safetensors.torch import load_file, save_file

    spec = VARIANTS[name]
    tensors = load_file(str(out / "model.safetensors"))
    quant = {k: v for k, v in tensors.items() if k.endswith(QUANT_KEYS)}
    base = {k: v for k, v in tensors.items() if not k.endswith(QUANT_KEYS)}
    base_file = fixtures / f"base-{spec['arch']}.safetensors"
    if base_file.is_file():
        have = load_file(str(base_file))
        assert have.keys() == base.keys() and all(have[k].equal(base[k]) for k in have), \
            f"{name}: GPTQModel's float tensors differ from {base_file.name}'s"
    else:
        save_file(base, str(base_file), metadata={"format": "pt"})
    save_file(quant, str(fixtures / f"{name}.safetensors"), metadata={"format": "pt"})
    ref = load_file(str(out / "reference.safetensors"))
    save_file({"logits": ref["logits"][:LOGIT_ROWS].contiguous(), "input_ids": ref["input_ids"]},
              str(fixtures / f"{name}.reference.safetensors"))
    reference = json.loads((out / "reference.json").read_text())
    config = json.loads((out / "config.json").read_text())
    for key in ("offload_to_disk_path",):  # a temporary path of the run, not the format
        config["quantization_config"].get("meta", {}).pop(key, None)
    meta = {"arch": spec["arch"], "variant": spec, "command": command, "config": config, "reference": reference}
    (fixtures / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in TOKENIZER_FILES:
        if not (fixtures / f).is_file():
            shutil.copy(out / f, fixtures / f)


def compare(name: str, work: Path, fixtures: Path = FIXTURES) -> dict[str, Any]:
    """folovllm's reading of fixture `name` against GPTQModel's: the table's row."""
    import torch
    from safetensors.torch import load_file

    from folovllm import LLM, SamplingParams
    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.layers.quantization.gptq import KERNEL_ENV, dequantize_gptq
    from folovllm.model_executor.model_loader import load_model
    from folovllm.tools.gptq_quantizer import forward_sequences

    os.environ[KERNEL_ENV] = "reference"
    meta = json.loads((fixtures / f"{name}.json").read_text())
    ref = meta["reference"]
    path = checkpoint_dir(name, work / name, fixtures)
    model = load_model(str(path), torch.float32)[0]
    exact = 0
    for prefix, layer in model.named_modules():
        if isinstance(layer, LinearBase):
            w = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                model.quant_config.bits).t()  # [N, K], fused parts stacked
            parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
            parent, own = prefix.rsplit(".", 1)
            for part, rows in zip(parts.get(own, (own,)), w.split(layer.output_sizes)):
                exact += weight_digest(rows) == ref["weights"][f"{parent}.{part}"]["sha256"]
    want = load_file(str(fixtures / f"{name}.reference.safetensors"))
    logits = model.compute_logits(forward_sequences(model, [PROMPT]))[: len(want["logits"])]
    llm = LLM(str(path), dtype="float32", max_model_len=64)
    [res] = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True),
                         use_tqdm=False)
    llm.llm_engine.shutdown()
    cfg = meta["config"]["quantization_config"]
    return {
        "variant": name, "arch": meta["arch"], "format": cfg["checkpoint_format"], "bits": cfg["bits"],
        "group_size": cfg["group_size"], "sym": cfg["sym"], "desc_act": cfg["desc_act"],
        "zero_points_of_0": ref["zero_points_of_0"],
        "layers_exact": f"{exact}/{len(ref['weights'])}",
        "max_logit_diff": (logits - want["logits"]).abs().max().item(),
        "max_abs_logit": want["logits"].abs().max().item(),
        "greedy_equal": list(res.outputs[0].token_ids) == ref["greedy_tokens"],
        "dequantize_model_tool_differs": len(ref["dequantize_model_differs"]),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gptqmodel-python", default="/work/venvs/gptqmodel/bin/python",
                        help="the python of a venv with gptqmodel installed (tools/make_gptqmodel_venv.sh)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptqmodel_fixtures"),
                        help="scratch folder: float models and GPTQModel's full checkpoints")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--compare-only", action="store_true", help="only compare the committed fixtures")
    parser.add_argument("--pack-only", action="store_true",
                        help="rewrite the fixtures from GPTQModel's checkpoints already in --work, then compare")
    parser.add_argument("--table", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    if not args.compare_only:
        args.fixtures.mkdir(parents=True, exist_ok=True)
        for arch in {VARIANTS[name]["arch"] for name in args.variants}:
            (args.fixtures / f"base-{arch}.safetensors").unlink(missing_ok=True)  # rebuilt by this run
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours in their venv
        env["TORCHDYNAMO_DISABLE"] = "1"  # TorchLinear would torch.compile its dequantization
        command = "python tools/gptqmodel_fixtures.py " + " ".join(sys.argv[1:])
        for name in args.variants:
            spec = VARIANTS[name]
            src = _float_model(args.work, spec["arch"], spec.get("zero0", False))
            out = args.work / name
            if not args.pack_only:
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run([args.gptqmodel_python, __file__, "--child", str(src), str(out), json.dumps(spec)],
                               check=True, env=env, cwd=args.work)  # it writes logs/ where it runs
            _pack(name, out, args.fixtures, command)
    rows = [compare(name, args.work / "assembled", args.fixtures) for name in args.variants]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for row in rows]
    print("\n".join(lines))
    if args.table:
        args.table.write_text("\n".join(lines) + "\n")
    ok = all(r["layers_exact"].split("/")[0] == r["layers_exact"].split("/")[1] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
