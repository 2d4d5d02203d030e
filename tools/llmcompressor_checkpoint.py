"""Make compressed-tensors checkpoints with llm-compressor itself and check that folovllm reads them.

llm-compressor is never a dependency of folovllm: it runs in a venv of its own, in a child
process of this script (the way `benchmarks/vllm_peer.py` drives vLLM)::

    python3 -m venv /work/wt/ct-venv
    /work/wt/ct-venv/bin/pip install torch==2.14.1      # a CPU torch first, then
    /work/wt/ct-venv/bin/pip install llmcompressor      # (0.14.0.1 pins torch 2.14.0 itself)
    python tools/llmcompressor_checkpoint.py --ct-python /work/wt/ct-venv/bin/python OUT

Steps: (1) here, a random Qwen3 of the "bench" size (512 hidden, 1536 intermediate, 8 layers,
so llm-compressor's presets with groups of 128 apply) with `folovllm.testing.tiny_model`;
(2) in the llm-compressor venv, for each variant, `oneshot` with `GPTQModifier` on random
calibration tokens, `save_pretrained(save_compressed=True)`, then the tool's own reading of what
it wrote: transformers + compressed-tensors decompress it to dense weights
(`run_compressed=False`), whose linear weights and float32 logits on fixed tokens are saved
beside the checkpoint (`NAME.reference.safetensors`); (3) here, folovllm loads each checkpoint
(reference kernel, float32) and compares: every linear layer's dequantized weights with the
tool's (exact: max |diff| must be 0) and the logits, and greedy tokens at tensor_parallel_size 2
against 1. A markdown table goes to stdout (and to
`--table FILE`: benchmarks/results/stage07_llmcompressor_cpu.md); the exit status is 1 if any
weight differs. Finished checkpoints in OUT are reused.

Each variant takes some 5 minutes of GPTQ on a 2-core machine.

`--fixtures` makes the committed test fixtures instead (`FIXTURE_VARIANTS`, about a minute
each): the tiny Qwen3 cut to one decoder layer, its float tensors rounded to bfloat16 values so
that they equal GPTQModel's fixture base (`tests/fixtures/gptqmodel/base-qwen3.safetensors`,
checked), quantized with groups of 32 (sym, asym) and channel-wise (asym); each checkpoint's
compressed tensors, config.json, the sha256 of the tool's dense float32 weights, its greedy tokens
and the logits of the first 4 prompt positions go to `tests/fixtures/llmcompressor/`, which
`stages/07/test_07_llmcompressor_fixtures.py` checks with no llm-compressor::

    python tools/llmcompressor_checkpoint.py /tmp/ct_fixtures --fixtures \
        --table benchmarks/results/stage07_llmcompressor_fixtures_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> the recipe's quantization settings: a preset scheme, or config_groups weights
VARIANTS = {
    "w4a16": {"scheme": "W4A16"},  # symmetric, groups of 128, actorder "static"
    "w4a16-asym": {"scheme": "W4A16_ASYM"},
    "w4a16-asym-channel": {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}},
}
TOKENS = 48  # the fixed prompt the logits are compared on
# Test fixtures (--fixtures): the tiny Qwen3 cut to one layer, groups of 32 (it has 64 inputs)
FIXTURE_VARIANTS = {
    "w4a16-sym-g32": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                  "group_size": 32}},
    "w4a16-asym-g32": {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                   "group_size": 32}},
    "w4a16-asym-channel": {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}},
}
FIXTURE_PROMPT = 8  # a fixture keeps the first 8 prompt tokens, 8 greedy tokens after them and
FIXTURE_LOGIT_ROWS = 4  # the logits of the first 4 positions
GREEDY_TOKENS = 8
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


# -- the child: runs in the llm-compressor venv, imports nothing of folovllm --------------------


def _child(src: str, out: str, spec_json: str) -> None:  # pragma: no cover - runs in the other venv
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    spec = json.loads(spec_json)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = torch.randint(3, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    calibration = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if "scheme" in spec:
        recipe = GPTQModifier(targets="Linear", scheme=spec["scheme"], ignore=["lm_head"])
    else:
        recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": spec["weights"]}},
                              ignore=["lm_head"])
    oneshot(model=model, dataset=calibration, recipe=recipe, max_seq_length=64, num_calibration_samples=16,
            processor=tokenizer)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)

    dense = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    prompt = torch.arange(3, 3 + TOKENS).unsqueeze(0)
    with torch.no_grad():
        logits = dense(input_ids=prompt).logits[0].float()  # [TOKENS, vocab]
        seq = prompt[0, :FIXTURE_PROMPT].tolist()
        for _ in range(GREEDY_TOKENS):  # greedy, recomputing the whole sequence: no cache involved
            seq.append(int(dense(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    weights = {n: p.detach().clone() for n, p in dense.state_dict().items() if n.endswith("_proj.weight")}
    save_file({**weights, "logits": logits, "input_ids": prompt[0], "greedy": torch.tensor(seq[FIXTURE_PROMPT:])},
              f"{out}.reference.safetensors")


# -- the parent: folovllm's venv ------------------------------------------------------------------


def _compare(path: Path) -> dict:
    """folovllm's reading of the checkpoint against the tool's."""
    import torch
    from safetensors.torch import load_file

    from folovllm.model_executor.layers.linear import LinearBase
    from folovllm.model_executor.layers.quantization.gptq import KERNEL_ENV, dequantize_gptq
    from folovllm.model_executor.model_loader import load_model
    from folovllm.tools.gptq_quantizer import forward_sequences

    os.environ[KERNEL_ENV] = "reference"
    ref = load_file(f"{path}.reference.safetensors")
    model = load_model(str(path), torch.float32)[0]
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    worst, layers = 0.0, 0
    for name, layer in model.named_modules():
        if isinstance(layer, LinearBase):
            parent, own = name.rsplit(".", 1)
            want = torch.cat([ref[f"{parent}.{p}.weight"] for p in parts.get(own, (own,))])  # [N, K]
            got = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, model.quant_config.bits)
            worst = max(worst, (got.t() - want).abs().max().item())
            layers += 1
    logits = model.compute_logits(forward_sequences(model, [ref["input_ids"].tolist()]))
    want = ref["logits"]
    tp_equal = _tp2_tokens_equal_tp1(path)
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    return {
        "variant": path.name, "num_bits": weights["num_bits"], "strategy": weights["strategy"],
        "group_size": weights["group_size"], "symmetric": weights["symmetric"], "actorder": weights["actorder"],
        "layers": layers, "max_weight_diff": worst,
        "max_logit_diff": (logits - want).abs().max().item(), "max_abs_logit": want.abs().max().item(),
        "argmax_agree": f"{int((logits.argmax(-1) == want.argmax(-1)).sum())}/{len(want)}",
        "tp2_tokens_equal_tp1": tp_equal,
        "compressed_tensors": quant.get("version"),
    }


def _tp2_tokens_equal_tp1(path: Path) -> bool:
    """Greedy tokens (4 prompts x 16) through the engine at tensor_parallel_size 1 and 2."""
    from folovllm import LLM, SamplingParams

    prompts = [[5 + i, 6, 7 + i, 8, 9, 10 + 2 * i] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = []
    for tp in (1, 2):
        llm = LLM(str(path), dtype="float32", max_model_len=128, tensor_parallel_size=tp)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        llm.llm_engine.shutdown()
    return outs[0] == outs[1]


# -- test fixtures: tiny checkpoints committed to tests/fixtures/llmcompressor/ --------------------


def _fixture_float_model(root: Path) -> Path:
    """The tiny random Qwen3 cut to one decoder layer, its float tensors other than the linear
    weights rounded to bfloat16 values (kept in a float32 file): then what llm-compressor writes
    for them equals, value for value, GPTQModel's `tests/fixtures/gptqmodel/base-qwen3.safetensors`
    (bfloat16), and the fixtures share that file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from folovllm.testing.tiny_model import build_tiny_checkpoint

    full = build_tiny_checkpoint(root / "float-qwen3", arch="qwen3")
    dst = root / "float-qwen3-1layer-bf16"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(full, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = 1
    config["layer_types"] = config["layer_types"][:1]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v if k.endswith("_proj.weight") else v.bfloat16().float()
               for k, v in load_file(str(dst / "model.safetensors")).items() if ".layers.1." not in k}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _pack_fixture(name: str, out: Path, fixtures: Path, command: str) -> None:
    """Split llm-compressor's checkpoint `out` into the committed fixture files: NAME.safetensors
    (the compressed tensors), NAME.json (its config.json and the reference: sha256 of the tool's
    own dense float32 weights, its greedy tokens), NAME.reference.safetensors (its logits)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    quant = {k: v for k, v in tensors.items() if ".weight_" in k}
    base = load_file(str(fixtures / "gptqmodel" / "base-qwen3.safetensors"))
    rest = {k: v for k, v in tensors.items() if k not in quant}
    assert rest.keys() == base.keys() and all(rest[k].equal(base[k].to(rest[k].dtype)) for k in base), \
        f"{name}: llm-compressor's float tensors are not gptqmodel/base-qwen3's values"
    dst = fixtures / "llmcompressor"
    dst.mkdir(parents=True, exist_ok=True)
    save_file(quant, str(dst / f"{name}.safetensors"), metadata={"format": "pt"})
    ref = load_file(f"{out}.reference.safetensors")
    save_file({"logits": ref["logits"][:FIXTURE_LOGIT_ROWS].contiguous(),
               "input_ids": ref["input_ids"][:FIXTURE_PROMPT].contiguous()},
              str(dst / f"{name}.reference.safetensors"))
    digests = {k[: -len(".weight")]: hashlib.sha256(v.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
               for k, v in ref.items() if k.endswith("_proj.weight")}
    config = json.loads((out / "config.json").read_text())
    meta = {"arch": "qwen3", "base": "gptqmodel/base-qwen3.safetensors", "variant": FIXTURE_VARIANTS[name],
            "command": command, "config": config,
            "reference": {"weights": digests, "greedy_tokens": ref["greedy"].tolist(),
                          "dtypes": {k: str(v.dtype) for k, v in rest.items()}}}
    (dst / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    # the tests take the tiny models' one tokenizer from gptqmodel/
    assert (out / "tokenizer.json").read_bytes() == (fixtures / "gptqmodel" / "tokenizer.json").read_bytes()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ct-python", default="/work/wt/ct-venv/bin/python",
                        help="the python of a venv with llmcompressor installed")
    parser.add_argument("--variants", nargs="*", help="default: every variant of the mode")
    parser.add_argument("--fixtures", action="store_true",
                        help="make the tiny test fixtures (FIXTURE_VARIANTS) into tests/fixtures/llmcompressor/ "
                             "instead of the bench-size checkpoints")
    parser.add_argument("--table", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()

    from folovllm.testing.tiny_model import build_tiny_checkpoint

    variants = FIXTURE_VARIANTS if args.fixtures else VARIANTS
    names = args.variants or list(variants)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(variants)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fixtures:
        src = _fixture_float_model(args.out)
    else:
        src = build_tiny_checkpoint(args.out / "float", arch="qwen3", size="bench")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours in their venv
    rows = []
    for name in names:
        dst = args.out / name
        if not (dst / "config.json").is_file():
            subprocess.run([args.ct_python, __file__, "--child", str(src), str(dst), json.dumps(variants[name])],
                           check=True, env=env)
        if args.fixtures:
            _pack_fixture(name, dst, FIXTURES, "python tools/llmcompressor_checkpoint.py " + " ".join(sys.argv[1:]))
        rows.append(_compare(dst))
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for row in rows]
    print("\n".join(lines))
    if args.table:
        args.table.write_text("\n".join(lines) + "\n")
    return 0 if all(row["max_weight_diff"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
