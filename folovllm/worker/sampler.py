"""`Sampler`: turn the last-token logits of a batch into one next token per sequence.

Each row of the batch carries its own `SamplingParams`, so every transform takes per-row values
(a [N] tensor of temperatures, of top-p, ...) and the batch is processed in one pass::

    logits [N, V] float32
      -> penalties (repetition on prompt+output; presence/frequency on output)
      -> min_tokens: EOS and stop token ids get -inf until enough tokens exist
      -> greedy rows: argmax                                   (temperature == 0)
      -> other rows: / temperature -> top_k -> top_p -> min_p -> softmax -> sample

The engine owns the one sampler (`LLMEngine.sampler`) and feeds it the logits the executor
returns, at any tensor-parallel size: the requests and their generators live in its process.

Sampling uses the "exponential race": argmax(p / e) with e ~ Exp(1) i.i.d. picks token i with
probability p_i. Its noise comes from the request's own `torch.Generator` when it has a seed, so a
seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from folovllm.core.request import Request


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int], generator: torch.Generator) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.generator = generator  # noise for requests without a seed

    # --8<-- [start:sampler_call]
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """logits [N, V] float32 (row i belongs to requests[i]) -> N token ids."""
        if all(self.plain_greedy(r) for r in requests):
            # Nothing would change a logit and every row takes its argmax: skip the copy of the
            # logits ([N, 151936] floats for Qwen3: ~0.6 MB a row) and the per-row passes. The
            # general path below gives the same tokens (tests/test_sampling.py).
            return logits.argmax(dim=-1).tolist()
        logits = logits.clone()
        self.apply_penalties(logits, requests)
        self.apply_min_tokens(logits, requests)
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
        """Greedy, and no penalty or min_tokens ban applies this step."""
        p = request.sampling_params
        return (p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                and p.frequency_penalty == 0.0
                and (request.num_output_tokens >= p.min_tokens
                     or not (p.stop_token_ids or (self.eos_token_ids and not p.ignore_eos))))

    # -- logit processors ---------------------------------------------------------------------

    @staticmethod
    def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """In place. repetition_penalty (HF/vLLM): a token seen in prompt or output has its logit
        divided by the penalty when positive, multiplied when negative. presence/frequency
        (OpenAI): logit -= presence * [count > 0] + frequency * count, counts over the output."""
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

    def apply_min_tokens(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """In place: forbid ending tokens for requests that have fewer than min_tokens outputs."""
        for row, request in enumerate(requests):
            p = request.sampling_params
            if request.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids)
                if not p.ignore_eos:
                    banned += self.eos_token_ids
                if banned:
                    logits[row, banned] = float("-inf")

    # -- sampling -----------------------------------------------------------------------------

    # --8<-- [start:sample]
    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits [M, V] of non-greedy rows -> [M] sampled token ids."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        if (top_k > 0).any() or (top_p < 1.0).any():
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([p.min_p for p in params], device=device)
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        for row, request in enumerate(requests):
            generator: Optional[torch.Generator] = request.generator or self.generator
            noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)
    # --8<-- [end:sample]


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
