#!/usr/bin/env bash
# Make the side venv in which GPTQModel itself writes stage 07's test fixtures
# (tools/gptqmodel_fixtures.py). GPTQModel is never a dependency of folovllm: it needs a newer
# torch (>= 2.14.1) and transformers (>= 5.20) than folovllm's venv, so it lives apart, and the
# fixtures it writes (tests/fixtures/gptqmodel/) are committed so that the tests need none of it.
#
#   bash tools/make_gptqmodel_venv.sh [VENV_DIR]        (default /work/venvs/gptqmodel)
#
# gptqmodel 7.7.0 is a pure-Python sdist here (its kernels are JIT-built on demand; the CPU path
# quantizes with plain torch), so no compiler or CUDA is needed to install it.
set -euo pipefail
VENV="${1:-/work/venvs/gptqmodel}"
GPTQMODEL_VERSION="${GPTQMODEL_VERSION:-7.7.0}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.25.0}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check)
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "gptqmodel==$GPTQMODEL_VERSION" "transformers==$TRANSFORMERS_VERSION"
"$VENV/bin/python" -c "import gptqmodel, torch, transformers; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
