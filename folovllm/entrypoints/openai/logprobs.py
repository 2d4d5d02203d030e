"""The engine's log-probabilities in OpenAI's two response shapes (vLLM builds them in
`serving_completion.py` / `serving_chat.py`).

The engine gives, per position, {token id: Logprob(logprob, rank, decoded_token)} holding the
scored token and the top k (docs/logprobs.md); the echoed prompt's first entry is None::

    engine:       [None,           {9: -2.1 r3, 4: -0.7 r1, 2: -1.5 r2}, ...]   (k = 2)
    completions:  tokens          ["The",  " cat", ...]
                  token_logprobs  [None,   -2.1, ...]
                  top_logprobs    [None,   {" cat": -2.1, " a": -0.7, " the": -1.5}, ...]
                  text_offset     [0,      3, ...]      offset + len(previous token's text)
    chat:         content [{"token": " cat", "logprob": -2.1, "bytes": [32, 99, 97, 116],
                            "top_logprobs": [{" a", -0.7}, {" the", -1.5}]}, ...]

Completions' `top_logprobs` holds the scored token and the top k (k or k + 1 entries, as
OpenAI's and vLLM's); chat's holds the top k by rank. JSON has no -inf (a token the filters
ruled out): it is sent as -9999.0, OpenAI's and vLLM's floor.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from folovllm.entrypoints.openai.protocol import (ChatLogprobs, ChatTokenLogprob, ChatTopLogprob,
                                                  CompletionLogprobs)
from folovllm.outputs import Logprob

Decode = Callable[[int], str]  # one token id -> its text alone (for a position with no scores)
PositionLogprobs = Optional[dict[int, Logprob]]  # one position as the engine gives it
LOGPROB_FLOOR = -9999.0


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, LOGPROB_FLOOR)


def _text(logprob: Logprob, token_id: int, decode: Decode) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else decode(token_id)


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs],
                        decode: Decode, text_offset: int = 0) -> CompletionLogprobs:
    """One choice's tokens (or a streamed chunk's, from `text_offset` on) in OpenAI's
    completions shape."""
    out = CompletionLogprobs()
    for token_id, scores in zip(token_ids, positions, strict=True):
        if scores is None:  # the prompt's first token
            token = decode(token_id)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            token = _text(scores[token_id], token_id, decode)
            out.token_logprobs.append(_value(scores[token_id]))
            out.top_logprobs.append({_text(lp, t, decode): _value(lp) for t, lp in scores.items()})
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs], top_k: int,
                  decode: Decode) -> ChatLogprobs:
    """Generated tokens in OpenAI's chat shape: each with its `top_k` most likely tokens."""
    content = []
    for token_id, scores in zip(token_ids, positions, strict=True):
        assert scores is not None, "every generated token is scored"
        top = sorted(((lp.rank, t, lp) for t, lp in scores.items() if lp.rank <= top_k))
        content.append(ChatTokenLogprob(
            **_chat_entry(token_id, scores[token_id], decode).model_dump(),
            top_logprobs=[_chat_entry(t, lp, decode) for _, t, lp in top]))
    return ChatLogprobs(content=content)


def _chat_entry(token_id: int, logprob: Logprob, decode: Decode) -> ChatTopLogprob:
    token = _text(logprob, token_id, decode)
    return ChatTopLogprob(token=token, logprob=_value(logprob),
                          bytes=list(token.encode("utf-8", errors="replace")))
