# Sourced by the peer installers (install_vllm_cpu.sh, install_lm_eval.sh): a venv of its own
# with torch pinned to the CPU build folovllm uses, installed FIRST so that no later resolver
# pulls a CUDA torch (several GB of nvidia-* wheels) to satisfy a bare `torch` requirement.
#
#   source "$(dirname "$0")/cpu_torch_venv.sh"
#   make_cpu_torch_venv "$VENV"        # then "${PIP[@]}" installs into it
#
# torch comes from a local wheel where the machine has one (pip's find-links), else from
# PyTorch's CPU index (TORCH_INDEX; set it to "" to use only PyPI's index).
TORCH_CPU="torch==2.13.0+cpu"
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

make_cpu_torch_venv() {
    local venv="$1"
    "${PYTHON:-python3}" -m venv "$venv"
    PIP=("$venv/bin/pip" install --disable-pip-version-check)
    if ! "${PIP[@]}" "$TORCH_CPU" 2>/dev/null; then
        "${PIP[@]}" "$TORCH_CPU" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
    fi
}
