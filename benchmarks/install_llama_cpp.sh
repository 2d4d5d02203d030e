#!/usr/bin/env bash
# Build llama.cpp's benchmark tools (llama-bench, llama-batched-bench, llama-quantize,
# llama-debug) as a peer for benchmarks/llama_cpp_peer.py, in a folder of its own. llama.cpp is
# never a dependency of folovllm: the peer script only runs these binaries in subprocesses.
#
#   bash benchmarks/install_llama_cpp.sh [DIR]        (default /work/peers/llama.cpp)
#
# Why a source build: the llama-cpp-python wheel ships the shared library and its Python binding,
# not llama.cpp's command-line tools, and PyPI has no wheel of the tools themselves. Only package
# registries are reachable from the machines we measure on (no GitHub), so the llama.cpp sources
# come from the llama-cpp-python source distribution (vendor/llama.cpp inside it), which also
# carries llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py) and its gguf-py package.
#
# What it makes under DIR (a second run reuses every step that is already done):
#   DIR/src/                 the unpacked sdist (DIR/src/vendor/llama.cpp is llama.cpp)
#   DIR/venv/                cmake, ninja and the converter's Python dependencies (CPU torch)
#   DIR/build-native/bin/    tools built for this CPU (GGML_NATIVE=ON: AVX-512 where it has it)
#   DIR/build-avx2/bin/      the portable build (AVX2+FMA, AVX-512 off), with BUILD_AVX2=1
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 2), BUILD_AVX2=1 to also
# make the portable build, PYTHON (default python3).
set -euo pipefail
DIR="${1:-/work/peers/llama.cpp}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
TOOLS=(llama-bench llama-batched-bench llama-quantize llama-debug)
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
say() { echo "[install_llama_cpp $(date -u +%H:%M:%S)] $*"; }

# 1. A venv of its own: build tools from pip (the system cmake may be too old) and the
#    converter's imports (numpy, sentencepiece, transformers, torch for the tensor loaders).
if [ ! -x "$DIR/venv/bin/cmake" ]; then
    say "venv with cmake, ninja and the converter's dependencies in $DIR/venv"
    source "$(dirname "$0")/cpu_torch_venv.sh"
    make_cpu_torch_venv "$DIR/venv"
    "${PIP[@]}" --timeout 60 cmake ninja numpy safetensors sentencepiece "transformers>=4.45" \
        "protobuf" "$TORCH_CPU"
else
    say "reusing $DIR/venv"
fi
PIP=("$DIR/venv/bin/pip" install --disable-pip-version-check --timeout 60)

# 2. The sources: the sdist from PyPI (pip download verifies the hash the index publishes).
#    --no-binary names only this package: ":all:" would also build its build dependencies
#    (scikit-build-core, cmake) from source to read its metadata, many minutes for nothing.
SRC="$DIR/src"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    say "downloading llama-cpp-python==$VERSION (source distribution)"
    rm -rf "$DIR/sdist" && mkdir -p "$DIR/sdist"
    timeout 600 "$DIR/venv/bin/pip" download --disable-pip-version-check --timeout 60 \
        --no-binary llama-cpp-python --no-deps -d "$DIR/sdist" "llama-cpp-python==$VERSION"
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar -xzf "$DIR"/sdist/llama_cpp_python-*.tar.gz -C "$SRC" --strip-components=1
else
    say "reusing sources in $SRC"
fi
LLAMA="$SRC/vendor/llama.cpp"
# The converter imports gguf from llama.cpp's own gguf-py (newer than PyPI's gguf as a rule).
if ! "$DIR/venv/bin/python" -c "import gguf" 2>/dev/null; then
    say "installing llama.cpp's gguf-py into the venv"
    "${PIP[@]}" --no-deps "$LLAMA/gguf-py"
fi

# 3. The builds. Only the tools (no server, no tests, no examples we do not run), Release, no curl.
build() {  # build <name> <extra cmake flags...>
    local name="$1"; shift
    local out="$DIR/build-$name"
    local t missing=""
    for t in "${TOOLS[@]}"; do [ -x "$out/bin/$t" ] || missing="$missing $t"; done
    if [ -z "$missing" ]; then
        say "reusing $out (delete it to rebuild)"
        return
    fi
    say "configuring $out: $*"
    "$DIR/venv/bin/cmake" -S "$LLAMA" -B "$out" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$DIR/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=ON "$@"
    say "building ${TOOLS[*]} with $JOBS jobs (minutes on two cores)"
    local targets=()
    for t in "${TOOLS[@]}"; do targets+=(--target "$t"); done
    "$DIR/venv/bin/cmake" --build "$out" "${targets[@]}" -j "$JOBS"
    say "built $(ls "$out/bin" | tr '\n' ' ')"
}
build native -DGGML_NATIVE=ON
if [ "${BUILD_AVX2:-0}" = "1" ]; then
    build avx2 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
        -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
fi
"$DIR/build-native/bin/llama-bench" --help >/dev/null
say "done: $DIR/build-native/bin; converter $LLAMA/convert_hf_to_gguf.py"
