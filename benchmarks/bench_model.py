"""The benchmark model and the description of the machine the numbers come from.

The model is `folovllm.tiny_model`'s "bench" size, Qwen3 architecture, random weights
(initializer_range 0.2, seed 0), float32, built locally once and cached under
`folovllm.tiny_model.default_cache_dir() / "bench-qwen3"` (~/.cache/folovllm/bench-qwen3).
It loads through the same path as a real hub checkpoint, in folovllm and in HF transformers.

Shapes (Qwen3ForCausalLM)::

    vocab_size               512   (a BPE trained locally; ids 0..2 are special, eos = 2)
    hidden_size              512
    num_hidden_layers          8
    num_attention_heads        8   head_dim 64 (q: 512 -> 512)
    num_key_value_heads        4   (GQA, group 2; k, v: 512 -> 256)
    intermediate_size       1536   (SwiGLU MLP)
    q_norm / k_norm          yes   (Qwen3: RMSNorm on each head's q and k)
    max_position_embeddings 2048
    tie_word_embeddings     True

    parameters              25,437,696  (~25.4M: 3,146,880 per layer x 8 + 262,144 embedding
                                         + 512 final norm); 97 MiB in float32
    KV cache per token      16 KiB in float32 (2 x 8 layers x 4 kv heads x 64 x 4 bytes)

About 51 MFLOP per token in the matmuls: big enough that on one CPU thread the matmuls, not
Python, dominate a step; small enough that a full benchmark runs in minutes. Its vocabulary is
tiny (512 vs Qwen3's 151,936), so the LM head and sampler weigh far less here than in a real
model.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

BENCH_ARCH = "qwen3"
BENCH_SIZE = "bench"
BENCH_PARAMS = 25_437_696  # checked by bench_model_info()


def bench_model_path() -> Path:
    """Build (once; later calls reuse the cache) and return the benchmark checkpoint folder."""
    from folovllm.tiny_model import build_tiny_checkpoint, default_cache_dir

    return build_tiny_checkpoint(default_cache_dir() / f"bench-{BENCH_ARCH}", arch=BENCH_ARCH,
                                 size=BENCH_SIZE)


def bench_model_info(path: Path) -> dict[str, Any]:
    """The model's shapes as read back from its config.json, for the results file."""
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "max_position_embeddings", "tie_word_embeddings", "dtype")
    info = {k: cfg.get(k) for k in keys}
    info.update(name=f"folovllm tiny_model {BENCH_ARCH}/{BENCH_SIZE} (random weights)",
                path=str(path), num_parameters=BENCH_PARAMS)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> list[str]:
    """The SIMD extensions that matter for float32 matmuls on x86."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                    return [x for x in wanted if x in flags]
    except OSError:
        pass
    return []


def machine_description() -> dict[str, Any]:
    """CPU, cores, torch version and threads, and the GPU when CUDA is available."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    try:
        import transformers

        desc["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
        desc["cuda"] = torch.version.cuda
    return desc


def machine_short(desc: dict[str, Any]) -> str:
    """One line for table captions, e.g. 'AMD EPYC, 2 cores, 1 thread, torch 2.13.0+cpu'."""
    if desc.get("gpu"):
        where = f"{desc['gpu']} (CUDA {desc.get('cuda')})"
    else:
        cpu = re.sub(r"\s+", " ", desc["cpu"])
        threads = desc["torch_threads"]
        where = (f"{cpu}, {desc['cpu_cores']} cores, {threads} thread"
                 f"{'s' if threads != 1 else ''}")
    return f"{where}, torch {desc['torch']}"


def git_commit() -> str | None:
    """The commit the numbers were measured at, "+dirty" if folovllm/ had uncommitted edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "folovllm"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_results(out_dir: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """`<out_dir>/<name>.json` (everything measured) and `<name>.md` (the table the docs include)."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
