"""bfloat16 and the kernels on every x86 CPU, AVX-512 or AVX2 only (`folovllm/platforms/cpu.py`).

On a CPU without AVX-512, oneDNN has no bf16 matmul: `LLM(..., dtype="bfloat16")` used to fail
at start-up (weight packing) or at its first request (`could not create a primitive
descriptor`). The engine now asks oneDNN what it supports and takes `F.linear` for bf16 where it
has nothing. These tests run on whatever path this process is on; CI runs the whole suite a
second time with FOLOVLLM_CPU_ISA=avx2, which puts an AVX-512 machine on the AVX2 path, and the
subprocess test below checks that the switch really does that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from folovllm import LLM, SamplingParams
from folovllm.model_executor.layers.cpu_gemm import choose_gemm, dense_linear, logical_shape
from folovllm.model_executor.layers.linear import LinearBase
from folovllm.platforms import cpu as cpu_platform

PROMPTS = ["def main(", "import os", "class Foo", "for i in range("]


def greedy(model, **kwargs) -> list[list[int]]:
    llm = LLM(str(model), dtype="bfloat16", stage=6, **kwargs)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_bfloat16_generates_on_this_cpus_path(tiny_qwen3):
    """The default engine (kernels, packed weights where oneDNN takes bf16) runs bf16 to the end;
    the linear layers and custom ops give exactly the torch path's tokens (same attention);
    our attention kernel differs from SDPA's only by bf16 rounding (it keeps the softmax
    probabilities in float32), so the first tokens agree."""
    default = greedy(tiny_qwen3)
    assert all(len(ids) == 12 for ids in default)
    torch_path = greedy(tiny_qwen3, custom_ops="none", attention_backend="sdpa")
    kernels_sdpa = greedy(tiny_qwen3, custom_ops="all", attention_backend="sdpa")
    assert kernels_sdpa == torch_path
    assert [ids[:4] for ids in default] == [ids[:4] for ids in torch_path]


def test_the_worker_packs_bf16_only_where_onednn_has_bf16_kernels(tiny_qwen3):
    """A bf16 linear gets our kernel's pair panels where the measured table picks them (both ISA
    paths), else oneDNN's layout only where oneDNN has bf16 kernels, else stays plain."""
    llm = LLM(str(tiny_qwen3), dtype="bfloat16", stage=6, custom_ops="all")
    model = llm.llm_engine.model_runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    for m in linears:
        panels = choose_gemm(*logical_shape(m.weight), dtype=torch.bfloat16) == "decode"
        assert m.weight.dim() == (3 if panels else 2)
        assert m.weight.is_mkldnn == (not panels and cpu_platform.onednn_bf16_supported())


def test_avx2_switch_caps_onednn_and_aten_and_bf16_still_multiplies():
    """FOLOVLLM_CPU_ISA=avx2 (read when folovllm is imported) makes oneDNN and ATen behave as on
    an AVX2-only CPU: no oneDNN bf16, ATen's AVX2 kernels, our kernels built for x86-64-v3. A
    bf16 `dense_linear` (the call that used to fail there) equals F.linear."""
    script = (
        "import json, torch, folovllm\n"
        "from folovllm.platforms import cpu\n"
        "from folovllm.model_executor.layers.cpu_gemm import choose_gemm, dense_linear, logical_shape\n"
        "x, w = torch.randn(5, 64).bfloat16(), torch.randn(32, 64).bfloat16()\n"
        "with torch.inference_mode():\n"
        "    same = torch.equal(dense_linear(x, w), torch.nn.functional.linear(x, w))\n"
        "print(json.dumps(dict(bf16=cpu.onednn_bf16_supported(), isa=cpu.kernel_isa(),\n"
        "    aten=torch.backends.cpu.get_cpu_capability(), same=same)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env["FOLOVLLM_CPU_ISA"] = "avx2"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == dict(bf16=False, isa="avx2", aten="AVX2", same=True)

