"""Which fast CPU paths this machine can take, and why (vLLM's `vllm/platforms/cpu.py`).

x86 CPUs come in two classes that matter here:

    CPU class                         our C++ kernels            bfloat16 linear layers
    --------------------------------  -------------------------  ------------------------------
    AVX-512 (F/BW/VL/DQ; Xeon since   AVX-512 micro-kernels      oneDNN's bf16 matmul, weights
    Skylake-SP, EPYC since Zen 4)     (prefill_attention.cpp)    packed in its blocked layout
    AVX2 + FMA only (most laptops,    portable loops the         torch's F.linear (oneDNN has
    EPYC before Zen 4, many clouds)   compiler vectorises        no bf16 kernel there: it needs
                                      for AVX2                   AVX-512 or AVX-NE-CONVERT)

float32 takes oneDNN (packed) on both; only bf16's oneDNN path needs the newer CPU. Every choice
is made from what the CPU reports (through torch), never assumed, and `FOLOVLLM_CPU_ISA=avx2`
(folovllm/envs.py) makes an AVX-512 machine take the AVX2 column, which is how CI tests it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from folovllm import envs

logger = logging.getLogger(__name__)


@functools.cache
def onednn_bf16_supported() -> bool:
    """True when oneDNN has bfloat16 matmul kernels for this CPU (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT), as oneDNN itself reports it (it honours the AVX2 cap of FOLOVLLM_CPU_ISA)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel reports for this CPU (empty where it says none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_isa() -> str:
    """What our C++ kernels are compiled for: "avx512" (the AVX-512 micro-kernels, -march=native
    on a CPU with AVX-512F) or "avx2" (the portable variants: FOLOVLLM_CPU_ISA=avx2, or a CPU
    without AVX-512)."""
    if envs.cpu_isa() == "avx2":
        return "avx2"
    return "avx512" if "avx512f" in cpu_flags() else "avx2"


def describe() -> str:
    """One line: the kernels' ISA, bf16's linear path and what ATen dispatches to."""
    forced = " (forced by FOLOVLLM_CPU_ISA=avx2)" if envs.cpu_isa() == "avx2" else ""
    bf16 = "oneDNN" if onednn_bf16_supported() else "F.linear (no oneDNN bf16 kernel on this CPU)"
    return (f"CPU path{forced}: C++ kernels {kernel_isa()}, bf16 linears {bf16}, "
            f"ATen {torch.backends.cpu.get_cpu_capability()}")


def check_isa_override() -> None:
    """Warn when FOLOVLLM_CPU_ISA=avx2 came too late: torch had already run an operation before
    folovllm was imported, so oneDNN kept its AVX-512 kernels."""
    if envs.cpu_isa() == "avx2" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        logger.warning(
            "FOLOVLLM_CPU_ISA=avx2 was set after torch started (ATen reports %s): set it before "
            "Python starts, or set ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 too",
            torch.backends.cpu.get_cpu_capability())
