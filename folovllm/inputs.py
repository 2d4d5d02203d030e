"""The forms a prompt may take, with vLLM's names (`vllm.inputs`)::

    "the engine schedules"                         text, tokenized by the model's tokenizer
    [785, 4712, 36769]                             token ids (Python or numpy integers)
    {"prompt": "the engine schedules"}             TextPrompt
    {"prompt_token_ids": [785, 4712, 36769]}       TokensPrompt

`parse_prompt` checks the form only; whether the ids fit the model (vocabulary, `max_model_len`)
is the engine's check (`LLMEngine.validate_request`).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, TypedDict, Union


class ProcessedPrompt(NamedTuple):
    """A prompt the engine has checked and tokenized (`LLMEngine.validate_request`); passing it
    to `add_request` queues it without tokenizing it again (vLLM's processed inputs)."""

    text: Optional[str]
    token_ids: list[int]


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


PromptType = Union[str, Sequence[int], TextPrompt, TokensPrompt, ProcessedPrompt]


def parse_prompt(prompt: object) -> tuple[Optional[str], Optional[list[int]]]:
    """-> (text, None) for a text prompt, (None, token ids) for a token-id prompt. Raises
    ValueError, naming what was wrong, for any other form."""
    if isinstance(prompt, dict):
        if set(prompt) == {"prompt"}:
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"prompt['prompt'] must be a string, got {type(prompt).__name__}")
        elif set(prompt) == {"prompt_token_ids"}:
            prompt = prompt["prompt_token_ids"]
            if not isinstance(prompt, (list, tuple)):
                raise ValueError(
                    f"prompt['prompt_token_ids'] must be a list of token ids, got {type(prompt).__name__}"
                )
        else:
            raise ValueError(
                "prompt dict must have exactly one key, 'prompt' (a TextPrompt) or "
                f"'prompt_token_ids' (a TokensPrompt); got keys {sorted(map(str, prompt))}"
            )
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        return prompt, None
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(
        "prompt must be a string, a list of token ids, {'prompt': str} or "
        f"{{'prompt_token_ids': list[int]}}; got {type(prompt).__name__}"
    )


def is_token_id(value: object, vocab_size: int) -> bool:
    """A Python or numpy integer (not a bool) in [0, vocab_size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < vocab_size
