"""One test for the promise every stage makes: the same greedy tokens as HF transformers.

For every architecture (Qwen3, Qwen2, Llama tiny checkpoints) and every built stage
(1..`LATEST_STAGE`, picked up automatically as stages land), `LLM.generate` greedy on the ten
mixed prompts of `greedy_reference` (1..200 tokens, all different max_tokens) must return
exactly HF `generate(do_sample=False)`'s tokens.

`max_num_seqs=3` makes the workload need several batches: stage 01 runs four static batches,
stage 02 on admits waiting requests as others finish, stage 03 pages their KV. (3, not the 4 or
16 of the per-stage tests, so no case here repeats one of theirs.) The per-stage folders test
what each stage changes (costs, preemption, backends), mostly on Qwen3; this file only pins down
that no stage changes the output, on every architecture.
"""

from __future__ import annotations

import pytest

from folovllm import LLM, SamplingParams
from folovllm.config import LATEST_STAGE
from tests.helpers import ARCHS


@pytest.mark.parametrize("stage", range(1, LATEST_STAGE + 1), ids=lambda s: f"stage{s:02d}")
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_hf_at_every_stage(arch, stage, greedy_reference):
    ref = greedy_reference(arch)
    llm = LLM(str(ref.path), stage=stage, dtype="float32", max_num_seqs=3, max_model_len=256)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in ref.max_tokens]
    outputs = llm.generate(ref.prompts, params, use_tqdm=False)
    for i, (out, want) in enumerate(zip(outputs, ref.outputs)):
        got = out.outputs[0].token_ids
        assert got == want, f"{arch} stage {stage}, prompt {i} ({len(ref.prompts[i])} tokens): ours {got} != HF {want}"
