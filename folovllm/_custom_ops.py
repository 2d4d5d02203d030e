"""folovllm's native CPU kernels (`folovllm/csrc/cpu/*.cpp`), built on first use.

vLLM ships its kernels compiled (`vllm._C`, wrapped by `vllm/_custom_ops.py`). We compile ours
the first time they are asked for (gcc + ninja through `torch.utils.cpp_extension.load`, about a
minute on two cores) or ahead of time with `folovllm build-kernels`, and keep the result:

    rms_norm, fused_add_rms_norm    layers/layernorm.py:RMSNorm
    rotary_embedding                layers/rotary_embedding.py:RotaryEmbedding
    silu_and_mul                    layers/activation.py:SiluAndMul
    paged_attention_decode,         attention_backends/cpu_attn.py:CPUAttentionBackend
    paged_attention_prefill
    bgmv_add_lora, sgmv_add_lora    lora/punica_wrapper.py:PunicaWrapper (stage 11)
    decode_linear                   layers/cpu_gemm.py:dense_linear (1-16 rows, float32)
    prepack_moe_weight,             layers/fused_moe.py:FusedMoE (one call per MoE layer)
    fused_experts_cpu
    int4_decode_linear              layers/quantization/gptq.py:Int4PanelWeight (GPTQ 4-bit)
    int4_decode_linear_q8           the same, activations rounded to int8 (opt-in, FOLOVLLM_GPTQ_KERNEL)
    stream_read                     benchmarks/roofline.py (the best-case read: the bandwidth limit)

Every layer keeps its readable torch version (`forward_native`); `EngineConfig.custom_ops`
chooses between the two (see `model_executor/custom_op.py`), and tests/test_custom_ops.py
compares them.

How a build is kept and shared (`build_extension`), so that it can never hang a later start::

    $FOLOVLLM_KERNEL_CACHE/                          default ~/.cache/folovllm/kernels
      folovllm_cpu_ops_<key>/                        a complete build: the .so and BUILD_DONE
        folovllm_cpu_ops_<key>.so
        BUILD_DONE
      folovllm_cpu_ops_<key>.lock                    flock'ed while one process builds
      folovllm_cpu_ops_<key>.build-<random>/         a build in progress (or a killed one's
                                                     leftovers, removed by the next builder)

- `<key>` hashes everything the binary depends on: the sources and headers, the flags (with
  `-march=native`, the CPU's model and flags too), torch's and Python's versions. Two checkouts
  with the same sources share one build; two with different sources never overwrite each other.
- A process builds in a folder of its own and renames it into place when the build succeeded,
  so a half-written build is never loaded, whatever killed its builder.
- Builders take an `fcntl.flock` on the `.lock` file. The kernel drops it when its holder dies
  (Ctrl-C, SIGKILL, the OOM killer), unlike torch's own lock file, which a killed build leaves
  behind and every later `load` then waits on forever. A process that finds the lock held waits,
  says so, and gives up after `FOLOVLLM_KERNEL_BUILD_TIMEOUT` seconds (then "auto" runs the torch
  code, with a warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence

import torch

from folovllm import envs
from folovllm.platforms import cpu as cpu_platform

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc" / "cpu"
_SOURCES = ("torch_bindings.cpp", "attention.cpp", "prefill_attention.cpp", "elementwise.cpp",
            "lora.cpp", "decode_gemm.cpp", "moe.cpp", "int4_gemm.cpp")
_HEADERS = ("ops.h",)
_ops: Optional[ModuleType] = None
_build_error: Optional[str] = None

# -O3: the loops are written for the compiler to vectorise, for this CPU (-march=native: AVX-512
# where it has it) or for any AVX2+FMA CPU (-march=x86-64-v3, FOLOVLLM_CPU_ISA=avx2).
# -ffast-math lets it reorder float sums (vectorised reductions) and call glibc's vector exp
# (libmvec); it is a compile flag only: linked in, it would flush denormals process-wide.
_MARCH = {"native": "-march=native", "avx2": "-march=x86-64-v3"}
_LDFLAGS = ["-lmvec", "-fopenmp"]
DONE_FILE = "BUILD_DONE"


def kernel_cflags() -> list[str]:
    return ["-O3", _MARCH[envs.cpu_isa()], "-ffast-math", "-fopenmp"]


def load_ops() -> ModuleType:
    """The compiled kernels, built (or loaded from the cache) on the first call.

    Raises RuntimeError, saying why, when they cannot be built here (no C++ compiler, no ninja,
    not Linux x86-64, another process's build still running after the timeout).
    """
    global _ops, _build_error
    if _ops is not None:
        return _ops
    if _build_error is not None:
        raise RuntimeError(_build_error)
    try:
        if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
            raise RuntimeError(f"they are written for Linux on x86-64, not {sys.platform}/{os.uname().machine}")
        missing = {"avx2", "fma"} - cpu_platform.cpu_flags()
        if envs.cpu_isa() == "avx2" and missing:  # the binary would die of an illegal instruction
            raise RuntimeError(f"FOLOVLLM_CPU_ISA=avx2 builds them for AVX2 and FMA, and this CPU "
                               f"does not report {', '.join(sorted(missing))}; unset it")
        _ops = build_extension(
            "folovllm_cpu_ops",
            sources=[_CSRC / name for name in _SOURCES],
            depends=[_CSRC / name for name in _HEADERS],
            extra_cflags=kernel_cflags(),
            extra_ldflags=_LDFLAGS,
            what=f"folovllm's CPU kernels ({cpu_platform.kernel_isa()})",
        )
    except Exception as e:  # noqa: BLE001 - the reason is kept and reported
        _build_error = (
            f"folovllm's CPU kernels could not be built: {e}. They need gcc and ninja "
            "(`pip install ninja`); use custom_ops='none' for the plain torch path."
        )
        raise RuntimeError(_build_error) from e
    return _ops


def ops_available() -> bool:
    """True when the kernels are built or can be built now (this may build them)."""
    try:
        load_ops()
    except RuntimeError:
        return False
    return True


# --8<-- [start:build_extension]
def build_extension(
    name: str,
    sources: Sequence[Path],
    depends: Sequence[Path] = (),
    extra_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    root: Optional[Path] = None,
    what: Optional[str] = None,
) -> ModuleType:
    """Load the Python extension built from `sources` (and the headers in `depends`) with these
    flags, building it first if no complete build of exactly these inputs exists under `root`
    (default `FOLOVLLM_KERNEL_CACHE`). Safe against killed builders and concurrent starts (see
    the module docstring). `what` names it in the log lines."""
    root = Path(root) if root is not None else envs.kernel_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = build_key(sources, depends, extra_cflags, extra_ldflags)
    module_name = f"{name}_{key}"
    final = root / module_name
    what = what or name
    if (final / DONE_FILE).exists():  # the common case: built before, no lock needed
        return _import(module_name, final)
    with _build_lock(root / f"{module_name}.lock", what):
        if (final / DONE_FILE).exists():  # another process built it while we waited
            return _import(module_name, final)
        for stale in root.glob(f"{module_name}.build-*"):  # a killed builder's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # no BUILD_DONE: never complete
        work = Path(tempfile.mkdtemp(prefix=f"{module_name}.build-", dir=root))
        logger.info("compiling %s (once per version of the sources; about a minute on 2 cores) "
                    "in %s ...", what, final)
        start = time.perf_counter()
        from torch.utils.cpp_extension import load

        module = load(name=module_name, sources=[str(s) for s in sources],
                      extra_cflags=list(extra_cflags), extra_ldflags=list(extra_ldflags),
                      build_directory=str(work), verbose=False)
        (work / DONE_FILE).write_text(f"built in {time.perf_counter() - start:.1f} s\n")
        work.chmod(0o755)  # mkdtemp made it private; the cache may be shared
        os.rename(work, final)  # atomic: later starts see all of it or nothing
        module.__file__ = str(final / f"{module_name}.so")
        logger.info("compiled %s in %.0f s", what, time.perf_counter() - start)
        return module


def build_key(sources: Sequence[Path], depends: Sequence[Path], cflags: Sequence[str],
              ldflags: Sequence[str]) -> str:
    """A short hash of everything the binary depends on (never the folder it came from)."""
    h = hashlib.sha256()
    for path in [*sources, *depends]:
        h.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    h.update(" ".join([*cflags, "|", *ldflags]).encode())
    h.update(f"torch {torch.__version__} python {sys.version_info[:3]}".encode())
    if "-march=native" in cflags:  # the binary is for this CPU model only
        h.update(_cpu_fingerprint().encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (released by the kernel if this process dies), waiting
    at most `FOLOVLLM_KERNEL_BUILD_TIMEOUT` seconds for another builder, and saying so."""
    timeout = envs.kernel_build_timeout()
    with open(path, "a+") as f:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout:
                    raise RuntimeError(
                        f"another process has been building them for over {timeout:.0f} s "
                        f"(it holds {path}); raise FOLOVLLM_KERNEL_BUILD_TIMEOUT or wait for it"
                    ) from None
                if not told:
                    f.seek(0)
                    logger.info("waiting for another process (%s) that is compiling %s ...",
                                f.read().strip() or "pid unknown", what)
                    told = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
# --8<-- [end:build_extension]


def _import(module_name: str, folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, folder / f"{module_name}.so")
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{folder} holds no loadable {module_name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_fingerprint() -> str:
    """This CPU's model and instruction set: a -march=native build must not be handed to another
    machine sharing the cache (an NFS home, a copied image)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    return "\n".join([line for line in info if line.startswith(("model name", "flags"))][:2])
