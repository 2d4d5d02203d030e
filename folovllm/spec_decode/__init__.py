"""Stage 09: speculative decoding (vLLM v1 keeps this in vllm/v1/spec_decode/).

    config.py             SpeculativeConfig: method, k, n-gram sizes / draft model
    proposer.py           Proposer (the interface), NullProposer, Drafter (between steps)
    ngram_proposer.py     NgramProposer: prompt lookup in the request's own tokens
    draft_model.py        DraftModelProposer: a small model with the same tokenizer
    rejection_sampler.py  RejectionSampler: keeps the drafts the target agrees with, exactly
    metrics.py            SpecDecodingStats: drafted, accepted, per position
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from folovllm.spec_decode.config import SpeculativeConfig
from folovllm.spec_decode.proposer import NullProposer, Proposer

if TYPE_CHECKING:
    from folovllm.config import EngineConfig


def get_proposer(spec_config: SpeculativeConfig | None, engine_config: "EngineConfig",
                 vocab_size: int) -> Proposer:
    """The proposer `spec_config` asks for (`NullProposer` when it is None). The draft model's
    module is imported only when asked for: n-gram needs no model code."""
    if spec_config is None:
        return NullProposer()
    if spec_config.method == "ngram":
        from folovllm.spec_decode.ngram_proposer import NgramProposer

        return NgramProposer(spec_config)
    try:
        from folovllm.spec_decode.draft_model import DraftModelProposer
    except ModuleNotFoundError as e:
        if e.name != "folovllm.spec_decode.draft_model":
            raise
        raise ValueError(
            "speculative_config.method='draft_model' needs folovllm/spec_decode/draft_model.py, "
            "which this build does not have; use method 'ngram'"
        ) from e
    return DraftModelProposer(spec_config, engine_config, vocab_size)


__all__ = ["SpeculativeConfig", "Proposer", "NullProposer", "get_proposer"]
