"""Chat messages -> one prompt string, through the model's own chat template (used by `LLM.chat`
and by the server's `/v1/chat/completions`, as vLLM's `chat_utils.py` serves both)."""

from __future__ import annotations

from typing import Any


def apply_chat_template(tokenizer: Any, conversation: list[dict[str, str]],
                        add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """The prompt text for one conversation ([{"role": ..., "content": ...}, ...]).

    Raises ValueError when the tokenizer has no template or the template refuses the messages
    (e.g. a template that requires roles to alternate)."""
    check_conversation(conversation)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt "
                         "(LLM.generate, /v1/completions) instead")
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except Exception as e:  # jinja2 errors, raise_exception() inside templates, bad kwargs
        raise ValueError(f"the chat template could not render these messages: {e}") from e


def check_conversation(conversation: Any) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {conversation!r}")
    for i, message in enumerate(conversation):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(
                f"chat message {i} must be a dict with a string 'role' and a string 'content', "
                f"got {message!r}"
            )
