"""Data-parallel routing policies (`engine/dp_routing.py`), without processes: each policy's
choice on given loads, deterministic; and the front's block hashes are the ones a replica's
prefix cache keeps."""

from __future__ import annotations

import pytest

from folovllm.engine.dp_client import merge_metrics
from folovllm.engine.dp_routing import (LeastLoadedPolicy, PrefixAwarePolicy, ReplicaLoad, RoundRobinPolicy,
                                        RoutingRequest, get_routing_policy, prompt_block_hashes)

BLOCK = 4


def loads(*num_requests: int, dead: tuple[int, ...] = ()) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, n) for i, n in enumerate(num_requests) if i not in dead]


def request(token_ids: list[int]) -> RoutingRequest:
    return RoutingRequest(token_ids, prompt_block_hashes(token_ids, BLOCK))


def test_round_robin_cycles_over_the_live_replicas():
    policy = RoundRobinPolicy()
    assert [policy.select(RoutingRequest(), loads(9, 0, 0)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    picks = {policy.select(RoutingRequest(), loads(0, 0, 0, dead=(1,))) for _ in range(4)}
    assert picks == {0, 2}  # a dead replica is never offered, so never picked


def test_least_loaded_takes_fewest_requests_then_least_kv():
    policy = LeastLoadedPolicy()
    assert policy.select(RoutingRequest(), loads(3, 1, 2)) == 1
    tied = [ReplicaLoad(0, 2, 0.5), ReplicaLoad(1, 2, 0.1), ReplicaLoad(2, 5, 0.0)]
    assert policy.select(RoutingRequest(), tied) == 1  # equal requests: less KV in use wins
    # a full tie rotates, so an idle server does not send every lone request to replica 0
    assert {policy.select(RoutingRequest(), loads(0, 0)) for _ in range(4)} == {0, 1}


def test_prefix_aware_sends_the_second_turn_to_the_first_turns_replica():
    policy = PrefixAwarePolicy(max_load_imbalance=2)
    turn1 = list(range(100, 113))  # 3 full blocks and a bit
    first = policy.select(request(turn1), loads(0, 0))
    other = 1 - first
    # another conversation goes elsewhere (least-loaded: the first one now holds a request)
    load = loads(*(1 if i == first else 0 for i in range(2)))
    assert policy.select(request(list(range(500, 509))), load) == other
    # turn 2 = turn 1 + reply + new message: back to the replica that holds turn 1's blocks,
    # though the other replica is less loaded (by 2: within the cap)
    turn2 = turn1 + [7, 8, 9, 10, 11]
    load = [ReplicaLoad(first, 2), ReplicaLoad(other, 0)]
    assert policy.select(request(turn2), sorted(load, key=lambda x: x.index)) == first
    replica, depth = policy.longest_match(request(turn2 + [1] * 8), {0, 1})
    assert (replica, depth) == (first, len(turn2) // BLOCK)  # its blocks were recorded too


def test_prefix_aware_load_cap_falls_back_to_least_loaded():
    policy = PrefixAwarePolicy(max_load_imbalance=2)
    prompt = list(range(40))
    assert policy.select(request(prompt), loads(0, 0, 0)) == 0  # nothing matches: least-loaded, tie -> 0
    assert policy.select(request(prompt), loads(2, 0, 0)) == 0  # 2 above the least: still its own
    assert policy.select(request(prompt), loads(3, 0, 1)) == 1  # 3 above: over the cap, least-loaded
    # the prefix now belongs to replica 1 (sent there last), and a dead owner is not matched
    assert policy.longest_match(request(prompt), {0, 1, 2}) == (1, 10)
    assert policy.longest_match(request(prompt), {0, 2}) == (None, 0)
    assert policy.select(request(prompt), loads(1, 0, 0, dead=(1,))) == 2


def test_prefix_aware_map_is_bounded_lru():
    policy = PrefixAwarePolicy(max_entries=5)
    policy.select(request(list(range(12))), loads(0, 0))  # 3 blocks
    policy.select(request(list(range(50, 62))), loads(0, 0))  # 3 more: the oldest one goes
    assert len(policy.owner) == 5
    first, second = request(list(range(12))).block_hashes, request(list(range(50, 62))).block_hashes
    assert list(policy.owner) == first[1:] + second  # the least recently routed block went first
    policy.select(request(list(range(8))), loads(0, 0))  # first[1] used again: now the newest
    assert list(policy.owner) == second + first[:2]  # first[2] was the oldest then


def test_front_block_hashes_are_the_prefix_caches_own(tiny_qwen3):
    """The hashes the front routes by must be the keys under which a replica's prefix cache
    keeps the prompt's blocks, or prefix-aware routing would match nothing real."""
    from folovllm import LLM, SamplingParams

    llm = LLM(str(tiny_qwen3), stage=6, dtype="float32", max_model_len=256, max_num_seqs=4)
    engine = llm.llm_engine
    block_size = engine.config.block_size
    prompt = list(range(3, 3 + 3 * block_size + 5))
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    cached = set(engine.kv_cache_manager.block_pool.cached_block_hash_to_block)
    hashes = prompt_block_hashes(prompt, block_size)
    assert len(hashes) == 3 and set(hashes) <= cached


def test_policy_names_and_a_bad_one():
    assert get_routing_policy("prefix_aware").name == "prefix_aware"
    with pytest.raises(ValueError, match=r"--data-parallel-routing must be one of \['least_loaded', "
                                         r"'prefix_aware', 'round_robin'\], got 'random'"):
        get_routing_policy("random")


def test_merged_metrics_label_each_replica_and_keep_one_header():
    text = {i: (b"# HELP folovllm:x A gauge.\n# TYPE folovllm:x gauge\n"
                b'folovllm:x{model_name="m"} ' + str(i + 1).encode() + b"\n") for i in range(2)}
    merged = merge_metrics(text).decode().splitlines()
    assert merged == ["# HELP folovllm:x A gauge.", "# TYPE folovllm:x gauge",
                      'folovllm:x{replica="0",model_name="m"} 1', 'folovllm:x{replica="1",model_name="m"} 2']
