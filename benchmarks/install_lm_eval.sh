#!/usr/bin/env bash
# Install lm-evaluation-harness (lm-eval 0.4.x) into a venv of its own, for
# benchmarks/lm_eval_compare.py. It is never a dependency of folovllm: the comparison runs
# `lm_eval` from this venv as a subprocess, against `folovllm serve` (local-completions) and
# against HF transformers (--model hf) on the same checkpoint.
#
#   bash benchmarks/install_lm_eval.sh [VENV_DIR]      (default /work/venvs/lm-eval)
#
# torch is installed first, pinned to the CPU build folovllm uses (2.13.0+cpu): lm-eval asks for
# `torch>=1.8` and accelerate/peft for a recent torch, and a resolver left alone pulls the CUDA
# build from PyPI (several GB, with nvidia-* wheels). With torch already satisfied, pip keeps it
# (the venv and its torch: cpu_torch_venv.sh, shared with install_vllm_cpu.sh). `[api]` is the extra
# of the API models (local-completions: requests, aiohttp, tenacity, tiktoken), `[hf]` that of
# `--model hf` (accelerate, peft): lm-eval 0.4.13's base install has neither.
set -euo pipefail
VENV="${1:-/work/venvs/lm-eval}"
LM_EVAL_VERSION="${LM_EVAL_VERSION:-0.4.13}"
source "$(dirname "$0")/cpu_torch_venv.sh"
make_cpu_torch_venv "$VENV"
"${PIP[@]}" "lm-eval[api,hf]==$LM_EVAL_VERSION" "$TORCH_CPU" transformers
"$VENV/bin/python" - <<'PY'
import torch, lm_eval, transformers
assert torch.__version__.endswith("+cpu"), f"a non-CPU torch got in: {torch.__version__}"
print("lm_eval", lm_eval.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
PY
