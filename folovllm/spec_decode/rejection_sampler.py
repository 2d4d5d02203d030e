"""`RejectionSampler` (stage 09): keep the drafts the target model agrees with, so that the
tokens come out exactly as the target alone would give them (greedy: the same tokens; random:
the same distribution).

The runner returns the target's logits at every position of a row with k drafts: the one
after the last committed token and the one after each draft, 1 + k in all::

    fed        t7   d1   d2   d3
    logits     p1   p2   p3   p4       p_j = the target's next-token distribution given the
                                       committed tokens and d1 .. d_(j-1)

Greedy: accept d_j while d_j == argmax p_j; at the first mismatch take argmax p_j; all
accepted: the bonus argmax p_(k+1). Every token is the target's argmax given the tokens before
it, which is what plain greedy decoding computes, one step per token.

Random (Leviathan et al. 2023, Chen et al. 2023): with a draft distribution q, accept d with
probability min(1, p(d)/q(d)); on rejection draw from the residual max(p - q, 0) renormalised,
and stop; all accepted: draw the bonus token from p_(k+1). Our drafts (n-gram, greedy draft
model) are one-hot: q(d) = 1, so accept with probability p(d), and the residual is p with d
removed::

    P(token = x) = p(d)·[x = d] + (1 - p(d)) · p(x)·[x != d] / (1 - p(d))  = p(x)   (x != d too)

so every committed token is distributed exactly as p (the rule is lossless), whatever the drafts.

p_j is the distribution the plain sampler would draw from at that position (`Sampler`):
bans, logit_bias, penalties (with d1 .. d_(j-1) counted as output), temperature, top-k/top-p,
min-p. Each row draws its uniforms and its one exponential noise vector from its request's
generator when it has a seed, so a seeded request does not depend on its batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from folovllm.core.request import Request
from folovllm.worker.sampler import LogprobsLists, Sampler, below_min_p


class SpeculatedRequest:
    """`request` as the sampler sees it at a draft position: as if the drafts before that
    position had been accepted (penalties, min_tokens and bad words read the output)."""

    __slots__ = ("request_id", "sampling_params", "generator", "output_token_ids", "all_token_ids")

    def __init__(self, request: Request, drafts_before: Sequence[int]) -> None:
        self.request_id = request.request_id
        self.sampling_params = request.sampling_params
        self.generator = request.generator
        self.output_token_ids = request.output_token_ids + list(drafts_before)
        self.all_token_ids = request.all_token_ids + list(drafts_before)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


class RejectionSampler:
    """Verifies the drafts of a step with the engine's one `Sampler`'s processing."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    # --8<-- [start:rejection_sampler_call]
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request],
                 draft_token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """logits [sum(1 + k_i), V] float32: row i's 1 + k_i positions, rows in order ->
        for each row the tokens it commits: its accepted drafts, then one token of the
        target's (1 .. k_i + 1 tokens)."""
        if all(self.sampler.plain_greedy(r) for r in requests):  # argmax of the raw logits
            return greedy_accept(logits.argmax(dim=-1).tolist(), draft_token_ids)
        views = [SpeculatedRequest(r, drafts[:j])
                 for r, drafts in zip(requests, draft_token_ids) for j in range(len(drafts) + 1)]
        processed = self.sampler.process(logits, views)  # [T, V] bans, bias, penalties
        if all(r.sampling_params.greedy for r in requests):  # p is one-hot on the argmax: nothing to draw
            return greedy_accept(processed.argmax(dim=-1).tolist(), draft_token_ids)
        probs = self.target_probs(processed, views)  # [T, V]
        num_drafts = [len(d) for d in draft_token_ids]
        k, vocab = max(num_drafts), logits.shape[-1]
        padded = torch.zeros(len(requests), k + 1, vocab, device=logits.device)  # [R, k+1, V]
        rows = [i for i, n in enumerate(num_drafts) for _ in range(n + 1)]
        cols = [j for n in num_drafts for j in range(n + 1)]
        padded[rows, cols] = probs
        drafts = torch.tensor([list(d) + [0] * (k - len(d)) for d in draft_token_ids],
                              dtype=torch.long, device=logits.device)  # [R, k]
        uniform, noise = self.draw(requests, num_drafts, k, vocab, logits.device)
        tokens, num_tokens = rejection_sample(
            padded, drafts, torch.tensor(num_drafts, device=logits.device), uniform, noise)
        return [row[:n] for row, n in zip(tokens.tolist(), num_tokens.tolist())]
    # --8<-- [end:rejection_sampler_call]

    # --8<-- [start:spec_logprobs]
    def compute_logprobs(self, logits: torch.Tensor, requests: Sequence[Request],
                         draft_token_ids: Sequence[Sequence[int]],
                         token_ids: Sequence[Sequence[int]]) -> Optional[LogprobsLists]:
        """The log-probabilities of every committed token, for the rows whose request asks
        (in order; None when none does): row r's committed tokens t_0 .. t_m are scored at its
        first m + 1 positions, each by the plain sampler's `compute_logprobs` on a view of the
        request with t_0 .. t_(j-1) counted as output (what a run without drafts would have
        had when it sampled t_j, so the processed modes see the same penalties and bans)::

            fed         t7   d1   d2   d3        logits rows offset_r .. offset_r + 3
            committed   d1   d2   x              scored at rows offset_r + 0, 1, 2
                                                 (the rejected d3's row is not read)

        A stop that cuts the run later drops the extra positions (`LogprobsProcessor.trim`)."""
        rows: list[int] = []  # [C] logits rows of the committed tokens of the rows that ask
        views: list[Request | SpeculatedRequest] = []
        committed: list[int] = []
        offset = 0
        for request, drafts, tokens in zip(requests, draft_token_ids, token_ids):
            if request.sampling_params.logprobs is not None:
                rows += range(offset, offset + len(tokens))
                views += [request] + [SpeculatedRequest(request, tokens[:j]) for j in range(1, len(tokens))]
                committed += tokens
            offset += len(drafts) + 1
        if not rows:
            return None
        return self.sampler.compute_logprobs(logits[rows], views, committed)  # [C] positions
    # --8<-- [end:spec_logprobs]

    def target_probs(self, logits: torch.Tensor, requests: Sequence[SpeculatedRequest]) -> torch.Tensor:
        """Processed logits [T, V] -> the distribution each position's token is drawn from:
        one-hot on the argmax for greedy requests (so one rule serves both: p(d) is 1 or 0);
        temperature, top-k/top-p, min-p and renormalisation for the others."""
        probs = torch.zeros_like(logits)
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        if greedy:
            probs[greedy, logits[greedy].argmax(dim=-1)] = 1.0
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if rows:
            params = [requests[i].sampling_params for i in rows]
            p = torch.softmax(self.sampler.truncate(logits[rows], params), dim=-1)
            min_p = torch.tensor([q.min_p for q in params], device=logits.device)
            if (min_p > 0).any():
                p = p.masked_fill(below_min_p(p, min_p), 0.0)
            probs[rows] = p / p.sum(dim=-1, keepdim=True)
        return probs

    def draw(self, requests: Sequence[Request], num_drafts: Sequence[int], k: int, vocab: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """uniform [R, k] for the accept tests and noise [R, V] ~ Exp(1) for the one token each
        row draws (the exponential race: argmax(p / e) picks x with probability p(x)), from each
        request's own generator when seeded. Greedy rows draw nothing (0 and 1)."""
        uniform = torch.zeros(len(requests), k, device=device)
        noise = torch.ones(len(requests), vocab, device=device)
        for row, (request, n) in enumerate(zip(requests, num_drafts)):
            if request.sampling_params.greedy:
                continue
            generator: Optional[torch.Generator] = request.generator or self.sampler.generator
            if n:
                uniform[row, :n] = torch.rand(n, generator=generator, device=device)
            noise[row].exponential_(generator=generator)
        return uniform, noise


# --8<-- [start:rejection_sample]
def rejection_sample(probs: torch.Tensor, draft_token_ids: torch.Tensor, num_drafts: torch.Tensor,
                     uniform: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch at once. probs [R, k+1, V] (row r's target distributions at its
    num_drafts[r] + 1 positions; the rest is padding), draft_token_ids [R, k], num_drafts [R],
    uniform [R, k] in [0, 1), noise [R, V] ~ Exp(1) -> tokens [R, k+1], num_tokens [R]: row r
    commits tokens[r, :num_tokens[r]].

        accepted  [1 1 0 1]     u_j < p_j(d_j), and j < num_drafts
        cumprod   [1 1 0 0]  -> num_accepted = 2: position 2 decides the last token
        position 2 rejected d3: draw from p_3 without d3 (the residual); none rejected: the
        bonus token from p_(k+1)
    """
    num_rows, k = draft_token_ids.shape
    rows = torch.arange(num_rows, device=probs.device)
    p_draft = probs[:, :k].gather(-1, draft_token_ids[..., None]).squeeze(-1)  # [R, k]
    has_draft = torch.arange(k, device=probs.device)[None, :] < num_drafts[:, None]
    accepted = (uniform < p_draft) & has_draft  # [R, k]
    num_accepted = accepted.int().cumprod(dim=1).sum(dim=1)  # [R] the first rejection stops a row
    final = probs[rows, num_accepted]  # [R, V] the distribution of the position that decides
    rejected = num_accepted < num_drafts
    rejected_draft = draft_token_ids[rows, num_accepted.clamp(max=k - 1)]
    final = residual(final, rejected, rejected_draft)
    last = (final / noise).argmax(dim=-1)  # [R] one draw per row (greedy rows: noise 1)
    tokens = torch.cat([draft_token_ids, torch.zeros_like(draft_token_ids[:, :1])], dim=1)
    tokens[rows, num_accepted] = last
    return tokens, num_accepted + 1


def residual(probs: torch.Tensor, rejected: torch.Tensor, draft_token_ids: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0) for a one-hot q on the rejected draft: p with that token removed (its
    renormalisation is left to the exponential race, which ignores scale). probs [R, V]; rows
    that rejected nothing keep p (the bonus token)."""
    probs = probs.clone()
    rows = rejected.nonzero().squeeze(1)
    probs[rows, draft_token_ids[rows]] = 0.0
    return probs
# --8<-- [end:rejection_sample]


def greedy_accept(argmax: Sequence[int], draft_token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """argmax [sum(1 + k_i)] of each position, rows in order -> each row's tokens: the drafts
    that equal the target's argmax, then the argmax where they first differ (or the bonus)."""
    out, offset = [], 0
    for drafts in draft_token_ids:
        tokens = []
        for j, draft in enumerate(drafts):
            if draft != argmax[offset + j]:
                break
            tokens.append(draft)
        tokens.append(argmax[offset + len(tokens)])
        out.append(tokens)
        offset += len(drafts) + 1
    return out
