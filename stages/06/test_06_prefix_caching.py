"""Stage 06: automatic prefix caching. `pytest stages/06` reproduces the stage.

Tokens are judged against HF transformers (greedy) and against the same engine without the cache
(seeded sampling); the gain by exact counts of prompt tokens computed, which follow from
block-level hits by arithmetic; the block pool and manager by hypothesis invariants after random
operations on requests that share prefixes.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm.core.block_hash import NONE_HASH, hash_block_tokens, sha256_hash
from folovllm.core.block_pool import BlockPool
from folovllm.core.kv_cache_manager import KVCacheManager
from folovllm.core.request import Request
from folovllm.kv_cache_interface import KVCacheConfig
from tests.helpers import ARCHS, hf_greedy

BS = 16  # block_size of every engine here (the default)
BYTES_PER_TOKEN = 512  # the tiny Qwen3: 2 (K,V) * 2 layers * 2 KV heads * 16 dims * 4 bytes


# Chunked prefill (stage 05) off and on: a hit leaves a partly computed prompt, as a chunk does.
CHUNKED = [False, True]


def llm6(path, chunked: bool = False, **kw) -> LLM:
    """Stage 06, with chunked prefill (stage 05) off or on; on, the step budget is 64 tokens, so
    prompts are cut into chunks and a hit leaves a prompt that is finished chunk by chunk."""
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_seqs", 8)
    kw["enable_chunked_prefill"] = chunked
    if chunked:
        kw["max_num_batched_tokens"] = 64
    return LLM(str(path), stage=6, dtype="float32", **kw)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def shared_prefix_prompts(vocab: int, prefix_len: int, suffix_lens: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(n)] for n in suffix_lens]


# -- tokens: HF is the oracle -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_when_every_prompt_hits(greedy_reference, arch):
    """The mixed prompts twice through one engine: the second time every prompt of two blocks or
    more hits all its cached blocks and computes only the rest, over cached context."""
    ref = greedy_reference(arch)
    llm = llm6(ref.path)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in ref.max_tokens]
    assert token_ids(llm.generate(ref.prompts, params, use_tqdm=False)) == ref.outputs
    first_hits = llm.stats.prefix_cache.hits
    assert token_ids(llm.generate(ref.prompts, params, use_tqdm=False)) == ref.outputs
    expected_hits = sum((len(p) - 1) // BS * BS for p in ref.prompts)  # all but the last token
    assert llm.stats.prefix_cache.hits - first_hits == expected_hits > 0


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("chunked", CHUNKED)
def test_shared_prefix_greedy_matches_hf(tiny_qwen3, hf_qwen3, backend, chunked):
    """Requests sharing a 100-token prefix, admitted together: they read the blocks the first
    one writes in the same step (each layer stores the batch's K/V before attending)."""
    prompts = shared_prefix_prompts(hf_qwen3.config.vocab_size, 100, [10, 3, 17, 1, 30, 8], seed=1)
    max_tokens = [12, 20, 5, 16, 9, 14]
    llm = llm6(tiny_qwen3, chunked, attention_backend=backend)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens]
    out = token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert out == [hf_greedy(hf_qwen3, p, m) for p, m in zip(prompts, max_tokens)]
    assert llm.stats.prefix_cache.hits > 0


# -- the gain: prompt tokens computed, exactly ------------------------------------------------------

@pytest.mark.parametrize("chunked", CHUNKED)
def test_shared_prefix_computes_only_what_the_hits_leave(tiny_qwen3, chunked):
    """6 prompts = one 100-token system prompt + 10..15-token questions. The prefix holds 6 full
    blocks (96 tokens); the first request computes everything, each of the 5 others 96 tokens
    fewer. Stage 04 computes every prompt token."""
    prompts = shared_prefix_prompts(512, 100, [10, 11, 12, 13, 14, 15], seed=2)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    total = sum(map(len, prompts))
    llm = llm6(tiny_qwen3, chunked)
    out6 = token_ids(llm.generate(prompts, params, use_tqdm=False))
    llm4 = LLM(str(tiny_qwen3), stage=4, dtype="float32", max_model_len=256, max_num_seqs=8)
    out4 = token_ids(llm4.generate(prompts, params, use_tqdm=False))
    assert out6 == out4
    assert llm4.stats.num_prompt_tokens_computed == total == 675
    s = llm.stats
    assert (s.prefix_cache.queries, s.prefix_cache.hits, s.prefix_cache.blocks_saved) == (675, 5 * 96, 30)
    assert s.num_prompt_tokens_computed == total - 5 * 96 == 195
    assert s.prefix_cache.hit_rate == pytest.approx(480 / 675)


def test_a_fully_cached_prompt_still_computes_its_last_block(tiny_qwen3):
    """Only whole blocks hit, and the last token must be computed (its logits give the next
    token): a 32-token prompt seen before computes its last 16 tokens, a 33-token one 1 token."""
    llm = llm6(tiny_qwen3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for n, computed_again in ((32, 16), (33, 1), (15, 15)):
        prompt = [3 + (7 * i + n) % 400 for i in range(n)]
        first = token_ids(llm.generate([prompt], params, use_tqdm=False))
        before = llm.stats.num_prompt_tokens_computed
        assert token_ids(llm.generate([prompt], params, use_tqdm=False)) == first
        assert llm.stats.num_prompt_tokens_computed - before == computed_again


def test_multi_turn_chat_hits_its_earlier_turns(tiny_qwen3, hf_qwen3):
    """Turn 2's prompt = turn 1's prompt (40) + its answer (24) + a new question (10). Turn 1
    computed 40 + 23 tokens (its last answer token is sampled, never computed): 3 full blocks,
    the third holding answer tokens. Turn 2 hits those 48 tokens and computes 26."""
    rng = random.Random(3)
    turn1 = [rng.randrange(3, 512) for _ in range(40)]
    llm = llm6(tiny_qwen3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    answer1 = token_ids(llm.generate([turn1], params, use_tqdm=False))[0]
    turn2 = turn1 + answer1 + [rng.randrange(3, 512) for _ in range(10)]
    before = llm.stats.num_prompt_tokens_computed
    answer2 = token_ids(llm.generate([turn2], params, use_tqdm=False))[0]
    assert llm.stats.num_prompt_tokens_computed - before == 74 - 48
    assert answer2 == hf_greedy(hf_qwen3, turn2, 24, min_new_tokens=24)


def test_n_samples_share_the_prompt_blocks(tiny_qwen3):
    """n=4 seeded samples of one 100-token prompt: the 3 later samples take the prompt's 6 full
    blocks by reference (18 blocks saved, 18 * 16 fewer KV slots at the peak) and compute only
    its last 4 tokens; the sampled tokens are the same as without the cache."""
    prompt = shared_prefix_prompts(512, 100, [0], seed=4)[0]
    params = SamplingParams(n=4, temperature=0.8, seed=11, max_tokens=20, ignore_eos=True)
    with_cache = llm6(tiny_qwen3)
    without = LLM(str(tiny_qwen3), stage=4, dtype="float32", max_model_len=256, max_num_seqs=8)
    out6 = [list(c.token_ids) for c in with_cache.generate([prompt], params, use_tqdm=False)[0].outputs]
    out4 = [list(c.token_ids) for c in without.generate([prompt], params, use_tqdm=False)[0].outputs]
    assert out6 == out4
    assert len({tuple(o) for o in out6}) > 1  # the samples really differ
    s6, s4 = with_cache.stats, without.stats
    assert s6.prefix_cache.blocks_saved == 18
    assert s6.num_prompt_tokens_computed == 100 + 3 * 4
    assert s4.peak_kv_tokens_reserved - s6.peak_kv_tokens_reserved == 18 * BS
    # a shared slot is one live token, however many requests read it
    assert 0 < s6.kv_utilization <= 1


def test_seeded_sampling_is_identical_with_and_without_the_cache(tiny_qwen3):
    prompts = shared_prefix_prompts(512, 70, [5, 9, 2, 20], seed=5)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=15, ignore_eos=True)
              for i in range(len(prompts))]
    llm = llm6(tiny_qwen3)
    cold = token_ids(llm.generate(prompts, params, use_tqdm=False))
    warm = token_ids(llm.generate(prompts, params, use_tqdm=False))  # every prompt hits now
    llm4 = LLM(str(tiny_qwen3), stage=4, dtype="float32", max_model_len=256, max_num_seqs=8)
    assert cold == warm == token_ids(llm4.generate(prompts, params, use_tqdm=False))


@pytest.mark.parametrize("chunked", CHUNKED)
def test_a_preempted_request_hits_its_own_blocks_when_it_resumes(tiny_qwen3, chunked):
    """No two prompts share a token, so every hit is a resumed request finding the blocks it
    computed before it was preempted; tokens are those of a run with room to spare."""
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 512) for _ in range(30 + 9 * i)] for i in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=200 - len(p), ignore_eos=True) for p in prompts]
    ample = llm6(tiny_qwen3, chunked, max_num_seqs=8)
    expected = token_ids(ample.generate(prompts, params, use_tqdm=False))
    assert ample.stats.num_preemptions == 0 and ample.stats.prefix_cache.hits == 0
    # 20 blocks of 16 tokens: eight requests growing to 200 tokens do not fit at once.
    tight = llm6(tiny_qwen3, chunked, max_num_seqs=8, kv_cache_memory=20 * BS * BYTES_PER_TOKEN)
    assert token_ids(tight.generate(prompts, params, use_tqdm=False)) == expected
    s = tight.stats
    assert s.num_preemptions > 0
    assert s.prefix_cache.hits > 0
    assert s.prefix_cache.requests == len(prompts) + s.num_preemptions
    manager = tight.llm_engine.kv_cache_manager
    assert manager.num_free_blocks == manager.block_pool.num_blocks  # every block back


def test_hash_collisions_cost_a_miss_never_wrong_kv(tiny_qwen3, hf_qwen3):
    """With a hash that maps every block to the same value, every lookup finds a block; only
    the check of its stored tokens and parent keeps the tokens right."""
    prompts = shared_prefix_prompts(hf_qwen3.config.vocab_size, 40, [5, 12, 30], seed=7)
    prompts += [list(reversed(p)) for p in prompts]  # same multiset, other order
    params = SamplingParams(temperature=0, max_tokens=6)
    llm = llm6(tiny_qwen3)
    llm.llm_engine.kv_cache_manager.prefix_cache.hash_fn = lambda data: b"same"
    out = token_ids(llm.generate(prompts, params, use_tqdm=False))
    out += token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert out == [hf_greedy(hf_qwen3, p, 6) for p in prompts] * 2
    assert llm.stats.prefix_cache.collisions > 0


def test_a_request_whose_step_failed_leaves_nothing_cached(tiny_qwen3, hf_qwen3, monkeypatch):
    """Blocks are cached when they are scheduled. If the step then raises for a request before
    its K/V is written (the engine's fault guard finishes it with "error"), its blocks must not
    stay findable: the same prompt later misses and gets HF's tokens."""
    bad = shared_prefix_prompts(512, 50, [0], seed=8)[0]  # 3 full blocks
    llm = llm6(tiny_qwen3)
    engine = llm.llm_engine
    real_execute = engine.model_executor.execute_model

    def failing_execute(batch):
        if "bad" in batch.req_ids:
            raise RuntimeError("injected fault before any K/V is written")
        return real_execute(batch)

    monkeypatch.setattr(engine.model_executor, "execute_model", failing_execute)
    params = SamplingParams(temperature=0, max_tokens=5)
    engine.add_request("bad", bad, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["bad"].outputs[0].finish_reason == "error"
    monkeypatch.undo()
    hits = engine.stats.prefix_cache.hits
    assert token_ids(llm.generate([bad], params, use_tqdm=False)) == [hf_greedy(hf_qwen3, bad, 5)]
    assert engine.stats.prefix_cache.hits == hits  # nothing of the failed request was findable


def test_prefix_caching_needs_paged_kv():
    with pytest.raises(ValueError, match="prefix caching needs enable_paged_kv"):
        EngineConfig.for_stage(2, enable_prefix_caching=True)
    assert EngineConfig.for_stage(6).enable_prefix_caching
    assert not EngineConfig.for_stage(6, enable_prefix_caching=False).enable_prefix_caching
    assert not EngineConfig.for_stage(4).enable_prefix_caching


# -- the block pool: lookup, LRU eviction ------------------------------------------------------------

def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(temperature=0, max_tokens=1), arrival_time=0.0)


def admit(manager: KVCacheManager, req: Request) -> bool:
    """What `Scheduler.schedule_waiting` does: look up, then allocate the rest."""
    blocks, num_computed = manager.get_computed_blocks(req)
    if not manager.allocate_slots(req, req.num_tokens - num_computed, blocks):
        return False
    req.num_computed_tokens = req.num_tokens
    return True


def test_pool_lookup_checks_the_stored_tokens():
    pool = BlockPool(4)
    [block] = pool.get_new_blocks(1)
    h = hash_block_tokens(sha256_hash, NONE_HASH, [1, 2, 3, 4])
    pool.cache_full_block(block, h)
    assert pool.get_cached_block(h) is block
    forged = h._replace(token_ids=(1, 2, 3, 5))  # same hash value, other tokens
    assert pool.get_cached_block(forged) is None and pool.num_collisions == 1
    other_parent = h._replace(parent_hash_value=bytes([1]) * 32)
    assert pool.get_cached_block(other_parent) is None and pool.num_collisions == 2


def test_eviction_is_least_recently_freed_first_tail_before_head():
    """A and B (3 full blocks each) are freed, A first; new blocks come from the never-used ones,
    then A's tail, A's middle, ... B's head last. A hit takes a free block out of the queue."""
    manager = KVCacheManager(KVCacheConfig(num_blocks=10, block_size=4), watermark=0.0, enable_caching=True)
    pool = manager.block_pool
    a, b = request("a", list(range(3, 16))), request("b", list(range(100, 113)))  # 13 tokens: 4 blocks
    assert admit(manager, a) and admit(manager, b)
    a_blocks, b_blocks = list(manager.req_to_blocks["a"]), list(manager.req_to_blocks["b"])
    manager.free(a)
    manager.free(b)
    order = [blk.block_id for blk in reversed(a_blocks)] + [blk.block_id for blk in reversed(b_blocks)]
    assert pool.free_block_queue.block_ids() == [8, 9] + order
    # 4 new blocks: the 2 never used, then A's last two (its partial block, then its third)
    c = request("c", list(range(200, 216)))
    assert admit(manager, c)
    assert [blk.block_id for blk in manager.req_to_blocks["c"]] == [8, 9] + order[:2]
    assert pool.num_evictions == 1  # only A's third block held cached content
    # A again: its first two blocks still hit; the hit takes them out of the free queue
    a2 = request("a2", list(range(3, 16)))
    blocks, num_computed = manager.get_computed_blocks(a2)
    assert blocks == a_blocks[:2] and num_computed == 8
    assert admit(manager, a2)
    assert all(blk.ref_cnt == 1 and blk.block_id not in pool.free_block_queue.block_ids() for blk in blocks)


def test_nothing_a_running_request_holds_is_evicted():
    manager = KVCacheManager(KVCacheConfig(num_blocks=6, block_size=4), watermark=0.0, enable_caching=True)
    a = request("a", list(range(3, 19)))  # 16 tokens: 4 full blocks, all cached
    assert admit(manager, a)
    held = {blk.block_id for blk in manager.req_to_blocks["a"]}
    assert not admit(manager, request("b", list(range(50, 62))))  # needs 3 blocks, 2 free
    assert admit(manager, request("c", list(range(50, 58))))  # 2 blocks
    assert held.isdisjoint(blk.block_id for blk in manager.req_to_blocks["c"])
    assert all(blk.block_hash is not None for blk in manager.req_to_blocks["a"])


# -- the manager under random operations ------------------------------------------------------------

PREFIXES = [[5] * 9, [5] * 4 + [6] * 5, [7, 8, 9, 10, 11, 12, 13, 14, 15]]
operation = st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5),
                      st.integers(0, 2), st.integers(1, 12))


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(3, 20), block_size=st.sampled_from([1, 2, 4]),
       ops=st.lists(operation, max_size=50))
def test_manager_invariants_with_shared_prefixes(num_blocks, block_size, ops):
    """Requests drawn from three overlapping prefixes plus a tail are added, grown by generated
    tokens and freed at random. After every operation: no block both free and referenced; a
    block's ref count equals the block tables holding it; every block the hash map names holds
    the content its hash names (checked against a shadow record of what each block was filled
    with); a hit hands out exactly the request's own prefix. At the end every block is back."""
    manager = KVCacheManager(KVCacheConfig(num_blocks, block_size), watermark=0.0, enable_caching=True)
    pool = manager.block_pool
    live: dict[int, Request] = {}
    written: dict[int, tuple[int, ...]] = {}  # block id -> the token prefix its K/V was computed after
    counter = 0

    def record_writes(req: Request, first_new_block: int) -> None:
        for i, blk in enumerate(manager.req_to_blocks[req.request_id][first_new_block:], first_new_block):
            written[blk.block_id] = tuple(req.all_token_ids[: (i + 1) * block_size])

    for kind, key, prefix, n in ops:
        if kind == "add" and key not in live:
            counter += 1
            req = request(f"{key}-{counter}", PREFIXES[prefix] + [20 + counter] * n)
            hits, _ = manager.get_computed_blocks(req)
            for i, blk in enumerate(hits):  # the hit is this request's own prefix
                assert written[blk.block_id] == tuple(req.all_token_ids[: (i + 1) * block_size])
            if admit(manager, req):
                live[key] = req
                record_writes(req, len(hits))
            else:
                assert req.request_id not in manager.req_to_blocks  # a refusal takes nothing
        elif kind == "grow" and key in live:
            req = live[key]
            before = len(manager.req_to_blocks[req.request_id])
            for t in range(n):
                req.append_output_token(30 + t)
            if manager.allocate_slots(req, n):
                req.num_computed_tokens += n
                record_writes(req, max(before - 1, 0))  # the partial last block filled up too
            else:
                for _ in range(n):  # not computed: forget the tokens again
                    req.output_token_ids.pop()
                    req.all_token_ids.pop()
                del req.block_hashes[req.num_tokens // block_size:]
                assert len(manager.req_to_blocks[req.request_id]) == before
        elif kind == "free" and key in live:
            manager.free(live.pop(key))

        tables = [manager.req_to_blocks[r.request_id] for r in live.values()]
        free_ids = pool.free_block_queue.block_ids()
        for blk in pool.blocks:
            holders = sum(t.count(blk) for t in tables)
            assert blk.ref_cnt == holders, f"block {blk.block_id}: ref_cnt {blk.ref_cnt}, {holders} tables"
            assert (blk.block_id in free_ids) == (blk.ref_cnt == 0), "free and referenced"
        for t in tables:
            assert len(t) == len(set(t)), "a block twice in one table"
        assert pool.num_shared_refs == sum(max(blk.ref_cnt - 1, 0) for blk in pool.blocks)
        for hash_value, blk in pool.cached_block_hash_to_block.items():
            assert blk.block_hash is not None and blk.block_hash.hash_value == hash_value
            prefix_tokens = written[blk.block_id]
            assert blk.block_hash.token_ids == prefix_tokens[-block_size:]
            assert chain_hash(prefix_tokens, block_size) == hash_value
    for req in live.values():
        manager.free(req)
    assert manager.num_free_blocks == num_blocks
    assert sorted(pool.free_block_queue.block_ids()) == list(range(num_blocks))


def chain_hash(tokens: tuple[int, ...], block_size: int) -> bytes:
    """The hash of the last block of `tokens`, recomputed from scratch along the chain."""
    parent = NONE_HASH
    for start in range(0, len(tokens), block_size):
        parent = hash_block_tokens(sha256_hash, parent, tokens[start:start + block_size]).hash_value
    return parent
