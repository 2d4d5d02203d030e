"""Chat messages -> one prompt string, through the model's own chat template (used by `LLM.chat`
and by the server's `/v1/chat/completions`, as vLLM's `chat_utils.py` serves both).

A chat template is a Jinja program: whoever supplies one runs code in the server. Two nested
`range(6000)` loops in a 150-byte request once stalled every client for 3.6 s, and three never
end; its error messages showed the template's globals. So a request may pass the model's
template its variables (`chat_template_kwargs`, e.g. Qwen3's `{"enable_thinking": false}`) but
not a template of its own, unless the server trusts its clients
(`--trust-request-chat-template`, vLLM's flag), nor the arguments that change what
`apply_chat_template` does or the names the template gets from the server
(`check_template_kwargs`).
"""

from __future__ import annotations

import inspect
from typing import Any

# What the template gets from the server, besides `apply_chat_template`'s own arguments: the
# messages, transformers' helpers and Jinja's default globals. A request may not replace them.
TEMPLATE_GLOBALS = frozenset({"messages", "raise_exception", "strftime_now", "range", "dict",
                              "lipsum", "cycler", "joiner", "namespace"})
TEMPLATE_DATA = frozenset({"tools", "documents"})  # apply_chat_template arguments that are data


def check_template_kwargs(tokenizer: Any, template_kwargs: dict[str, Any], trust_template: bool) -> None:
    """Raise ValueError for a key a request may not send in `chat_template_kwargs`: a template
    (`chat_template`, unless `trust_template`), any other argument of `apply_chat_template`
    (`tokenize`, `return_dict`, ... change what it returns) or a name the template gets from
    the server. Every other key is a variable of the template, passed as sent."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters
    reserved = {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
    reserved = (reserved - TEMPLATE_DATA) | TEMPLATE_GLOBALS
    for key in template_kwargs:
        if key == "chat_template":
            if not trust_template:
                raise ValueError(
                    "chat_template_kwargs.chat_template: this server does not run chat templates "
                    "sent by clients (a template is code); it uses the model's own. Start it with "
                    "--trust-request-chat-template to allow them"
                )
        elif key in reserved:
            raise ValueError(
                f"chat_template_kwargs.{key}: set by the server, not by a request; the keys a "
                "request may send are the variables of the model's chat template"
            )


def apply_chat_template(tokenizer: Any, conversation: list[dict[str, str]],
                        add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """The prompt text for one conversation ([{"role": ..., "content": ...}, ...]).

    Raises ValueError when the tokenizer has no template or the template refuses the messages
    (e.g. a template that requires roles to alternate). The error of a template passed in
    `chat_template` is reported without its text, which that template controls (and could fill
    with the template's globals)."""
    check_conversation(conversation)
    if getattr(tokenizer, "chat_template", None) is None and "chat_template" not in template_kwargs:
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt "
                         "(LLM.generate, /v1/completions) instead")
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except Exception as e:  # jinja2 errors, raise_exception() inside templates, bad kwargs
        if "chat_template" in template_kwargs:
            raise ValueError(f"the request's chat template failed on these messages "
                             f"({type(e).__name__})") from e
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
