"""Every system the benchmarks can time, by name, and the peers each stage is compared with.

    folovllm-stageN[key=value,...]   folovllm.py   LLM(model, stage=N, **EngineConfig fields)
    hf-generate                      hf.py         HF transformers model.generate, static batches
    hf-generate-batch                hf.py         HF transformers' own continuous batching
    vllm, vllm-eager                 vllm.py       real vLLM (CPU build, own venv, subprocess)

The ladder is stages 01-06 (`folovllm.config.for_stage`); the axes beside it (`config.AXES`) are
entries on top of a stage, not stages: 07, a GPTQ checkpoint, `folovllm-stage6[model=PATH]`
(`folovllm/tools/gptq_quantizer.py` makes one); 08, `folovllm-stage6[tensor_parallel_size=2]`.

Adding a peer is one `System` subclass (base.py) in a file of its own and one entry in `SYSTEMS`
(and in `STAGE_PEERS` for the stages it is compared with).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from benchmarks.systems.base import BenchConfig, System
from benchmarks.systems.folovllm import FolovllmSystem
from benchmarks.systems.hf import HFGenerateBatchSystem, HFGenerateSystem
from benchmarks.systems.vllm import VLLMSystem

__all__ = ["BenchConfig", "System", "SYSTEMS", "STAGE_PEERS", "make_system", "parse_folovllm_name",
           "systems_for_stages"]

# Every system, by name. `folovllm-stageN` needs an entry only if it is more than
# `FolovllmSystem(cfg, N)` (`make_system` builds that from the name).
SYSTEMS: dict[str, Callable[[BenchConfig], System]] = {
    "folovllm-stage1": lambda cfg: FolovllmSystem(cfg, 1),
    "hf-generate": HFGenerateSystem,
    "hf-generate-batch": HFGenerateBatchSystem,
    # real vLLM's CPU build in a venv of its own, driven in a child process (systems/vllm.py)
    "vllm": lambda cfg: VLLMSystem(cfg, eager=False),
    "vllm-eager": lambda cfg: VLLMSystem(cfg, eager=True),
}
# The peers each stage is compared with (the previous folovllm stage counts as a peer: it is
# what the stage improves on).
STAGE_PEERS: dict[int, list[str]] = {
    1: ["hf-generate"],
    2: ["folovllm-stage1", "hf-generate", "hf-generate-batch"],
    3: ["folovllm-stage2"],
    4: ["folovllm-stage3"],
    5: ["folovllm-stage4"],
    6: ["folovllm-stage5"],
}

_FOLOVLLM_NAME = re.compile(r"folovllm-stage(\d+)(?:\[(.*)\])?")


def parse_folovllm_name(name: str) -> Optional[tuple[int, dict[str, Any]]]:
    """`folovllm-stage3[block_size=8,kv_cache_memory=67108864]` -> (3, {"block_size": 8, ...});
    None if `name` is not a folovllm system. Values are ints where they parse as ints."""
    m = _FOLOVLLM_NAME.fullmatch(name)
    if not m:
        return None
    overrides: dict[str, Any] = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad system {name!r}: expected key=value inside [...], got {item!r}")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            overrides[key.strip()] = value.strip()
    return int(m.group(1)), overrides


def make_system(name: str, cfg: BenchConfig) -> System:
    if name in SYSTEMS:
        return SYSTEMS[name](cfg)
    parsed = parse_folovllm_name(name)
    if parsed:
        return FolovllmSystem(cfg, *parsed)
    raise ValueError(f"unknown system {name!r}; known: {sorted(SYSTEMS)} or "
                     "folovllm-stageN[key=value,...]")


def systems_for_stages(stages: list[int], with_peers: bool = True) -> list[str]:
    """The stages' folovllm systems and peers: folovllm stages first, lowest stage first (the
    agreement reference and the "× previous stage" order), then the other peers."""
    names = [f"folovllm-stage{s}" for s in sorted(set(stages))]
    if with_peers:
        for s in sorted(set(stages)):
            names += [p for p in STAGE_PEERS.get(s, []) if p not in names]
    folovllm = sorted((n for n in names if parse_folovllm_name(n)), key=lambda n: parse_folovllm_name(n)[0])
    return folovllm + [n for n in names if not parse_folovllm_name(n)]
