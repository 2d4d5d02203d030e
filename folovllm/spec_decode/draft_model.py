"""`DraftModelProposer`: a small model with the target's tokenizer guesses the next k tokens
(stage 09, vLLM's `v1/spec_decode/draft_model.py`).

Each step the proposer is asked, for the requests that decode next, for at most k tokens. It
runs the draft greedily, one token per forward pass, all those requests in one batch: k passes
of a model a fraction of the target's size, then the target checks the k guesses in one pass.
Greedy drafts are one-hot proposals (q = 1 on the drafted token), so the rejection sampler
treats them exactly like n-gram drafts. With `draft_confidence_threshold` a row stops after a
token the draft itself gives less than that probability (HF's assisted generation does the
same): each draft costs a forward pass, and an unsure one is likely rejected.

The draft keeps its own paged KV cache (its own `ModelRunner`, `KVCache` and `BlockPool`, block
size the target's), so a request's context is computed once, not every step. What is in it is
remembered per request as the tokens fed so far, `fed`. After the target's update some drafts
were rejected and a corrected or bonus token was appended; the cache stays valid up to the
longest common prefix of `fed` and the committed tokens, and only the rest is fed again::

    step n   committed  c0 .. c9                       (c9: last committed token)
             fed        c0 .. c9 d1 d2                 pass 1: feed c9 (catch up) -> d1
                                                       pass 2: feed d1 -> d2; pass 3: d2 -> d3
             drafts     d1 d2 d3                       (d3 is proposed, never fed)
    target   accepts d1, rejects d2, appends t2        committed c0 .. c9 d1 t2
    step n+1 valid      c0 .. c9 d1 = LCP(fed, committed)   (d2's K/V is stale: overwritten)
             feed       t2 -> d1'; d1' -> d2'; ...

    all k accepted + bonus b:  committed c0..c9 d1 d2 d3 b, fed c0..c9 d1 d2: feed [d3, b]

Rolling back is free: nothing is erased, the next pass simply writes its K/V over the stale
slots (positions valid.. of the same blocks) and the attention never reads past the sequence
length it is given. A request the proposer has not seen (new, or preempted and freed) is
prefilled once, in the same batch as the others' single tokens.

Left out: drafting from the target's hidden states (EAGLE, MTP), sampled (non-greedy) drafts
with their q distributions, a draft that shares the target's prefix cache, and tensor
parallelism of the draft (it runs in the engine's process).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from folovllm.config import EngineConfig
from folovllm.core.block_pool import BlockPool, KVCacheBlock
from folovllm.core.request import Request
from folovllm.kv_cache_interface import KVCacheConfig, KVCacheSpec
from folovllm.spec_decode.config import SpeculativeConfig
from folovllm.spec_decode.proposer import Proposer
from folovllm.worker.input_batch import InputBatch
from folovllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# The draft's KV memory when the target gives no hint: it is small next to the target's (a
# 1-layer draft of hidden 192 keeps 256 bytes a token in float32).
DRAFT_KV_MAX_BYTES = 1 << 30


@dataclass
class _DraftState:
    """What the draft's cache holds for one request: the K/V of `fed` (positions 0..len-1),
    in `blocks` (block i holds positions i*bs .. (i+1)*bs-1)."""

    fed: list[int] = field(default_factory=list)
    blocks: list[KVCacheBlock] = field(default_factory=list)


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists. A binary search over slice
    comparisons (each runs in C), not a Python loop over every token: it runs once per request
    per step on contexts of thousands of tokens, and the answer is nearly always near the end."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo] holds; the answer is in lo..hi
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class DraftModelProposer(Proposer):
    """Greedy drafts from a small model with its own paged KV cache; see the module docstring."""

    def __init__(self, spec_config: SpeculativeConfig, target_config: EngineConfig,
                 target_vocab_size: int) -> None:
        from folovllm.model_executor.attention_backends import get_attn_backend
        from folovllm.model_executor.layers.cpu_gemm import weight_packing
        from folovllm.model_executor.custom_op import set_custom_ops
        from folovllm.model_executor.model_loader import load_hf_config, load_model, resolve_model_path

        self.k = spec_config.num_speculative_tokens
        self.confidence_threshold = spec_config.draft_confidence_threshold
        name = spec_config.model
        if not name:
            raise ValueError("speculative_config.model is required for method 'draft_model'")
        try:
            path = resolve_model_path(name)
            hf_config = load_hf_config(path)
        except ValueError as e:
            raise ValueError(f"speculative_config.model={name!r}: {e}") from e
        # Before any weight is read: the draft's token ids must mean the target's tokens.
        if hf_config.vocab_size != target_vocab_size:
            raise ValueError(
                f"speculative_config.model={name!r} has vocab_size={hf_config.vocab_size}, but the "
                f"target's is {target_vocab_size}: a draft model must share the target's tokenizer"
            )
        draft_len = hf_config.max_position_embeddings
        self.max_model_len = min(target_config.max_model_len or draft_len, draft_len)
        # The target's config may not be resolved yet ("auto" backend and kernels): resolve a
        # copy against the draft, so the draft runs the same attention backend and kernels.
        config = target_config.replace(max_model_len=self.max_model_len).resolve(draft_len)
        self.device = config.device
        try:
            # Packed like the target's (worker.py): unpacked, oneDNN re-lays every weight on
            # every call. And in our decode kernel's panels whatever the shape: every pass of
            # the draft is a decode of a few rows (its prefill is once per request), where the
            # kernel beats oneDNN's fixed cost per call several times on small weights.
            with weight_packing(config.custom_ops == "all", gemm="decode"):
                self.model, self.hf_config, _ = load_model(str(path), config.torch_dtype, config.device)
        except ValueError as e:
            raise ValueError(f"speculative_config.model={name!r}: {e}") from e
        set_custom_ops(self.model, config.custom_ops)
        self.runner = ModelRunner(self.model, config.device, get_attn_backend(config.attention_backend))

        attn = self.model.model.layers[0].self_attn
        spec = KVCacheSpec(num_layers=self.hf_config.num_hidden_layers, num_kv_heads=attn.num_kv_heads,
                           head_dim=attn.head_dim, dtype=next(self.model.parameters()).dtype,
                           device=config.device)
        self.block_size = config.block_size
        # Room for max_num_seqs full-length requests, within DRAFT_KV_MAX_BYTES.
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        num_blocks = min(config.max_num_seqs * blocks_per_seq,
                         max(blocks_per_seq, DRAFT_KV_MAX_BYTES // (spec.bytes_per_token * self.block_size)))
        self.runner.initialize_kv_cache(spec, KVCacheConfig(num_blocks=num_blocks, block_size=self.block_size))
        self.block_pool = BlockPool(num_blocks)
        self.states: dict[str, _DraftState] = {}
        # Counters (tests and the benchmark read them): tokens the draft computed, its passes.
        self.num_computed_tokens = 0
        self.num_forward_passes = 0

    # --8<-- [start:propose]
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """Greedy drafts: pass 1 catches each request's cache up to its last committed token
        and drafts one token; passes 2..k feed the previous draft. Requests in one batch."""
        drafts: list[list[int]] = [[] for _ in requests]
        want = [min(m, self.k) for m in max_drafts]
        rows: list[int] = []  # indices into `requests` still drafting
        feeds: list[list[int]] = []  # the tokens each row feeds this pass
        for i, (request, n) in enumerate(zip(requests, want)):
            tokens = request.all_token_ids
            n = min(n, self.max_model_len - len(tokens))  # drafts beyond the model's length
            if n <= 0:
                continue
            state = self.states.setdefault(request.request_id, _DraftState())
            # Valid K/V: the common prefix, and never the last token (its logits are needed).
            valid = min(longest_common_prefix(state.fed, tokens), len(tokens) - 1)
            del state.fed[valid:]
            want[i] = n
            rows.append(i)
            feeds.append(tokens[valid:])
        for step in range(max(want, default=0)):
            rows, feeds = self._reserve(requests, rows, feeds)
            if not rows:
                break
            tokens, sure = self._forward([requests[i].request_id for i in rows], feeds)
            next_rows, next_feeds = [], []
            for i, token, go_on in zip(rows, tokens, sure):
                drafts[i].append(token)
                if go_on and len(drafts[i]) < want[i]:
                    next_rows.append(i)
                    next_feeds.append([token])
            rows, feeds = next_rows, next_feeds
        return drafts
    # --8<-- [end:propose]

    def free(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self.block_pool.free_blocks(state.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    # -- internals ----------------------------------------------------------------------------

    def _reserve(self, requests: Sequence[Request], rows: list[int],
                 feeds: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """Give each row the blocks its new tokens go to. A request the pool cannot serve is
        dropped from drafting (it gets fewer drafts, never an error) and its state freed."""
        kept_rows, kept_feeds = [], []
        for i, feed in zip(rows, feeds):
            state = self.states[requests[i].request_id]
            needed = -(-(len(state.fed) + len(feed)) // self.block_size) - len(state.blocks)
            if needed > self.block_pool.num_free_blocks:
                logger.warning("draft model's KV cache is full: request %r gets no more drafts now",
                               requests[i].request_id)
                self.free(requests[i].request_id)
                continue
            if needed > 0:
                state.blocks += self.block_pool.get_new_blocks(needed)
            kept_rows.append(i)
            kept_feeds.append(feed)
        return kept_rows, kept_feeds

    def _forward(self, req_ids: list[str], feeds: list[list[int]]) -> tuple[list[int], list[bool]]:
        """One pass of the draft over the rows; each feeds its tokens after its valid K/V and
        samples greedily from its last one. -> the argmax token of each row, and whether the
        row may draft on (its token's probability is at least `draft_confidence_threshold`;
        always, without one)."""
        states = [self.states[r] for r in req_ids]
        batch = InputBatch(
            req_ids=req_ids,
            token_ids=feeds,
            num_computed_tokens=[len(s.fed) for s in states],
            query_lens=[len(f) for f in feeds],
            block_tables=[[b.block_id for b in s.blocks] for s in states],
            sampling_rows=list(range(len(req_ids))),
        )
        logits = self.runner.execute_model(batch)  # [rows, vocab]
        assert logits is not None
        for state, feed in zip(states, feeds):
            state.fed += feed
        self.num_computed_tokens += sum(len(f) for f in feeds)
        self.num_forward_passes += 1
        tokens = logits.argmax(dim=-1)  # [rows]
        if self.confidence_threshold is None:
            return tokens.tolist(), [True] * len(req_ids)
        # the drafted token's probability: its logit against the log-sum-exp of the row
        prob = (logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(dim=-1)).exp()  # [rows]
        return tokens.tolist(), (prob >= self.confidence_threshold).tolist()
