"""`SamplingParams`: how to pick each next token and when to stop, with vLLM's names and meanings."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

_GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy, as in vLLM
SEED_LIMIT = 2**64  # torch.Generator seeds are unsigned 64-bit integers
REPETITION_PENALTY_RANGE = (0.01, 100.0)


# --8<-- [start:structured_outputs_params]
@dataclass
class StructuredOutputsParams:
    """Stage 10: what the output must match (vLLM's `StructuredOutputsParams`): exactly one of

        json         a JSON schema (dict or JSON string): the output is JSON that validates
        regex        the whole output matches the regular expression
        choice       the output is exactly one of these strings
        grammar      an EBNF grammar (xgrammar's dialect; the xgrammar backend only)
        json_object  True: any JSON object (the xgrammar backend only)

    Which backend compiles it is the engine's `structured_outputs_backend` (docs/stages/10-*)."""

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    FIELDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [name for name in self.FIELDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, "
                             f"json_object, got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (a dict or a JSON string), "
                             f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a string, got "
                                 f"{type(getattr(self, name)).__name__}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be True, got {self.json_object!r}")
# --8<-- [end:structured_outputs_params]


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

    Log-probabilities (docs/logprobs.md) and the vocabulary filters:
        logprobs: per generated token, the log-probability of the sampled token and of the
            `logprobs` most likely ones (`CompletionOutput.logprobs`); 0 = the sampled token
            only, -1 = the whole vocabulary, None = none. At most the engine's `max_logprobs`.
        prompt_logprobs: the same for every prompt token (`RequestOutput.prompt_logprobs`).
            Such a request recomputes its prompt instead of reading cached blocks (see
            `skip_reading_prefix_cache`).
        logit_bias: {token id: bias} added to the logits before sampling (OpenAI's field;
            clamped to [-100, 100] as vLLM does; JSON's string keys are accepted).
        allowed_token_ids: only these tokens can be sampled (vLLM).
        bad_words: words that must not be generated: the last token of a word is forbidden
            whenever the tokens generated so far end with the word's other tokens (vLLM).
        skip_reading_prefix_cache: compute the whole prompt even when its blocks are cached
            (stage 06). None = True exactly when `prompt_logprobs` is asked (vLLM's rule: a
            cached position has no logits to score).
        bad_words_token_ids: filled by the engine: `bad_words` tokenized with and without a
            leading space (`update_from_tokenizer`).

    Stage 10:
        structured_outputs: a `StructuredOutputsParams` (or a dict of its fields): the output
            must match a JSON schema, regex, choice or grammar (docs/stages/10-*). Its token
            mask is applied to the logits before everything above.
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
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    skip_reading_prefix_cache: Optional[bool] = None
    bad_words_token_ids: Optional[list[list[int]]] = field(default=None, repr=False)
    structured_outputs: Optional[StructuredOutputsParams] = None  # stage 10
    # Filled by __post_init__: `stop` always as a list.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._verify()
        self._verify_logprobs_and_filters()
        # numpy scalars (and other numbers) become plain Python ones before they reach torch.
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            setattr(self, name, float(getattr(self, name)))
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(StructuredOutputsParams.FIELDS))
            if unknown:
                raise ValueError(f"structured_outputs: unknown field(s) {unknown}; allowed: "
                                 f"{list(StructuredOutputsParams.FIELDS)}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of its "
                             f"fields, got {type(self.structured_outputs).__name__}")
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

    # -- log-probabilities and the vocabulary filters ------------------------------------------

    def _verify_logprobs_and_filters(self) -> None:
        """The fields of docs/logprobs.md on their own, brought to one form (ints, a dict of
        int -> float, lists)."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is True:  # vLLM: True means 1
                value = 1
            if value is not None and (not _is_int(value) or not -1 <= value < 2**63):
                raise ValueError(f"{name} must be an integer >= 0, -1 (the whole vocabulary) or "
                                 f"None, got {value!r}")
            setattr(self, name, None if value is None else int(value))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            bias = {}
            for token, value in self.logit_bias.items():
                token_id = _as_token_id(token)
                if token_id is None:
                    raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
                if not _is_number(value):
                    raise ValueError(f"logit_bias values must be finite numbers, got {value!r} for token {token!r}")
                bias[token_id] = min(100.0, max(-100.0, float(value)))
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or any(
                    not _is_int(t) or not 0 <= t < 2**63 for t in ids):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids (integers "
                                 f">= 0), got {ids!r}")
            self.allowed_token_ids = [int(t) for t in ids]
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or any(not isinstance(w, str) or not w.strip() for w in words):
                raise ValueError(f"bad_words must be a list of non-blank strings, got {words!r}")
            self.bad_words = list(dict.fromkeys(words))
        ids = self.bad_words_token_ids
        if ids is not None and (not isinstance(ids, list) or any(
                not isinstance(w, list) or not w or any(not _is_int(t) or t < 0 for t in w) for w in ids)):
            raise ValueError(f"bad_words_token_ids must be lists of token ids, got {ids!r}")
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = self.prompt_logprobs is not None
        elif not isinstance(self.skip_reading_prefix_cache, bool):
            raise ValueError("skip_reading_prefix_cache must be True, False or None, got "
                             f"{self.skip_reading_prefix_cache!r}")
        elif not self.skip_reading_prefix_cache and self.prompt_logprobs is not None:
            raise ValueError("skip_reading_prefix_cache must not be False with prompt_logprobs: a "
                             "position read from the cache has no logits to score")

    def verify_with_model(self, vocab_size: int, max_logprobs: int) -> None:
        """What depends on the model and the engine (`LLMEngine.validate_request`): how many
        log-probabilities (`max_logprobs`, -1 = no limit) and token ids within the vocabulary."""
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            k = vocab_size if k == -1 else k
            if k is not None and max_logprobs != -1 and k > max_logprobs:
                raise ValueError(
                    f"{name} must be at most the engine's max_logprobs={max_logprobs}, got "
                    f"{getattr(self, name)} (raise max_logprobs when starting the engine)")
        for name, ids in (("logit_bias", list(self.logit_bias or ())),
                          ("allowed_token_ids", self.allowed_token_ids or [])):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} must hold token ids of this model, in [0, {vocab_size}), got {bad[:5]}")

    def update_from_tokenizer(self, tokenizer: Any, vocab_size: int) -> None:
        """`bad_words` -> `bad_words_token_ids`, as vLLM does: each word is tokenized as
        written and with one leading space (a word inside a sentence tokenizes differently
        from one at its start); the spaced form is kept when it starts with another token and
        has as many tokens."""
        if not self.bad_words:
            return
        token_ids: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            forms = [plain]
            if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
                forms.append(spaced)
            if not plain or any(t >= vocab_size for ids in forms for t in ids):
                raise ValueError(f"bad_words: {word!r} does not tokenize into token ids of this model")
            token_ids += forms
        self.bad_words_token_ids = token_ids


def _as_token_id(value: object) -> Optional[int]:
    """A token id given as an integer or, as JSON object keys are, a string of digits."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if _is_int(value) and 0 <= value < 2**63:
        return int(value)
    return None


def _is_int(value: object) -> bool:
    """Python and numpy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite real number: inf and NaN would turn into NaN probabilities in the sampler."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
