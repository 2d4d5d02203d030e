"""The environment variables folovllm reads, in one place (vLLM keeps its own in `vllm/envs.py`).

    FOLOVLLM_CPU_ISA                 "native" (default): use what this CPU has (AVX-512, AVX-512
                                     BF16, ...). "avx2": behave as on a CPU with AVX2 and FMA
                                     only, the common laptop and cloud class: our C++ kernels are
                                     compiled for x86-64-v3 (their portable variants), oneDNN and
                                     ATen are capped at AVX2, so bfloat16 takes its portable path.
                                     How a developer with AVX-512 tests what an AVX2 user runs
                                     (CI runs the suite both ways). Read once, when folovllm is
                                     imported: set it before starting Python.
    FOLOVLLM_KERNEL_CACHE            where the compiled CPU kernels are kept (default
                                     ~/.cache/folovllm/kernels); one folder per version of the
                                     sources, flags, torch and CPU.
    FOLOVLLM_KERNEL_BUILD_TIMEOUT    seconds a start waits for another process's kernel build
                                     before giving up on the kernels (default 900).
    FOLOVLLM_CONFIGURE_LOGGING       "1" (default): folovllm prints its INFO messages (what it
                                     builds, which path it chose) on stderr; "0": it leaves
                                     logging to the application.
    FOLOVLLM_LOGGING_LEVEL           the level of those messages (default INFO).

This module imports nothing heavy: `folovllm/__init__.py` applies `FOLOVLLM_CPU_ISA` before
torch starts (oneDNN and ATen read their caps once, on first use).
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_ISAS = ("native", "avx2")


def cpu_isa() -> str:
    """The `FOLOVLLM_CPU_ISA` switch, checked."""
    value = os.environ.get("FOLOVLLM_CPU_ISA", "native").strip().lower() or "native"
    if value not in CPU_ISAS:
        raise ValueError(f"FOLOVLLM_CPU_ISA must be one of {', '.join(CPU_ISAS)}, got {value!r}")
    return value


def kernel_cache_root() -> Path:
    default = Path.home() / ".cache" / "folovllm" / "kernels"
    return Path(os.environ.get("FOLOVLLM_KERNEL_CACHE") or default)


def kernel_build_timeout() -> float:
    value = os.environ.get("FOLOVLLM_KERNEL_BUILD_TIMEOUT", "900")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"FOLOVLLM_KERNEL_BUILD_TIMEOUT must be a number of seconds, got {value!r}") from None


def configure_logging() -> bool:
    return os.environ.get("FOLOVLLM_CONFIGURE_LOGGING", "1") != "0"


def logging_level() -> str:
    return os.environ.get("FOLOVLLM_LOGGING_LEVEL", "INFO").upper()


def apply_cpu_isa() -> None:
    """Under FOLOVLLM_CPU_ISA=avx2, cap oneDNN (`ONEDNN_MAX_CPU_ISA`) and ATen's vectorised
    kernels (`ATEN_CPU_CAPABILITY`) at AVX2, unless the user set them. Both are read the first
    time torch runs an operation, so this must happen before that: folovllm's import does it."""
    if cpu_isa() == "avx2":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
