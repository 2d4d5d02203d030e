"""`SpeculativeConfig` (stage 09). A minimal local copy of the shared interface
(spec_interface.md); the `spec` branch owns the real file."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram" | "draft_model"
    num_speculative_tokens: int  # k, 1..16
    prompt_lookup_min: int = 1  # ngram only
    prompt_lookup_max: int = 4  # ngram only (>= min)
    model: Optional[str] = None  # draft_model only: a local path or hub id

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in 1..16, got {k!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model is required for method 'draft_model'")

    @classmethod
    def from_dict(cls, d: dict) -> "SpeculativeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)
