"""folovllm's native CPU kernels (`folovllm/csrc/cpu/*.cpp`), built on first use.

vLLM ships its kernels compiled (`vllm._C`, wrapped by `vllm/_custom_ops.py`). We compile ours
the first time they are asked for, with `torch.utils.cpp_extension.load` (gcc + ninja, about a
minute on two cores), and torch caches the result (`~/.cache/torch_extensions`, or
`$TORCH_EXTENSIONS_DIR`) until a source file changes. The build targets this CPU
(`-march=native`), so the cached module's name carries a hash of the CPU's model and flags.

    rms_norm, fused_add_rms_norm    layers/layernorm.py:RMSNorm
    rotary_embedding                layers/rotary_embedding.py:RotaryEmbedding
    silu_and_mul                    layers/activation.py:SiluAndMul
    paged_attention_decode,         attention_backends/cpu_attn.py:CPUAttentionBackend
    paged_attention_prefill

Every layer keeps its readable torch version (`forward_native`); `EngineConfig.custom_ops`
chooses between the two (see `model_executor/custom_op.py`), and tests/test_custom_ops.py
compares them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

_SOURCES = ("torch_bindings.cpp", "attention.cpp", "prefill_attention.cpp", "elementwise.cpp")
_CSRC = Path(__file__).parent / "csrc" / "cpu"
_ops: Optional[ModuleType] = None
_build_error: Optional[str] = None

# -O3 -march=native: the loops are written for the compiler to vectorise for this CPU (AVX-512
# here). -ffast-math lets it reorder float sums (vectorised reductions) and call glibc's vector
# exp (libmvec); it is a compile flag only: linked in, it would flush denormals process-wide.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_LDFLAGS = ["-lmvec", "-fopenmp"]


def load_ops() -> ModuleType:
    """The compiled kernels, built (or loaded from torch's cache) on the first call.

    Raises RuntimeError, saying why, when they cannot be built here (no C++ compiler, no ninja,
    not Linux x86-64).
    """
    global _ops, _build_error
    if _ops is not None:
        return _ops
    if _build_error is not None:
        raise RuntimeError(_build_error)
    try:
        if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
            raise RuntimeError(f"they are written for Linux on x86-64, not {sys.platform}/{os.uname().machine}")
        from torch.utils.cpp_extension import load

        logger.info("building folovllm's CPU kernels (first use; cached afterwards)")
        _ops = load(
            name=f"folovllm_cpu_ops_{_cpu_fingerprint()}",
            sources=[str(_CSRC / name) for name in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - the reason is kept and reported
        _build_error = (
            f"folovllm's CPU kernels could not be built: {e}. They need gcc and ninja "
            "(`pip install ninja`); use custom_ops='none' for the plain torch path."
        )
        raise RuntimeError(_build_error) from e
    return _ops


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's model and instruction set: the build is -march=native, so a
    cache shared with another machine (an NFS home, a copied image) must not hand it our .so."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    wanted = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:8]


def ops_available() -> bool:
    """True when the kernels are built or can be built now (this may build them)."""
    try:
        load_ops()
    except RuntimeError:
        return False
    return True
