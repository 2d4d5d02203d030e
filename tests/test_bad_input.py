"""Bad input fails early with a `ValueError` that names what was wrong and what is allowed, and
leaves the engine usable; aborts and request ids behave like vLLM's.

Every `match=` names the field (and, where there is one, the allowed range).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm.config import LATEST_STAGE, STAGE_NAMES


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=4, max_model_len=64)


@pytest.fixture
def ckpt_copy(tiny_qwen3, tmp_path):
    """A private copy of the tiny qwen3 checkpoint that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen3, dst)
    return dst


# -- prompts --------------------------------------------------------------------------------


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt must not be empty \(it has 0 tokens\)"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt must not be empty"):
        llm.llm_engine.add_request("empty", [])


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"prompt has 65 tokens, more than max_model_len=64"):
        llm.generate([[5] * 65], use_tqdm=False)
    # 64 tokens fit: the request ends at once, with one token, for length.
    out = llm.generate([[5] * 64], SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1 and out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("bad", [512, -1, 10**9])
def test_token_ids_out_of_vocab(llm, bad):
    with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 512\)"):
        llm.generate([[1, 2, bad]], use_tqdm=False)


def test_rejected_generate_queues_nothing(llm):
    """One bad prompt among good ones: nothing is queued, and the next call works."""
    good = [[10, 11, 12], [13, 14]]
    for bad in ([], [1, 512], ""):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate([good[0], bad, good[1]], SamplingParams(max_tokens=3), use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
        assert llm.llm_engine.get_num_unfinished_requests() == 0
    outs = llm.generate(good, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]
    assert not llm.llm_engine.has_unfinished_requests()


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match=r"got 1 sampling_params for 2 prompts"):
        llm.generate([[1], [2]], [SamplingParams()], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_sampling_params_object_queues_nothing(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32")  # its own: this may leave a request queued
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        llm.generate([[1], [2]], [SamplingParams(max_tokens=2), "greedy"], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


# -- sampling parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), r"temperature must be a number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-2), r"top_k must be an integer >= 1, or 0 / -1 to disable, got -2"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(max_tokens=0), r"max_tokens must be an integer >= 1"),
        (dict(min_tokens=5, max_tokens=3), r"min_tokens \(5\) must be <= max_tokens \(3\)"),
        (dict(min_tokens=-1), r"min_tokens must be an integer >= 0"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be a number > 0"),
        (dict(repetition_penalty=-1.0), r"repetition_penalty must be a number > 0"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(n=0), r"n must be an integer >= 1"),
        (dict(stop=[""]), r"stop must be a non-empty string"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids must be a list of non-negative integers"),
        (dict(seed=1.5), r"seed must be an integer or None"),
        (dict(temperature=float("nan")), r"temperature must be a number"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_good_sampling_params_edges_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1,
                   presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.5)


# -- model path and checkpoint files --------------------------------------------------------


def _load(path: Path) -> LLM:
    return LLM(str(path), stage=1, dtype="float32")


def test_missing_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"model folder .*does-not-exist.* does not exist"):
        _load(tmp_path / "does-not-exist")


def test_model_path_is_a_file(ckpt_copy):
    with pytest.raises(ValueError, match=r"must be a folder or a hub id"):
        _load(ckpt_copy / "config.json")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config.json"):
        _load(tmp_path / "empty")


def test_unknown_architecture(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown architecture \['MistralForCausalLM'\].*supported: "
                                         r"\['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\]"):
        _load(ckpt_copy)


def test_config_json_not_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        _load(ckpt_copy)


def test_folder_with_no_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights in .*expected model.safetensors or "
                                         r"model.safetensors.index.json"):
        _load(ckpt_copy)


def _shard(ckpt: Path, hf_model) -> dict:
    (ckpt / "model.safetensors").unlink()
    hf_model.save_pretrained(ckpt, max_shard_size="50KB")
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def test_missing_shard_listed_in_index(ckpt_copy, hf_qwen3):
    index = _shard(ckpt_copy, hf_qwen3)
    shard = sorted(set(index["weight_map"].values()))[1]
    (ckpt_copy / shard).unlink()
    with pytest.raises(ValueError, match=rf"weight shard .*{shard} listed in the index is missing"):
        _load(ckpt_copy)


def test_index_without_weight_map(ckpt_copy, hf_qwen3):
    _shard(ckpt_copy, hf_qwen3)
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a valid safetensors index"):
        _load(ckpt_copy)


@pytest.mark.parametrize("damage", ["truncate", "garble_header"])
def test_corrupt_safetensors(ckpt_copy, damage):
    f = ckpt_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # the 8-byte header length is kept, the JSON header after it is garbage
        data[8:64] = b"\xff" * 56
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weight file .*model.safetensors is corrupt or unreadable"):
        _load(ckpt_copy)


def test_missing_weight_tensor(ckpt_copy):
    from safetensors.torch import load_file, save_file

    f = ckpt_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights missing from the checkpoint.*model.layers.1.mlp.up_proj.weight"):
        _load(ckpt_copy)


def test_weight_shape_does_not_match_config(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.mlp.\w+_proj.weight' has shape"):
        _load(ckpt_copy)


def test_unexpected_weight_tensor(ckpt_copy):
    from safetensors.torch import load_file, save_file

    f = ckpt_copy / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.self_attn.extra.weight' "
                                         r"has no matching parameter"):
        _load(ckpt_copy)


# -- engine configuration -------------------------------------------------------------------


def test_stage_out_of_range():
    for bad in (0, 9, "1", True):
        with pytest.raises(ValueError, match=rf"stage must be an integer in 1..{max(STAGE_NAMES)}"):
            EngineConfig.for_stage(bad)


@pytest.mark.skipif(LATEST_STAGE >= 7, reason="every stage is built")
def test_stage_not_built_yet(tiny_qwen3):
    stage = LATEST_STAGE + 1
    msg = rf"stage {stage} \({STAGE_NAMES[stage]}\) is not built yet; stages 1..{LATEST_STAGE} are available"
    with pytest.raises(ValueError, match=msg):
        EngineConfig.for_stage(stage)
    with pytest.raises(ValueError, match=msg):
        LLM(str(tiny_qwen3), stage=stage)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp32"])
def test_bad_dtype(tiny_qwen3, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be 'auto' or one of .*got '{dtype}'"):
        LLM(str(tiny_qwen3), dtype=dtype)


def test_bad_device_type():
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda\[:N\]', got 'meta'"):
        EngineConfig(device="meta")


def test_unknown_device_name():
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda\[:N\]'"):
        EngineConfig(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(tiny_qwen3):
    with pytest.raises(ValueError, match=r"device"):
        LLM(str(tiny_qwen3), device="cuda")


def test_bad_sizes():
    with pytest.raises(ValueError, match=r"max_num_seqs must be a positive integer, got 0"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_model_len must be a positive integer, got -1"):
        EngineConfig(max_model_len=-1)


def test_max_model_len_above_max_position_embeddings(tiny_qwen3):
    with pytest.raises(ValueError, match=r"max_model_len \(5000\) is larger than the model's "
                                         r"max_position_embeddings \(1024\)"):
        LLM(str(tiny_qwen3), max_model_len=5000)


# -- request ids and aborts -----------------------------------------------------------------


def test_duplicate_request_id(llm):
    engine = llm.llm_engine
    engine.add_request("dup", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2))
    with pytest.raises(ValueError, match=r"request id 'dup' is already in use"):
        engine.add_request("dup", [4, 5], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    # Once finished, the id is free again.
    engine.add_request("dup", [4, 5], SamplingParams(temperature=0.0, max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()


def test_request_id_colliding_with_a_child_id(tiny_qwen3):
    engine = LLM(str(tiny_qwen3), stage=1, dtype="float32").llm_engine
    engine.add_request("x", [10, 11, 12], SamplingParams(n=2, temperature=0.0, max_tokens=3))
    with pytest.raises(ValueError, match=r"request id 'x#0' is already in use"):
        engine.add_request("x#0", [20, 21], SamplingParams(temperature=0.0, max_tokens=3))


def test_abort_unknown_id(llm):
    with pytest.raises(ValueError, match=r"cannot abort 'nope': no unfinished request has this id"):
        llm.llm_engine.abort_request("nope")


def _run(engine, requests, abort_after_steps=None, abort_id=None):
    """Drive the engine by hand; returns ({id: final output}, the abort's output)."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    finished, aborted, steps = {}, None, 0
    while engine.has_unfinished_requests():
        if steps == abort_after_steps:
            aborted = engine.abort_request(abort_id)
            with pytest.raises(ValueError, match="cannot abort"):
                engine.abort_request(abort_id)  # it is gone
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out
        steps += 1
    return finished, aborted


def test_abort_mid_run(tiny_qwen3, hf_qwen3):
    from tests.helpers import hf_greedy

    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=2)
    greedy = lambda m: SamplingParams(temperature=0.0, max_tokens=m)  # noqa: E731
    requests = [
        ("a", [20, 21, 22, 23], greedy(12)),
        ("b", [30, 31], greedy(10)),  # aborted after 3 steps, while running
        ("c", [40, 41, 42], greedy(6)),  # waits for a and b's batch
        ("d", [50], greedy(5)),
    ]
    finished, aborted = _run(llm.llm_engine, requests, abort_after_steps=3, abort_id="b")
    assert aborted is not None and aborted.finished
    assert aborted.outputs[0].finish_reason == "abort"
    b_ref = hf_greedy(hf_qwen3, [30, 31], 10)
    assert aborted.outputs[0].token_ids == b_ref[:3]  # what it had when aborted
    assert set(finished) == {"a", "c", "d"}
    for rid, prompt, params in requests:
        if rid != "b":
            want = hf_greedy(hf_qwen3, prompt, params.max_tokens)
            assert finished[rid].outputs[0].token_ids == want, rid
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    assert llm.llm_engine.kv_cache_manager.num_reserved_tokens == 0


def test_abort_waiting_request(tiny_qwen3, hf_qwen3):
    from tests.helpers import hf_greedy

    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=1)
    requests = [("a", [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=4)),
                ("w", [5, 6], SamplingParams(temperature=0.0, max_tokens=4))]
    finished, aborted = _run(llm.llm_engine, requests, abort_after_steps=1, abort_id="w")
    assert aborted.outputs[0].finish_reason == "abort" and aborted.outputs[0].token_ids == []
    assert set(finished) == {"a"}
    assert finished["a"].outputs[0].token_ids == hf_greedy(hf_qwen3, [7, 8, 9], 4)
