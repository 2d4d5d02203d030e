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
    FOLOVLLM_ONEDNN_CACHE_CAPACITY   how many compiled oneDNN matmuls a process keeps (default
                                     64, at least 1): oneDNN compiles one per weight shape and
                                     token count T, so unbounded RSS grew with every new step
                                     size (docs/serving.md, "Memory"). Sets oneDNN's
                                     `ONEDNN_PRIMITIVE_CACHE_CAPACITY` and torch's
                                     `LRU_CACHE_CAPACITY`. Read once, when folovllm is imported.
    FOLOVLLM_API_KEY                 the key `folovllm serve` requires when no `--api-key` is
                                     given (vLLM's `VLLM_API_KEY` is read too, after it): a
                                     key in argv is visible to every user in `ps`, one in the
                                     environment is not. `--api-key` wins over both.
    FOLOVLLM_CPU_GEMM                how plain float32 linears are stored and multiplied on CPU
                                     with our kernels (layers/cpu_gemm.py): "auto" (default) as
                                     the measured table says per shape, "decode" our streaming
                                     kernel everywhere, "onednn" oneDNN's packed matmul everywhere
    FOLOVLLM_BATCH_INVARIANT         "1": engines start in batch-invariant mode unless told
                                     otherwise (`EngineConfig.batch_invariant`'s default, as
                                     vLLM's `VLLM_BATCH_INVARIANT`); "0" (default): not.
                                     Read when an EngineConfig is made.

This module imports nothing heavy: `folovllm/__init__.py` applies `FOLOVLLM_CPU_ISA` and
`FOLOVLLM_ONEDNN_CACHE_CAPACITY` before torch runs anything (oneDNN and ATen read their caps
and cache sizes once, on first use).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CPU_ISAS = ("native", "avx2")
CPU_GEMMS = ("auto", "decode", "onednn")
# compiled matmuls kept: ~12 step sizes x 5 weight shapes (qkv, o, gate_up, down, LM head)
ONEDNN_CACHE_CAPACITY = 64


def cpu_isa() -> str:
    """The `FOLOVLLM_CPU_ISA` switch, checked."""
    value = os.environ.get("FOLOVLLM_CPU_ISA", "native").strip().lower() or "native"
    if value not in CPU_ISAS:
        raise ValueError(f"FOLOVLLM_CPU_ISA must be one of {', '.join(CPU_ISAS)}, got {value!r}")
    return value


def cpu_gemm() -> str:
    """The `FOLOVLLM_CPU_GEMM` switch, checked."""
    value = os.environ.get("FOLOVLLM_CPU_GEMM", "auto").strip().lower() or "auto"
    if value not in CPU_GEMMS:
        raise ValueError(f"FOLOVLLM_CPU_GEMM must be one of {', '.join(CPU_GEMMS)}, got {value!r}")
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


def batch_invariant() -> bool:
    """The `FOLOVLLM_BATCH_INVARIANT` switch, checked: "1" or "0" (unset = "0")."""
    value = os.environ.get("FOLOVLLM_BATCH_INVARIANT", "0").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"FOLOVLLM_BATCH_INVARIANT must be 0 or 1, got {value!r}")
    return value == "1"


def configure_logging() -> bool:
    return os.environ.get("FOLOVLLM_CONFIGURE_LOGGING", "1") != "0"


def logging_level() -> str:
    return os.environ.get("FOLOVLLM_LOGGING_LEVEL", "INFO").upper()


def api_key() -> Optional[str]:
    """`FOLOVLLM_API_KEY`, else `VLLM_API_KEY` (a deployment written for vLLM keeps working);
    None when neither is set or both are empty."""
    return os.environ.get("FOLOVLLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def apply_cpu_isa() -> None:
    """Under FOLOVLLM_CPU_ISA=avx2, cap oneDNN (`ONEDNN_MAX_CPU_ISA`) and ATen's vectorised
    kernels (`ATEN_CPU_CAPABILITY`) at AVX2, unless the user set them. Both are read the first
    time torch runs an operation, so this must happen before that: folovllm's import does it."""
    if cpu_isa() == "avx2":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")


def onednn_cache_capacity() -> int:
    """The `FOLOVLLM_ONEDNN_CACHE_CAPACITY` knob, checked: at least 1 (torch crashes on an ideep
    LRU of capacity 0)."""
    value = os.environ.get("FOLOVLLM_ONEDNN_CACHE_CAPACITY", "").strip() or str(ONEDNN_CACHE_CAPACITY)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FOLOVLLM_ONEDNN_CACHE_CAPACITY must be a whole number >= 1, got {value!r}")
    return int(value)


def apply_onednn_cache_capacity() -> None:
    """Bound the two caches that keep a compiled matmul for every [T, in] x [in, out] seen.

    oneDNN JIT-compiles a matmul for each shape, T (the step's token count) included, and keeps
    it in its primitive cache (1,024 by default); torch's ideep layer keeps an LRU of its own
    beside it (`LRU_CACHE_CAPACITY`, 1,024). An engine step can have any T from 1 to
    `max_num_batched_tokens`, so under a varied load both filled up: ~0.5 MiB of JIT code per
    entry, and the heap holes the entries pin between a step's large temporaries (several MiB
    per entry at T ~ 1000). Bounded at 64, RSS stays flat (benchmarks/memory_rss.py). A step
    whose T has fallen out compiles again (0.3-5 ms per weight shape; the step paid that the
    first time it met this T anyway); a steady decode does not, its T repeats.

    Both are read on oneDNN's first use, so this runs before torch multiplies anything:
    folovllm's import does it. `FOLOVLLM_ONEDNN_CACHE_CAPACITY` sets both; without it, values
    given to the two variables themselves are kept (a process started by one that imported
    folovllm inherits them)."""
    capacity = str(onednn_cache_capacity())
    set_ = os.environ.__setitem__ if "FOLOVLLM_ONEDNN_CACHE_CAPACITY" in os.environ else os.environ.setdefault
    set_("ONEDNN_PRIMITIVE_CACHE_CAPACITY", capacity)
    set_("LRU_CACHE_CAPACITY", capacity)
