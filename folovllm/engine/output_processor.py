"""`OutputProcessor`: tokens -> text (incrementally, `detokenizer.py`), stop strings, and the
`RequestOutput`s users see.

A prompt with `n` samples is run as `n` child requests (`"<id>"` for n = 1, `"<id>#<i>"`
otherwise); this is where their completions are gathered back into one `RequestOutput`.

Streaming (`RequestOutputKind.DELTA`) sends only the text and tokens that are new since the last
output. While a request runs, the last `len(longest stop string) - 1` characters are always held
back (they could be the start of a stop string), and so is a trailing partial UTF-8 character, so
a client never receives characters that a later stop string would take back::

    stop="END", text so far "...the Ex"  -> sent "...the ", "Ex" held back (2 = len("END") - 1)

Stop strings are found by one automaton per request (`stop_strings.py`) that reads each new
character once: a step costs the same with 1 stop string or 1,000.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from folovllm.core.request import Request, RequestStatus
from folovllm.engine.detokenizer import IncrementalDetokenizer, make_detokenizer
from folovllm.engine.stop_strings import StopStringMatcher, get_stop_matcher
from folovllm.engine.logprobs import LogprobsProcessor
from folovllm.outputs import CompletionOutput, RequestOutput
from folovllm.sampling_params import RequestOutputKind
from folovllm.worker.sampler import LogprobsLists


@dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[Request]
    stop_matcher: Optional[StopStringMatcher]  # shared by the children (same stop strings)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.parent_of: dict[str, str] = {}  # child request id -> parent request id
        # child request id -> (characters, tokens) already sent, for DELTA outputs
        self.sent: dict[str, tuple[int, int]] = {}
        # child request id -> its detokenizer (the text so far and the window to extend it)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        # child request id -> (automaton node, characters read): where its stop search stands
        self.stop_scans: dict[str, tuple[int, int]] = {}
        # child request id -> its log-probabilities, for the requests that ask (docs/logprobs.md)
        self.logprobs: dict[str, LogprobsProcessor] = {}
        self.token_texts: dict[int, str] = {}  # token id -> decoded alone (Logprob.decoded_token)

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    children: list[Request]) -> None:
        stops = children[0].sampling_params.stop_strings
        matcher = get_stop_matcher(stops) if stops else None
        self.parents[request_id] = _Parent(request_id, prompt, prompt_token_ids, children, matcher)
        for child in children:
            self.parent_of[child.request_id] = request_id
            self.detokenizers[child.request_id] = make_detokenizer(
                self.tokenizer, child.sampling_params.skip_special_tokens)
            params = child.sampling_params
            if params.logprobs is not None or params.prompt_logprobs is not None:
                self.logprobs[child.request_id] = LogprobsProcessor(params, self.decode_tokens)

    def add_logprobs(self, requests: Sequence[Request], sampled: Optional[LogprobsLists],
                     prompts: Sequence[tuple[str, int, LogprobsLists]],
                     num_tokens: Optional[Sequence[int]] = None) -> None:
        """One step's log-probabilities (`LLMEngine._execute_and_sample`): `sampled` holds
        `num_tokens[i]` positions (one each without drafts; stage 09: one per committed token)
        per request of `requests` that asks for `logprobs`, in order; `prompts` (child request
        id, first prompt position, its positions) those of the prompt rows."""
        offset = 0
        for i, request in enumerate(requests):
            if request.sampling_params.logprobs is None:
                continue
            assert sampled is not None
            count = 1 if num_tokens is None else num_tokens[i]
            self.logprobs[request.request_id].add_sampled(sampled[offset : offset + count])
            offset += count
        for request_id, first_position, lists in prompts:
            self.logprobs[request_id].add_prompt(first_position, lists)

    def decode_tokens(self, token_ids: list[int]) -> list[str]:
        """Each token decoded alone, as vLLM's `decoded_token` (special tokens kept), cached:
        a vocabulary's worth of short strings at most."""
        missing = list({t for t in token_ids if t not in self.token_texts})
        if missing:
            texts = self.tokenizer.batch_decode([[t] for t in missing])
            self.token_texts.update(zip(missing, texts))
        return [self.token_texts[t] for t in token_ids]

    def process(self, advanced: list[Request], failed: Sequence[Request] = ()) -> list[RequestOutput]:
        """Detokenize the requests that got a token, apply stop strings, build the outputs of
        their parents (and of the parents of requests that `failed` in this step). Finished
        parents are forgotten after their last output."""
        now = time.perf_counter()
        for request in advanced:
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.token_times.append(now)
        touched: dict[str, _Parent] = {}
        for request in [*advanced, *failed]:
            params = request.sampling_params
            if params.stop_strings or params.output_kind != RequestOutputKind.FINAL_ONLY or request.is_finished:
                self.update_text(request)  # FINAL_ONLY without stop strings decodes once, at the end
            if request.request_id in self.logprobs:  # stage 09: a stop inside an accepted run
                self.logprobs[request.request_id].trim(request.num_output_tokens)
            if request.is_finished and request.metrics.finished_time is None:
                request.metrics.finished_time = now
            touched[self.parent_of[request.request_id]] = self.parents[self.parent_of[request.request_id]]
        outputs = [self.make_output(p) for p in touched.values()]
        return [o for o in outputs if o is not None]

    def abort(self, parent_id: str) -> Optional[RequestOutput]:
        parent = self.parents[parent_id]
        now = time.perf_counter()
        for child in parent.children:
            if child.metrics.finished_time is None:
                child.metrics.finished_time = now
        return self.make_output(parent)

    def update_text(self, request: Request) -> None:
        """Decode the new tokens (incrementally, `detokenizer.py`); a stop string finishes the
        request and cuts the text before it.

        A step can append several tokens (accepted drafts, stage 09): with stop strings they
        are read one at a time, so a stop string ends the output at the token that completes
        it, and the tokens after it are dropped, as if they had never been generated."""
        params = request.sampling_params
        ids = request.output_token_ids
        if request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason is not None:
            ids = ids[:-1]  # a stop token id is in token_ids but not in the text
        detokenizer = self.detokenizers[request.request_id]
        new_ids = ids[len(detokenizer.token_ids):]
        matcher = self.parents[self.parent_of[request.request_id]].stop_matcher
        several = matcher is not None and len(new_ids) > 1
        chunks = [new_ids[i : i + 1] for i in range(len(new_ids))] if several else [new_ids]
        for i, chunk in enumerate(chunks):
            detokenizer.add_tokens(chunk)
            last = i == len(chunks) - 1
            text = detokenizer.text
            if request.is_finished and last:  # nothing more will come: a character cut short shows as U+FFFD
                text += detokenizer.pending_text()
            # A stop string can still end a request its last token ended for length (or, with
            # several new tokens, any token before the one that ended it).
            if matcher is None or not (not request.is_finished or not last
                                       or request.status == RequestStatus.FINISHED_LENGTH):
                continue
            # Only the characters not read yet: the detokenizer's text only grows (it waits
            # while a character is incomplete), and the automaton's node carries any stop
            # string begun earlier. Before min_tokens, matches are passed over.
            node, read = self.stop_scans.get(request.request_id, (0, 0))
            node, end = matcher.scan(text, read, node, report=len(detokenizer.token_ids) >= params.min_tokens)
            self.stop_scans[request.request_id] = (node, len(text))
            if end != -1:
                start = end - matcher.match_len[node]
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = text[start:end]
                text = text[:start]
                if not last:  # stage 09: the accepted tokens after the stop string are not output
                    kept = len(detokenizer.token_ids)
                    del request.output_token_ids[kept:]
                    del request.all_token_ids[request.num_prompt_tokens + kept:]
                break
        request.output_text = text

    def make_output(self, parent: _Parent) -> Optional[RequestOutput]:
        """The parent's output in its `output_kind`; None when there is nothing to send."""
        kind = parent.children[0].sampling_params.output_kind
        finished = all(child.is_finished for child in parent.children)
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        first_delta = parent.children[0].request_id not in self.sent
        for i, child in enumerate(parent.children):
            # --8<-- [start:stream_hold_back]
            text, token_ids = child.output_text, child.output_token_ids
            if not child.is_finished:
                # An incomplete UTF-8 character decodes as U+FFFD until its last byte arrives.
                text = text.rstrip("\ufffd")
                if parent.stop_matcher is not None:
                    hold_back = parent.stop_matcher.max_len - 1
                    text = text[: max(0, len(text) - hold_back)]
            if kind == RequestOutputKind.DELTA:
                sent_chars, sent_tokens = self.sent.get(child.request_id, (0, 0))
                self.sent[child.request_id] = (len(text), len(token_ids))
                text, token_ids = text[sent_chars:], token_ids[sent_tokens:]
            # --8<-- [end:stream_hold_back]
            logprobs = self.logprobs.get(child.request_id)
            completions.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=list(token_ids),
                    finish_reason=child.status.finish_reason,
                    stop_reason=child.stop_reason,
                    error=child.error,
                    # the same tokens as token_ids: all of them, or (DELTA) the new ones
                    logprobs=None if logprobs is None or logprobs.logprobs is None
                    else logprobs.logprobs[child.num_output_tokens - len(token_ids):],
                    cumulative_logprob=None if logprobs is None else logprobs.cumulative_logprob,
                )
            )
        scored = self.logprobs.get(parent.children[0].request_id)
        prompt_logprobs = None
        if scored is not None and (kind != RequestOutputKind.DELTA or first_delta):
            prompt_logprobs = scored.prompt_logprobs  # DELTA: in the first output only
        if finished:
            del self.parents[parent.request_id]
            for child in parent.children:
                self.parent_of.pop(child.request_id, None)
                self.sent.pop(child.request_id, None)
                self.detokenizers.pop(child.request_id, None)
                self.stop_scans.pop(child.request_id, None)
                self.logprobs.pop(child.request_id, None)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=parent.children[0].metrics,
            prompt_logprobs=prompt_logprobs,
        )
