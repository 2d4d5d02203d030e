"""`SpeculativeConfig` (stage 09): which proposer drafts tokens, and how many per step.

vLLM's `SpeculativeConfig` (vllm/config/speculative.py) in the two methods folovllm has::

    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    {"method": "draft_model", "model": "path/or/hub-id", "num_speculative_tokens": 3}
    {..., "disable_by_batch_size": 4}       no drafts in a step while 4 or more requests run
    {"method": "draft_model", ..., "draft_confidence_threshold": 0.4}
                                            a row stops drafting after a token the draft gives
                                            less than 0.4 (HF's assistant_confidence_threshold)

It is an axis beside the ladder, like tensor parallelism: `EngineConfig.speculative_config`
turns it on at any stage from 02 on (stage 01's static batch cannot verify drafts: a batch
member cannot run ahead of the others). The dict form is accepted wherever a user gives it
(`LLM(..., speculative_config={...})`, `--speculative-config JSON`) and checked here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Attributes:
        method: "ngram" (prompt lookup: copy what followed the same n-gram earlier in the
            request) or "draft_model" (a small model with the target's tokenizer drafts greedily).
        num_speculative_tokens: k, the most drafts verified per request per step, 1..16.
        prompt_lookup_min, prompt_lookup_max: ngram only: the n-gram lengths looked up (the
            longest found wins), 1 <= min <= max.
        model: draft_model only: a local checkpoint folder or a hub id.
        disable_by_batch_size: no drafts are proposed for a step while this many requests or
            more are running (None: always draft). At a large batch a step is no longer bound
            by reading the weights, and every rejected draft is a row of real work
            (docs/stages/09: batch 8 loses here). vLLM's field; like vLLM, at least 2.
        draft_confidence_threshold: draft_model only: a request stops drafting for the step
            after a token to which the draft gives a probability below this (the token is
            still proposed), so an unsure draft spends no more forward passes on guesses the
            target will likely reject. HF's `assistant_confidence_threshold`; None (the default,
            as in vLLM): always k drafts. Changes which drafts are proposed, never the tokens.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: Optional[str] = None
    disable_by_batch_size: Optional[int] = None
    draft_confidence_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                "speculative_config.num_speculative_tokens must be an integer in "
                f"1..{MAX_SPECULATIVE_TOKENS}, got {k!r}"
            )
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if self.disable_by_batch_size is not None and (
                not _is_int(self.disable_by_batch_size) or self.disable_by_batch_size < 2):
            raise ValueError(
                "speculative_config.disable_by_batch_size must be an integer >= 2 (the number of "
                "running requests from which no drafts are proposed), or None to always draft, "
                f"got {self.disable_by_batch_size!r}"
            )
        c = self.draft_confidence_threshold
        if c is not None:
            if self.method != "draft_model":
                raise ValueError("speculative_config.draft_confidence_threshold is for method "
                                 "'draft_model' (a draft model's probabilities); n-gram drafts have none")
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c < 1.0:
                raise ValueError("speculative_config.draft_confidence_threshold must be a number in "
                                 f"(0, 1), or None to always draft k tokens, got {c!r}")
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            raise ValueError(
                "speculative_config.model is required with method 'draft_model': a checkpoint "
                "folder or hub id of a small model with the target's tokenizer"
            )
        if self.method == "ngram" and self.model is not None:
            raise ValueError(
                "speculative_config.model is for method 'draft_model'; method 'ngram' drafts "
                "from the request's own tokens and takes no model"
            )

    @classmethod
    def from_dict(cls, d: Any) -> "SpeculativeConfig":
        """The user's dict (JSON) form -> a checked config; a ValueError names the field."""
        if isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object), got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {unknown}; allowed: {sorted(known)}")
        for required in ("method", "num_speculative_tokens"):
            if required not in d:
                raise ValueError(f"speculative_config.{required} is required")
        return cls(**d)

    def describe(self) -> str:
        """For `describe_engine`: "speculative ngram k=3" (", off from batch 4")."""
        off = "" if self.disable_by_batch_size is None else f", off from batch {self.disable_by_batch_size}"
        if self.draft_confidence_threshold is not None:
            off += f", stop below p={self.draft_confidence_threshold:g}"
        return f"speculative {self.method} k={self.num_speculative_tokens}{off}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
