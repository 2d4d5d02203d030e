"""`SamplingParams`: how to pick each next token and when to stop, with vLLM's names and meanings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy, as in vLLM


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
        top_k: keep the `top_k` most likely tokens; 0 or -1 keeps all.
        min_p: drop tokens whose probability is below `min_p` times the top token's, [0, 1].
        seed: per-request seed; the same request and seed give the same tokens whatever else
            is in the batch. None uses the engine's generator.
        repetition_penalty: > 1 discourages tokens already in the prompt or output
            (positive logits divided by it, negative ones multiplied), 1 = off.
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
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _verify(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        # The sampler and torch's generators hold these in int64: a larger value (a client can
        # send any JSON number) would fail inside a step, not here.
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens"):
            value = getattr(self, name)
            if _is_int(value) and not -2**63 <= value < 2**63:
                raise bad(name, "a 64-bit integer")
        if any(_is_int(t) and t >= 2**63 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of 64-bit integers")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
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
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", f"one of {[k.name for k in RequestOutputKind]}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
