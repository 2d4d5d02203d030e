"""Plain helpers shared by every test folder (`tests/`, `stages/0N/`).

Import them as `from tests.helpers import hf_greedy, mixed_prompts` (the repository root is on
`sys.path` under pytest, see the root `conftest.py`). The fixtures live in `tests/fixtures.py`.

The oracle is HuggingFace transformers, never folovllm itself: `hf_greedy` runs HF `generate`,
`hf_greedy_ignore_eos` a plain no-cache argmax loop over HF's forward.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch

ARCHS = ("qwen3", "qwen2", "llama")

# Prompt lengths of `mixed_prompts`: 1 and 200 are the ends of the range the stages promise to
# handle in one test batch; the ones between exercise padding of every size.
MIXED_PROMPT_LENS = (1, 2, 7, 16, 33, 64, 100, 129, 150, 200)
# Output lengths, all different, so a static batch (stage 01) wastes rows and every later stage
# has requests that finish at different steps.
MIXED_MAX_TOKENS = (1, 3, 6, 9, 13, 18, 24, 30, 37, 45)


def mixed_prompts(vocab_size: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """10 random token-id prompts of lengths 1..200 and their max_tokens (all different).

    Returns `(prompts, max_tokens)`, parallel lists. The seed shuffles which prompt gets which
    max_tokens and draws the tokens; the set of lengths is always `MIXED_PROMPT_LENS`.
    """
    rng = random.Random(seed)
    max_tokens = list(MIXED_MAX_TOKENS)
    rng.shuffle(max_tokens)
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in MIXED_PROMPT_LENS]
    # Interleave short and long prompts so a batch of any size mixes lengths.
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [max_tokens[i] for i in order]


@torch.no_grad()
def hf_greedy(hf_model: Any, prompt_ids: Sequence[int], max_new_tokens: int, **generate_kwargs: Any) -> list[int]:
    """HF `generate(do_sample=False)` for one prompt (no padding): the generated ids only.

    It stops at the model's EOS like folovllm does (the EOS id is included, as in folovllm's
    `token_ids`). Extra kwargs go to `generate` (e.g. `min_new_tokens`, `eos_token_id`).
    """
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = hf_model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **generate_kwargs,
    )
    return out[0, input_ids.shape[1]:].tolist()


@torch.no_grad()
def hf_greedy_ignore_eos(hf_model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that never stops early: argmax of HF's full forward, `max_new_tokens`
    times (no KV cache, so it is also independent of HF's cache code)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def hf_logits(hf_model: Any, prompt_ids: Sequence[int]) -> torch.Tensor:
    """HF float32 logits for every position of one prompt: [L, vocab]."""
    with torch.no_grad():
        return hf_model(torch.tensor([list(prompt_ids)])).logits[0].float()


def num_distinct(outputs: Sequence[Sequence[int]]) -> int:
    return len({t for out in outputs for t in out})


@torch.no_grad()
def our_prefill_logits(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Run folovllm's model on several prompts packed into one flat batch (one prefill step, no
    engine) and return each prompt's logits at every position: [L_i, vocab] each.

    Each prompt gets its own row of a contiguous KV cache, laid out exactly as the engine's
    `AttentionMetadata` describes it::

        tokens          [a0 a1 a2 | b0 b1]
        positions       [ 0  1  2 |  0  1]
        slot_mapping    [ 0  1  2 |  W W+1]        W = row width (longest prompt)
        query_start_loc [0, 3, 5]    seq_lens [3, 2]    block_tables [[0], [1]]
    """
    from folovllm.model_executor.layers.attention import Attention, AttentionMetadata

    lens = [len(p) for p in prompts]
    width = max(lens)
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    dtype = next(model.parameters()).dtype
    for layer in attn_layers:
        shape = (len(prompts), width, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    md = AttentionMetadata.from_lists(lens, lens, [[row] for row in range(len(prompts))], positions, width)
    logits = model.compute_logits(model(input_ids, positions, md))  # [T, vocab]
    return list(logits.split(lens))


@torch.no_grad()
def our_decode_logits(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], num_prefill: Sequence[int]
) -> list[torch.Tensor]:
    """Prefill the first `num_prefill[i]` tokens of each prompt, then feed the rest one token per
    step through the KV cache, all prompts decoding together (a row that has no token left
    recomputes its last one, as a stage-01 idle row does). Returns, per prompt, the logits of
    every position: [L_i, vocab], the decoded positions read K/V from the cache."""
    from folovllm.model_executor.layers.attention import Attention, AttentionMetadata

    lens = [len(p) for p in prompts]
    width = max(lens)
    rows = len(prompts)
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    dtype = next(model.parameters()).dtype
    for layer in attn_layers:
        shape = (rows, width, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    collected: list[list[torch.Tensor]] = [[] for _ in prompts]

    def run(starts: list[int], counts: list[int]) -> torch.Tensor:
        ids = torch.tensor([t for p, s, c in zip(prompts, starts, counts) for t in p[s : s + c]])
        positions = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts)])
        seq_lens = [s + c for s, c in zip(starts, counts)]
        md = AttentionMetadata.from_lists(counts, seq_lens, [[r] for r in range(rows)], positions, width)
        return model.compute_logits(model(ids, positions, md))

    out = run([0] * rows, list(num_prefill)).split(list(num_prefill))
    for i, chunk in enumerate(out):
        collected[i].append(chunk)
    done = list(num_prefill)
    while any(d < n for d, n in zip(done, lens)):
        starts = [d if d < n else n - 1 for d, n in zip(done, lens)]
        logits = run(starts, [1] * rows)
        for i in range(rows):
            if done[i] < lens[i]:
                collected[i].append(logits[i : i + 1])
                done[i] += 1
    return [torch.cat(c) for c in collected]


@contextmanager
def uvicorn_in_thread(app: Any, graceful: Optional[tuple[Any, float]] = None, options: Any = None,
                      stop_timeout_s: float = 30) -> Iterator[tuple[str, Any]]:
    """Serve an ASGI `app` (the server's `build_app`) with a real uvicorn on a free port of
    127.0.0.1, in a thread of this process (so a test can also look at the engine behind it);
    yields `(root URL, uvicorn.Server)` and stops the server (its lifespan exit stops the engine
    loop) on leaving. `graceful=(async_llm, grace_s)` runs the server's own `GracefulServer`,
    which ends the streams still open when the shutdown grace is over. The uvicorn settings
    are the server's own (`uvicorn_config`, with `options`: a `ServerOptions`)."""
    import uvicorn

    from folovllm.entrypoints.openai.api_server import GracefulServer, uvicorn_config
    from folovllm.entrypoints.openai.serving_engine import ServerOptions

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn_config(app, options or ServerOptions(), log_level="warning", timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config) if graceful is None else GracefulServer(config, *graceful)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", uv
    finally:
        uv.should_exit = True
        thread.join(timeout=stop_timeout_s)
        sock.close()
        assert not thread.is_alive(), "server did not stop"
