"""`Sampler`: turn the last-token logits of a batch into one next token per sequence, and score
the log-probabilities the requests ask for.

Each row of the batch carries its own `SamplingParams`, so every transform takes per-row values
(a [N] tensor of temperatures, of top-p, ...) and the batch is processed in one pass (vLLM's
order)::

    logits [N, V] float32
      -> bans: outside allowed_token_ids, bad_words, min_tokens (EOS and stop ids) -> -inf
      -> logit_bias
      -> penalties (repetition on prompt+output; presence/frequency on output)
      -> greedy rows: argmax                                   (temperature == 0)
      -> other rows: / temperature -> top_k -> top_p -> softmax -> min_p -> sample

The engine owns the one sampler (`LLMEngine.sampler`) and feeds it the logits the executor
returns, at any tensor-parallel size: the requests and their generators live in its process.

Sampling uses the "exponential race": argmax(p / e) with e ~ Exp(1) i.i.d. picks token i with
probability p_i. Its noise comes from the request's own `torch.Generator` when it has a seed, so a
seeded request samples the same tokens whatever else shares its batch.

Log-probabilities (`compute_logprobs`, `gather_logprobs`; docs/logprobs.md) are float32
`log_softmax` of the model's logits ("raw", the default) or of the processed ones, one
`torch.topk` over every row that asks, with the batch's largest k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from folovllm.core.request import Request
from folovllm.sampling_params import SamplingParams


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int], generator: torch.Generator,
                 logprobs_mode: str = "raw_logprobs") -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.generator = generator  # noise for requests without a seed
        self.logprobs_mode = logprobs_mode  # EngineConfig.logprobs_mode

    # --8<-- [start:sampler_call]
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """logits [N, V] float32 (row i belongs to requests[i]) -> N token ids."""
        if all(self.plain_greedy(r) for r in requests):
            # Nothing would change a logit and every row takes its argmax: skip the copy of the
            # logits ([N, 151936] floats for Qwen3: ~0.6 MB a row) and the per-row passes. The
            # general path below gives the same tokens (tests/test_sampling.py).
            return logits.argmax(dim=-1).tolist()
        logits = self.process(logits, requests)
        params = [r.sampling_params for r in requests]
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        next_tokens = logits.argmax(dim=-1)
        if not greedy.all():
            rows = (~greedy).nonzero().squeeze(1)
            sampled = self.sample(logits[rows], [requests[i] for i in rows.tolist()])
            next_tokens[rows] = sampled
        return next_tokens.tolist()
    # --8<-- [end:sampler_call]

    def plain_greedy(self, request: Request) -> bool:
        """Greedy, and no penalty, bias, filter or min_tokens ban applies this step."""
        p = request.sampling_params
        return (p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                and p.frequency_penalty == 0.0
                and not (p.logit_bias or p.allowed_token_ids or p.bad_words_token_ids)
                and (request.num_output_tokens >= p.min_tokens
                     or not (p.stop_token_ids or (self.eos_token_ids and not p.ignore_eos))))

    # -- logit processors ---------------------------------------------------------------------

    def process(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """A copy of logits [N, V] with every row's bans, bias and penalties applied: what the
        greedy rows take the argmax of, and the sampled rows divide by their temperature."""
        logits = logits.clone()
        self.apply_bans(logits, requests)
        self.apply_logit_bias(logits, requests)
        self.apply_penalties(logits, requests)
        return logits

    def apply_bans(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """In place: -inf for every token a row may not sample now (one indexed write for the
        batch, one masked fill for the rows with `allowed_token_ids`):

            min_tokens   EOS and stop_token_ids, while the request has fewer outputs
            bad_words    a word's last token, when the output ends with the word's other tokens
            allowed_token_ids   every token not in the list
        """
        rows: list[int] = []
        tokens: list[int] = []
        allowed_rows: list[int] = []
        for row, request in enumerate(requests):
            banned = self.min_tokens_bans(request) + bad_words_bans(request)
            rows += [row] * len(banned)
            tokens += banned
            if request.sampling_params.allowed_token_ids:
                allowed_rows.append(row)
        if rows:
            logits[rows, tokens] = float("-inf")
        if allowed_rows:
            keep = torch.zeros(len(allowed_rows), logits.shape[-1], dtype=torch.bool, device=logits.device)
            ids = [requests[row].sampling_params.allowed_token_ids for row in allowed_rows]
            keep[[i for i, row_ids in enumerate(ids) for _ in row_ids], [t for row_ids in ids for t in row_ids]] = True
            logits[allowed_rows] = logits[allowed_rows].masked_fill(~keep, float("-inf"))

    def min_tokens_bans(self, request: Request) -> list[int]:
        """The ending tokens a request may not sample before it has min_tokens outputs."""
        p = request.sampling_params
        if request.num_output_tokens >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)

    @staticmethod
    def apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """In place: logits[row, token] += bias for every (token, bias) of every row's
        logit_bias, in one indexed add."""
        rows, tokens, biases = [], [], []
        for row, request in enumerate(requests):
            for token, bias in (request.sampling_params.logit_bias or {}).items():
                rows.append(row)
                tokens.append(token)
                biases.append(bias)
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
            logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device),
                              accumulate=True)

    @staticmethod
    def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """In place. repetition_penalty (HF/vLLM): a token seen in prompt or output has its logit
        divided by the penalty when positive, multiplied when negative. presence/frequency
        (OpenAI): logit -= presence * [count > 0] + frequency * count, counts over the output.

        The rows' (row, token) pairs are gathered in Python, then each penalty is a few
        indexed ops for the whole batch: a verify row of k drafts (stage 09) is k + 1 rows of
        one request, and torch's fixed cost per op, not the arithmetic, is what a row costs.
        `apply_penalties_per_row` is the same, row by row (the reference; tests compare them)."""
        vocab_size, device = logits.shape[-1], logits.device
        rows: list[int] = []  # repetition: every (row, token seen), tokens distinct per row
        tokens: list[int] = []
        penalty = [1.0] * len(requests)  # [N] each row's
        for row, request in enumerate(requests):
            p = request.sampling_params
            if p.repetition_penalty != 1.0:
                seen = [t for t in set(request.all_token_ids) if t < vocab_size]
                rows += [row] * len(seen)
                tokens += seen
                penalty[row] = p.repetition_penalty
        if rows:
            index = (long_tensor(rows, device), long_tensor(tokens, device))
            values = logits[index]
            pair_penalty = torch.tensor(penalty, dtype=logits.dtype, device=device)[index[0]]
            logits[index] = torch.where(values > 0, values / pair_penalty, values * pair_penalty)
        counted = [row for row, r in enumerate(requests) if r.output_token_ids
                   and (r.sampling_params.presence_penalty != 0.0 or r.sampling_params.frequency_penalty != 0.0)]
        if counted:
            outputs = [[t for t in requests[row].output_token_ids if t < vocab_size] for row in counted]
            counts = torch.zeros(len(counted), vocab_size, dtype=logits.dtype, device=device)  # [C, V]
            count_rows = long_tensor([i for i, out in enumerate(outputs) for _ in out], device)
            counts.index_put_((count_rows, long_tensor([t for out in outputs for t in out], device)),
                              torch.ones(count_rows.shape[0], dtype=logits.dtype, device=device), accumulate=True)
            params = [requests[row].sampling_params for row in counted]
            frequency = torch.tensor([[p.frequency_penalty] for p in params], dtype=logits.dtype, device=device)
            presence = torch.tensor([[p.presence_penalty] for p in params], dtype=logits.dtype, device=device)
            logits[counted] -= frequency * counts + presence * (counts > 0)

    @staticmethod
    def apply_penalties_per_row(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """`apply_penalties` row by row: the reference."""
        vocab_size = logits.shape[-1]
        for row, request in enumerate(requests):
            p = request.sampling_params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(request.all_token_ids)), device=logits.device)
                seen = seen[seen < vocab_size]
                values = logits[row, seen]
                logits[row, seen] = torch.where(
                    values > 0, values / p.repetition_penalty, values * p.repetition_penalty
                )
            if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and request.output_token_ids:
                out = torch.tensor(request.output_token_ids, device=logits.device)
                counts = torch.bincount(out, minlength=vocab_size)[:vocab_size].to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    # -- sampling -----------------------------------------------------------------------------

    # --8<-- [start:sample]
    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits [M, V] of non-greedy rows -> [M] sampled token ids."""
        params = [r.sampling_params for r in requests]
        probs = torch.softmax(self.truncate(logits, params), dim=-1)  # temperature, top-k, top-p
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        if (min_p > 0).any():
            probs = probs.masked_fill(below_min_p(probs, min_p), 0.0)
        noise = torch.empty_like(probs)
        for row, request in enumerate(requests):
            generator: Optional[torch.Generator] = request.generator or self.generator
            noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def truncate(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """logits [M, V] / temperature, -inf outside each row's top-k and top-p."""
        device = logits.device
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        if (top_k > 0).any() or (top_p < 1.0).any():
            logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits
    # --8<-- [end:sample]

    # -- log-probabilities --------------------------------------------------------------------

    # --8<-- [start:compute_logprobs]
    def compute_logprobs(self, logits: torch.Tensor, requests: Sequence[Request],
                         token_ids: Sequence[int]) -> Optional[LogprobsLists]:
        """The log-probabilities of the sampled tokens and of each row's top `logprobs`, for
        the rows whose request asks (in order; None when none does). logits [N, V] are the raw
        ones `__call__` sampled `token_ids` from; the processed modes apply the same processing
        again to the rows that ask (it draws nothing, so it is what the sampler saw)."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        if not rows:
            return None
        asking = [requests[i] for i in rows]
        logits = logits[rows].float()  # [R, V]
        if self.logprobs_mode.startswith("processed"):
            logits = self.processed_logits(logits, asking)
        scores = logits.log_softmax(dim=-1) if self.logprobs_mode.endswith("logprobs") else logits
        k = max(num_logprobs(r.sampling_params.logprobs, logits.shape[-1]) for r in asking)
        sampled = torch.tensor([token_ids[i] for i in rows], device=logits.device)
        return gather_logprobs(scores, sampled, k)
    # --8<-- [end:compute_logprobs]

    def processed_logits(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits [N, V] -> the logits each row's token was drawn from: `process`, then for the
        sampled rows temperature, top-k/top-p and min-p (as -inf), as `sample` does."""
        logits = self.process(logits, requests)
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if rows:
            params = [requests[i].sampling_params for i in rows]
            drawn = self.truncate(logits[rows], params)
            min_p = torch.tensor([p.min_p for p in params], device=logits.device)
            if (min_p > 0).any():
                drawn = drawn.masked_fill(below_min_p(drawn.softmax(dim=-1), min_p), float("-inf"))
            logits[rows] = drawn
        return logits


def long_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of a Python list, through numpy: `torch.tensor(list)` converts element
    by element (~0.17 us each: 130 us for 800 ids), numpy's copy is 7x faster."""
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device)


def below_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs [M, V], min_p [M] -> True where a token is below min_p times its row's largest."""
    return probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values


def bad_words_bans(request: Request) -> list[int]:
    """vLLM's bad words: for each tokenized bad word [w0 .. wn], wn is banned when the tokens
    generated so far end with [w0 .. wn-1] (a one-token word: always)::

        bad word  [17, 4, 9]     output [.. 3 17 4]  -> 9 banned now
                                 output [.. 3 17 5]  -> nothing banned
    """
    output = request.output_token_ids
    banned = []
    for word in request.sampling_params.bad_words_token_ids or ():
        prefix = word[:-1]
        if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


@dataclass
class LogprobsLists:
    """Scored positions (vLLM's `LogprobsLists`, v1/outputs.py), as plain lists: at position
    i, `token_ids[i]` is the token scored (sampled, or the prompt's next token) followed by the
    top k, best first; `logprobs[i]` their log-probabilities; `ranks[i]` the scored token's
    rank (1 = most likely; the count of tokens at least as likely)."""

    token_ids: list[list[int]]  # [n][1 + k]
    logprobs: list[list[float]]  # [n][1 + k]
    ranks: list[int]  # [n]

    def __getitem__(self, rows: slice) -> "LogprobsLists":
        return LogprobsLists(self.token_ids[rows], self.logprobs[rows], self.ranks[rows])


# --8<-- [start:gather_logprobs]
def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsLists:
    """logprobs [n, V] (float32 log_softmax, or logits), token_ids [n] -> each row's scored
    token and the top k, in one `torch.topk` over all rows (a row that asked for fewer keeps
    the first entries of its list). vLLM's `Sampler.gather_logprobs`."""
    top_logprobs, top_ids = torch.topk(logprobs, k, dim=-1)  # [n, k], best first
    token_ids = token_ids[:, None]  # [n, 1]
    token_logprobs = logprobs.gather(-1, token_ids)  # [n, 1]
    # [n]; counted in int32: the default int64 sum of a bool tensor is ~5x slower on CPU (23 vs
    # 4 ms for [32, 151936] on one thread)
    ranks = (logprobs >= token_logprobs).sum(dim=-1, dtype=torch.int32)
    return LogprobsLists(torch.cat([token_ids, top_ids], dim=1).tolist(),
                         torch.cat([token_logprobs, top_logprobs], dim=1).tolist(), ranks.tolist())
# --8<-- [end:gather_logprobs]


def num_logprobs(k: int, vocab_size: int) -> int:
    """A request's `logprobs` / `prompt_logprobs` as a count: -1 is the whole vocabulary."""
    return vocab_size if k == -1 else min(k, vocab_size)


# --8<-- [start:top_k_top_p]
def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k and outside its top-p nucleus.

    top_k [M] (0 = off), top_p [M] (1 = off). Sorted descending, a token at rank r is kept when
    r < k and the probability mass of the tokens ranked before it is < p (so the most likely
    token is always kept).
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [M, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
# --8<-- [end:top_k_top_p]
