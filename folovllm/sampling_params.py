"""`SamplingParams`: how to pick each next token and when to stop, with vLLM's names and meanings."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy, as in vLLM
SEED_LIMIT = 2**64  # torch.Generator seeds are unsigned 64-bit integers
REPETITION_PENALTY_RANGE = (0.01, 100.0)


class RequestOutputKind(enum.Enum):
    """What each `RequestOutput` of a running request carries (vLLM's names)."""

    CUMULATIVE = 0  # all text and tokens so far, every step
    DELTA = 1  # only what is new since the previous output: for streaming
    FINAL_ONLY = 2  # nothing until the request finishes, then everything


@dataclass
class SamplingParams:
    """Per-request sampling settings (same fields and defaults as `vllm.SamplingParams`).

    Order in which the sampler applies them (see `folovllm/worker/sampler.py`)::

        logits -> repetition / frequency / presence penalties -> min_tokens (mask EOS and stops)
               -> temperature (0 = greedy: argmax, the rest is skipped)
               -> top_k -> top_p -> min_p -> sample

    Args:
        n: number of independent samples of the prompt (each is one `CompletionOutput`).
        temperature: 0 means greedy; higher flattens the distribution.
        top_p: keep the smallest set of tokens whose probability adds up to `top_p` (0, 1].
        top_k: keep the `top_k` most likely tokens, at most the vocabulary size; 0 or -1
            keeps all.
        min_p: drop tokens whose probability is below `min_p` times the top token's, [0, 1].
        seed: per-request seed in [0, 2**64); the same request and seed give the same tokens
            whatever else is in the batch. None uses the engine's generator. With n > 1, sample
            i uses seed + i (modulo 2**64).
        repetition_penalty: > 1 discourages tokens already in the prompt or output
            (positive logits divided by it, negative ones multiplied), 1 = off; [0.01, 100].
        presence_penalty: subtracted once from the logit of every token already generated,
            [-2, 2]; > 0 encourages new tokens.
        frequency_penalty: subtracted from a token's logit once per time it was generated,
            [-2, 2].
        max_tokens: most tokens to generate. None = up to `max_model_len`.
        min_tokens: EOS and `stop_token_ids` are forbidden until this many tokens exist.
        stop: strings that end generation; the output text is cut before the stop string.
        stop_token_ids: token ids that end generation (kept in `token_ids`, not in the text).
        ignore_eos: keep generating after EOS (benchmarks use it for fixed output lengths).
        skip_special_tokens: drop special tokens from the output text.
        output_kind: CUMULATIVE, DELTA (streaming) or FINAL_ONLY outputs from `LLMEngine.step`.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by __post_init__: `stop` always as a list.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._verify()
        # numpy scalars (and other numbers) become plain Python ones before they reach torch.
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            setattr(self, name, float(getattr(self, name)))
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _verify(self) -> None:
        """Every field on its own: its type and range. What depends on the model (token ids
        within the vocabulary, top_k) is checked when the request is added
        (`LLMEngine.validate_request`). Each message names the field, the value and what is
        allowed, so a request that passes can always run to a normal finish."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        # The sampler and torch's generators hold these in int64: a larger value (a client can
        # send any JSON number) would fail inside a step, not here.
        # (seed has its own range below: torch seeds are unsigned 64-bit.)
        for name in ("n", "top_k", "max_tokens", "min_tokens"):
            value = getattr(self, name)
            if _is_int(value) and not -2**63 <= value < 2**63:
                raise bad(name, "a 64-bit integer")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise bad("seed", "an integer in [0, 2**64), or None")
        # Penalised logits are logit / p or logit * p in float32: far outside this range they
        # overflow to inf (or p rounds to 0) and the probabilities become NaN.
        if not _is_number(self.repetition_penalty) or not (
            REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]
        ):
            raise bad("repetition_penalty", "in [0.01, 100] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, "in [-2, 2]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1, or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None and (
            not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops)
        ):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        ids = self.stop_token_ids
        if ids is not None and (
            not isinstance(ids, (list, tuple)) or any(not _is_int(t) or not 0 <= t < 2**63 for t in ids)
        ):
            raise bad("stop_token_ids", "a list of non-negative 64-bit integers")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", f"one of {[k.name for k in RequestOutputKind]}")


def _is_int(value: object) -> bool:
    """Python and numpy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite real number: inf and NaN would turn into NaN probabilities in the sampler."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
