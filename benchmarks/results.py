"""The one results writer: every benchmark's `<name>.json` and `<name>.md`, each saying where,
when and from what code its numbers come.

    record = result_record("benchmarks.run", argv, config=..., systems=...)
    write_results(RESULTS_DIR, "stage02_mixed_cpu", record, markdown)

`result_record` puts first what makes a number reproducible: the command, the date (UTC), the
git commit ("+dirty" if folovllm/ had uncommitted edits) and the machine (CPU model and SIMD
flags, cores, torch and transformers versions, torch threads, the GPU under CUDA). The `.md` is
a one-line caption (`machine_short`, `shared_machine_note`) and table(s); the docs include it by
snippet, so it is the table readers see.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "docs" / "assets"


def result_record(module: str, argv: Optional[list[str]], **fields: Any) -> dict[str, Any]:
    """command, date, git_commit, machine, then `fields`. Call it after torch.set_num_threads
    (the machine records the thread count) and pass the `argv` given to `main` (None: sys.argv)."""
    args = sys.argv[1:] if argv is None else argv
    return dict(command=f"python -m {module} {shlex.join(args)}".strip(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_commit(), machine=machine_description(), **fields)


def write_results(out_dir: Path | str, name: str, result: dict[str, Any], markdown: Optional[str]) -> None:
    """`<out_dir>/<name>.json` (everything measured) and, unless None, `<name>.md`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(dump_json(result))
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown)
    print(f"wrote {out / name}.json" + (" and .md" if markdown is not None else ""))


def dump_json(obj: Any) -> str:
    """Indented JSON, but a list of plain numbers (timings, per-step traces) on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-0-9.eE,\s]*?|(?:null|true|false|[-0-9.eE]+)(?:,\s*(?:null|[-0-9.eE]+))*)\s*\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1).strip()) + "]", text) + "\n"


def shared_machine_note(result: dict[str, Any], cpu_ratios: bool = True) -> str:
    """A caption's warning when the 1-minute load average exceeded the cores (CPU runs only):
    other work competed for the cores, so wall times stretched."""
    load, machine = result.get("peak_loadavg_1m"), result["machine"]
    cores = machine.get("cpu_cores") or 1
    if load is None or machine.get("gpu") is not None or load <= cores:
        return ""
    return (f" The machine was shared (1-minute load average up to {load:.1f} on {cores} cores): "
            "read the ratios, not the absolute numbers"
            + ("; the ratios of CPU time in brackets are not stretched by waiting for a core."
               if cpu_ratios else "."))


# -- the machine ---------------------------------------------------------------------------------


def _cpuinfo(key: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_description() -> dict[str, Any]:
    """CPU, cores, torch version and threads, and the GPU when CUDA is available."""
    import torch

    flags = set((_cpuinfo("flags") or "").split())  # the SIMD extensions float32 matmuls use
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc: dict[str, Any] = {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU",
        "cpu_flags": [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags],
        "cpu_cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    from folovllm.platforms import cpu as cpu_platform

    # which fast CPU path ran (our kernels' ISA, bf16's linear path; FOLOVLLM_CPU_ISA=avx2 forces
    # an AVX-512 machine onto the AVX2 one): the same CPU gives different numbers on each
    desc["cpu_path"] = cpu_platform.describe()
    desc["kernel_isa"] = cpu_platform.kernel_isa()
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
        where = f"{cpu}, {desc['cpu_cores']} cores, {threads} thread{'s' if threads != 1 else ''}"
        if desc.get("kernel_isa"):
            where += f", {desc['kernel_isa'].upper()} path"
    return f"{where}, torch {desc['torch']}"


def git_commit() -> Optional[str]:
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
