"""Session fixtures shared by every test folder, registered for the whole repository by the root
`conftest.py` (so `pytest stages/0N` alone sees them too).

    tiny_checkpoints   {"qwen3": Path, "qwen2": Path, "llama": Path}: tiny random-weight HF
                       checkpoints + locally trained tokenizers, built once per session
    tiny_qwen3         the qwen3 one
    hf_models          hf_models(arch) -> transformers model (float32, eval), loaded once
    hf_qwen3           hf_models("qwen3")
    greedy_reference   greedy_reference(arch) -> GreedyReference: `mixed_prompts` and HF greedy
                       tokens for each, checked to be diverse (see below)

Why the diversity check: a tiny random model with the default init repeats a handful of tokens,
so a broken attention path or KV cache could still "match" HF. `GREEDY_MIN_DISTINCT` distinct
tokens over the mixed prompts makes every test built on the reference able to fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.helpers import ARCHS, hf_greedy, mixed_prompts, num_distinct

GREEDY_MIN_DISTINCT = 40  # distinct tokens the HF greedy reference must contain


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny, so one thread is as fast as several; and on a 2-core machine
    # shared with other processes, OpenMP threads that spin-wait for each other make everything
    # crawl (measured: `pytest stages/01` 9 s with one thread, 2 min with two, under load).
    torch.set_num_threads(1)


@dataclass(frozen=True)
class GreedyReference:
    arch: str
    path: Path
    prompts: list[list[int]]
    max_tokens: list[int]
    outputs: list[list[int]]  # HF generate(do_sample=False), one prompt at a time


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from folovllm.testing.tiny_model import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["qwen3"]


@pytest.fixture(scope="session")
def hf_models(tiny_checkpoints: dict[str, Path]) -> Callable[[str], Any]:
    from transformers import AutoModelForCausalLM

    cache: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(
                tiny_checkpoints[arch], dtype=torch.float32
            ).eval()
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def hf_qwen3(hf_models: Callable[[str], Any]) -> Any:
    return hf_models("qwen3")


@pytest.fixture(scope="session")
def greedy_reference(
    tiny_checkpoints: dict[str, Path], hf_models: Callable[[str], Any]
) -> Callable[[str], GreedyReference]:
    cache: dict[str, GreedyReference] = {}

    def get(arch: str) -> GreedyReference:
        if arch not in cache:
            hf = hf_models(arch)
            prompts, max_tokens = mixed_prompts(hf.config.vocab_size, seed=0)
            outputs = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
            distinct = num_distinct(outputs)
            assert distinct > GREEDY_MIN_DISTINCT, (
                f"weak oracle: HF greedy output of the {arch} tiny model has only {distinct} "
                f"distinct tokens (need > {GREEDY_MIN_DISTINCT}); raise initializer_range"
            )
            cache[arch] = GreedyReference(arch, tiny_checkpoints[arch], prompts, max_tokens, outputs)
        return cache[arch]

    return get
