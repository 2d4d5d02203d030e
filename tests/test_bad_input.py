"""Bad input fails early with a `ValueError` that names what was wrong and what is allowed, and
leaves the engine usable; aborts and request ids behave like vLLM's.

Every `match=` names the field (and, where there is one, the allowed range).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from folovllm import LLM, EngineConfig, SamplingParams
from folovllm.config import AXES, LATEST_STAGE, STAGE_NAMES


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
        (dict(temperature=-0.5), r"temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), r"temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-2), r"top_k must be an integer >= 1, or 0 / -1 to disable, got -2"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(max_tokens=0), r"max_tokens must be an integer >= 1"),
        (dict(min_tokens=5, max_tokens=3), r"min_tokens \(5\) must be <= max_tokens \(3\)"),
        (dict(min_tokens=-1), r"min_tokens must be an integer >= 0"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \[0.01, 100\] \(1 = off\)"),
        (dict(repetition_penalty=-1.0), r"repetition_penalty must be in \[0.01, 100\]"),
        # float32 logits / 1e-300 overflow: NaN probabilities and token 0 forever (issue 9.7)
        (dict(repetition_penalty=1e-300), r"repetition_penalty must be in \[0.01, 100\] \(1 = off\), got 1e-300"),
        (dict(repetition_penalty=1e300), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(n=0), r"n must be an integer >= 1"),
        (dict(stop=[""]), r"stop must be a non-empty string"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids must be a list of non-negative 64-bit integers"),
        (dict(seed=1.5), r"seed must be an integer in \[0, 2\*\*64\), or None, got 1.5"),
        # torch seeds are unsigned 64-bit: these failed later with "Overflow when unpacking" (9.6)
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\), or None, got 18446744073709551616"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
        # these raised TypeError (issue 9.7)
        (dict(stop=5), r"stop must be a non-empty string or a list of non-empty strings, got 5"),
        (dict(stop=["end", 5]), r"stop must be a non-empty string or a list"),
        (dict(stop_token_ids=5), r"stop_token_ids must be a list of non-negative 64-bit integers, got 5"),
        (dict(ignore_eos="no"), r"ignore_eos must be True or False, got 'no'"),
        (dict(temperature=float("nan")), r"temperature must be a finite number"),
        (dict(top_k=10**30), r"top_k must be"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_good_sampling_params_edges_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1,
                   presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.5)
    SamplingParams(seed=0, repetition_penalty=0.01, stop=("a", "b"), stop_token_ids=(1,))
    SamplingParams(seed=2**64 - 1, repetition_penalty=100)


def test_numpy_numbers_are_accepted_as_python_ones():
    """numpy integers were refused as non-integers (issue 9.7); they become plain ints."""
    p = SamplingParams(max_tokens=np.int64(3), top_k=np.int32(5), seed=np.uint64(7),
                       temperature=np.float32(0.5), stop_token_ids=list(np.array([4, 5])))
    assert (p.max_tokens, p.top_k, p.seed) == (3, 5, 7)
    assert all(type(v) is int for v in (p.max_tokens, p.top_k, p.seed, *p.stop_token_ids))
    assert type(p.temperature) is float


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
                                         r"\['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM'\]"):
        _load(ckpt_copy)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("config.json", "{not json", r"config.json is not valid JSON"),
        # a JSON list raised AttributeError (issue 9.7)
        ("config.json", "[1, 2]", r"config.json must hold a JSON object, got a list"),
        ("generation_config.json", "{not json", r"generation_config.json is not valid JSON"),
        ("generation_config.json", '"eos"', r"generation_config.json must hold a JSON object, got a str"),
    ],
)
def test_config_files_that_are_not_json_objects(ckpt_copy, name, text, match):
    (ckpt_copy / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        _load(ckpt_copy)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_size": 10**9}, r"hidden_size=1000000000 in .*must be an integer in 1..65536"),
        ({"num_hidden_layers": 100_000}, r"num_hidden_layers=100000 .*1..1024"),
        ({"hidden_size": -64}, r"hidden_size=-64 .*must be an integer"),
        ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads=3"),
        ({"rms_norm_eps": -1.0}, r"rms_norm_eps=-1.0 .*positive finite"),
        ({"rms_norm_eps": "small"}, r"config.json is not a valid Qwen3ForCausalLM configuration"),
        ({"vocab_size": True}, r"not a valid Qwen3ForCausalLM configuration.*vocab_size"),
    ],
)
def test_impossible_sizes_are_refused_before_anything_is_allocated(ckpt_copy, change, match):
    """Each of these used to reach the allocator (a RuntimeError), allocate for minutes, fail in
    an assert, or load and generate NaN tokens; now a ValueError from config.json alone."""
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg.update(change)
    cfg.pop("layer_types", None)  # one entry per layer, which transformers checks on its own
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
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


def _damage(ckpt: Path, name: str, value: "torch.Tensor | None") -> None:
    """Replace (or with None, delete) one tensor of the checkpoint."""
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, match", [
    # int32 or bool values where the model has float weights were cast silently (issue 28, item 9)
    (("model.layers.0.mlp.down_proj.weight", lambda t: t.to(torch.int32)),
     r"checkpoint tensor 'model.layers.0.mlp.down_proj.weight' has dtype torch.int32, expected a "
     r"floating-point dtype \(the model's parameter is torch.float32\)"),
    (("model.norm.weight", lambda t: t > 0),
     r"checkpoint tensor 'model.norm.weight' has dtype torch.bool, expected a floating-point dtype"),
    (("model.layers.1.self_attn.k_proj.weight", lambda t: t.to(torch.int64)),
     r"'model.layers.1.self_attn.k_proj.weight' has dtype torch.int64"),
    (("model.layers.1.mlp.up_proj.weight", lambda t: t[:, :-1].contiguous()),
     r"checkpoint tensor 'model.layers.1.mlp.up_proj.weight' has shape \(\d+, \d+\), expected"),
    (("model.layers.1.mlp.up_proj.weight", lambda t: None),
     r"weights missing from the checkpoint.*model.layers.1.mlp.up_proj.weight"),
    (("model.layers.0.self_attn.extra.weight", lambda t: torch.zeros(2)),
     r"checkpoint tensor 'model.layers.0.self_attn.extra.weight' has no matching parameter"),
])
def test_checkpoint_is_checked_from_its_headers_before_the_model_is_built(ckpt_copy, monkeypatch, damage, match):
    """Names, shapes and dtypes are compared with the safetensors headers, on a model whose
    parameters are on the meta device: the ValueError comes before any tensor's data is read
    and before the real model is allocated (a wrong last tensor of a large model was found
    after both)."""
    from safetensors.torch import load_file

    from folovllm.model_executor import model_loader
    from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    name, change = damage
    _damage(ckpt_copy, name, change(load_file(ckpt_copy / "model.safetensors").get(name, torch.zeros(1))))
    built: list[torch.nn.Module] = []

    class Spy(Qwen3ForCausalLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    def read(path):
        raise AssertionError("tensor data was read before the checkpoint was checked")

    monkeypatch.setitem(model_loader.MODEL_REGISTRY, "Qwen3ForCausalLM", Spy)
    monkeypatch.setattr(model_loader, "iterate_checkpoint", read)
    with pytest.raises(ValueError, match=match):
        _load(ckpt_copy)
    assert len(built) == 1, "the model was built for real before the checkpoint was checked"
    assert {p.device.type for p in built[0].parameters()} == {"meta"}


def test_float_checkpoint_in_another_float_dtype_still_loads(ckpt_copy, tiny_qwen3):
    """The dtype check refuses non-floating values only: bfloat16 weights load into a float32
    model (cast, as before) and give the same tokens as the float32 checkpoint rounded so."""
    from safetensors.torch import load_file, save_file

    f = ckpt_copy / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, f, metadata={"format": "pt"})
    rounded = ckpt_copy.parent / "rounded"
    shutil.copytree(ckpt_copy, rounded)
    save_file({k: v.to(torch.bfloat16).float() for k, v in tensors.items()}, rounded / "model.safetensors",
              metadata={"format": "pt"})
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = [_load(p).generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids
              for p in (ckpt_copy, rounded)]
    assert tokens[0] == tokens[1]


# -- engine configuration -------------------------------------------------------------------


def test_stage_out_of_range():
    for bad in (0, max(STAGE_NAMES) + 1, "1", True):
        with pytest.raises(ValueError, match=rf"stage must be an integer in 1..{LATEST_STAGE}"):
            EngineConfig.for_stage(bad)


def test_stages_7_and_8_are_axes_not_stage_flags(tiny_qwen3):
    """GPTQ and tensor parallelism are built but compose with any stage: asking for them as a
    rung of the ladder says how to turn them on, instead of quietly running stage 06."""
    with pytest.raises(ValueError, match=r"stage 8 \(tensor parallel\) is not a for_stage flag.*tensor_parallel_size=N"):
        EngineConfig.for_stage(8)
    with pytest.raises(ValueError, match="tensor_parallel_size=N"):
        LLM(str(tiny_qwen3), stage=8)
    with pytest.raises(ValueError, match=r"stage 7 \(GPTQ\) is not a for_stage flag.*load a GPTQ checkpoint"):
        EngineConfig.for_stage(7)


def test_the_engine_says_what_it_runs(tiny_qwen3):
    """`describe_engine`: the ladder's stage, the flags below it that are off, and the axes."""
    llm = LLM(str(tiny_qwen3), dtype="float32", custom_ops="none")
    d = llm.llm_engine.description
    assert (d["stage"], d["stages_off"], d["quantization"], d["cpu_kernels"]) == (LATEST_STAGE, [], None, "off")
    assert d["summary"].startswith(f"stage {LATEST_STAGE:02d} {STAGE_NAMES[LATEST_STAGE]}, attention sdpa")
    ablation = LLM(str(tiny_qwen3), stage=6, enable_chunked_prefill=False, dtype="float32",
                   custom_ops="none").llm_engine.description
    assert ablation["stages_off"] == [5] and "without 05" in ablation["summary"]


def test_stage_not_built_yet(tiny_qwen3):
    unbuilt = [s for s in STAGE_NAMES if s > LATEST_STAGE and s not in AXES]  # named, not built
    if not unbuilt:
        pytest.skip("every stage named in the plan is built")
    stage = max(unbuilt)
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


# -- issue 9: no request can poison the engine; nothing is left behind ----------------------

# Stage 3 with room for 16 blocks of 16 tokens (512 bytes of float32 KV per token): a few
# requests fill it, so preemption happens, and a leaked block shows at once.
TIGHT_KV_BLOCKS = 16
TIGHT_KV = dict(stage=3, dtype="float32", max_num_seqs=4, max_model_len=64,
                kv_cache_memory=TIGHT_KV_BLOCKS * 16 * 512)
REF_PROMPT = [10, 11, 12, 13]


@pytest.fixture(scope="module")
def paged(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), **TIGHT_KV)
    assert llm.llm_engine.kv_cache_manager.block_pool.num_blocks == TIGHT_KV_BLOCKS
    return llm


@pytest.fixture(scope="module")
def ref_greedy(hf_qwen3):
    from tests.helpers import hf_greedy

    return hf_greedy(hf_qwen3, REF_PROMPT, 8)


def assert_empty_and_serving(llm, ref_greedy):
    """Nothing queued, every KV block back in the pool, and the next request is right."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 0
    assert engine.kv_cache_manager.num_reserved_tokens == 0
    before = engine.stats.num_generated_tokens
    out = llm.generate([REF_PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref_greedy
    assert engine.stats.num_generated_tokens - before == len(ref_greedy)  # nothing else ran
    assert engine.kv_cache_manager.num_reserved_tokens == 0


class ScriptedSampler:
    """Wraps the engine's sampler: a request whose prompt is in `scripts` samples the next token
    of its script instead; one whose prompt is in `fail` makes the call raise `error`."""

    def __init__(self, sampler, scripts=None, fail=(), error=RuntimeError("injected fault")):
        self.sampler, self.scripts, self.error = sampler, scripts or {}, error
        self.fail = {tuple(p) for p in fail}

    def __call__(self, logits, requests):
        if any(tuple(r.prompt_token_ids) in self.fail for r in requests):
            raise self.error
        tokens = self.sampler(logits, requests)
        for i, r in enumerate(requests):
            script = self.scripts.get(tuple(r.prompt_token_ids))
            if script is not None:
                tokens[i] = script[r.num_output_tokens]
        return tokens


@pytest.fixture
def script(monkeypatch):
    """script(llm, scripts=..., fail=...) puts a ScriptedSampler into llm's engine for one test."""

    def install(llm, **kwargs):
        engine = llm.llm_engine
        monkeypatch.setattr(engine, "sampler", ScriptedSampler(engine.sampler, **kwargs))

    return install


# 9.1: these passed validation, then raised inside step() forever, leaking KV on every call.
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stop_token_ids=[10**9], min_tokens=1),
         r"stop_token_ids must be token ids of this model, in \[0, 512\), got \[1000000000\]"),
        (dict(stop_token_ids=[512]), r"stop_token_ids must be token ids of this model, in \[0, 512\)"),
        (dict(top_k=2**63), r"top_k must be a 64-bit integer"),
        (dict(top_k=513), r"top_k must be at most the vocabulary size \(512\), or 0 / -1"),
    ],
)
def test_request_that_would_fail_in_a_step_is_refused_when_added(paged, ref_greedy, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paged.generate("the engine", SamplingParams(**kwargs), use_tqdm=False)
    with pytest.raises(ValueError, match=match):
        paged.llm_engine.add_request("x", [1, 2], SamplingParams(**kwargs))
    assert_empty_and_serving(paged, ref_greedy)


def test_text_prompt_with_ids_past_the_vocabulary(tiny_qwen3):
    """A tokenizer with added tokens gives ids the model has no embedding for (9.1)."""
    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_model_len=64)
    tokenizer = llm.get_tokenizer()
    tokenizer.add_tokens(["zzqx"])
    assert tokenizer.encode("zzqx", add_special_tokens=False) == [512]
    with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 512\), got \[512\] "
                                         r"from the tokenizer, which does not match the model"):
        llm.generate("the zzqx", use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("stage", [1, 3, 5])
def test_request_failing_in_a_step_finishes_with_error_and_the_rest_run(
    tiny_qwen3, hf_qwen3, script, stage
):
    """Defence in depth (9.1): a request that makes a step raise finishes with finish_reason
    "error" and its KV freed; the requests batched with it get their normal tokens."""
    from tests.helpers import hf_greedy

    llm = LLM(str(tiny_qwen3), **{**TIGHT_KV, "stage": stage})
    engine = llm.llm_engine
    bad = [7, 7, 7]
    script(llm, fail=[bad])
    good = {"a": [20, 21, 22], "c": [30, 31, 32, 33]}
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    engine.add_request("a", good["a"], greedy)
    engine.add_request("bad", bad, greedy)
    engine.add_request("c", good["c"], greedy)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    failed = finished["bad"].outputs[0]
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert failed.error == "RuntimeError: injected fault"
    for rid, prompt in good.items():
        assert finished[rid].outputs[0].finish_reason == "length"
        assert finished[rid].outputs[0].token_ids == hf_greedy(hf_qwen3, prompt, 6), rid
    assert engine.get_num_unfinished_requests() == 0
    assert engine.kv_cache_manager.num_reserved_tokens == 0


def test_generate_raises_when_a_request_fails_and_leaves_the_engine_empty(
    tiny_qwen3, ref_greedy, script
):
    llm = LLM(str(tiny_qwen3), **TIGHT_KV)
    script(llm, fail=[[7, 7, 7]])
    prompts = [[20, 21, 22], [7, 7, 7], [30, 31, 32, 33]]
    with pytest.raises(RuntimeError, match=r"request \d+ failed in the engine: RuntimeError: injected fault"):
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    script(llm)  # no more faults
    assert_empty_and_serving(llm, ref_greedy)


# 9.2
@pytest.mark.parametrize("kind", ["FINAL_ONLY", "DELTA"])
def test_stop_string_ending_in_a_multibyte_character_split_across_tokens(paged, script, kind):
    from folovllm.sampling_params import RequestOutputKind

    tokenizer = paged.get_tokenizer()
    prefix = tokenizer.encode(" the cache", add_special_tokens=False)
    char = tokenizer.encode("长", add_special_tokens=False)
    assert len(char) == 3  # one byte a token: U+FFFD placeholders until the last one
    tail = tokenizer.encode(" blocks", add_special_tokens=False)
    prompt = [40, 41, 42]
    script(paged, scripts={tuple(prompt): prefix + char + tail + [50] * 10})
    engine = paged.llm_engine
    engine.add_request("s", prompt, SamplingParams(stop="长", max_tokens=20,
                                                   output_kind=RequestOutputKind[kind]))
    text, tokens, final = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out.outputs[0]
            text, tokens = text + final.text, tokens + final.token_ids  # DELTA: the pieces
    if kind == "FINAL_ONLY":
        text, tokens = final.text, final.token_ids
    assert final.finish_reason == "stop" and final.stop_reason == "长"
    assert tokens == prefix + char and text == " the cache"


# 9.3
def test_checkpoint_without_tokenizer_files(ckpt_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (ckpt_copy / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no tokenizer in .*ckpt: expected tokenizer.json"):
        _load(ckpt_copy)


# 9.4 (already refused by the engine core's sizing, before the block pool is built)
def test_kv_cache_memory_larger_than_ram_is_refused_at_once(tiny_qwen3):
    with pytest.raises(ValueError, match=r"the KV cache needs [\d.]+ GiB but the physical RAM is"):
        LLM(str(tiny_qwen3), stage=3, max_model_len=64, kv_cache_memory=10**15)


@pytest.mark.parametrize("stage", [1, 2])
def test_slot_stages_take_only_max_num_seqs_slots_of_a_huge_budget(tiny_qwen3, stage):
    llm = LLM(str(tiny_qwen3), stage=stage, dtype="float32", max_num_seqs=3, max_model_len=64,
              kv_cache_memory=10**15)
    assert llm.llm_engine.kv_cache_manager.kv_cache_config.num_blocks == 3


# 9.5
def test_generate_aborts_what_it_queued_when_queuing_fails(paged, ref_greedy, monkeypatch):
    engine = paged.llm_engine
    real_add, calls = engine.add_request, []

    def add_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise ValueError("injected: the third prompt cannot be queued")
        real_add(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_then_fail)
    with pytest.raises(ValueError, match="injected"):
        paged.generate([[1, 2], [3, 4], [5, 6]], SamplingParams(max_tokens=20), use_tqdm=False)
    monkeypatch.undo()
    assert_empty_and_serving(paged, ref_greedy)


@pytest.mark.parametrize("stage", [1, 3, 5])
@pytest.mark.parametrize("where", ["model", "after_step"])
def test_generate_cleans_up_after_ctrl_c(tiny_qwen3, ref_greedy, script, stage, where):
    """Ctrl-C inside the model's forward pass, or after a step (in a stats logger): the
    requests of the interrupted call are aborted and every block is back (9.5)."""
    llm = LLM(str(tiny_qwen3), **{**TIGHT_KV, "stage": stage})
    engine = llm.llm_engine
    steps = []

    def interrupt(_stats):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt

    prompts = [[i, i + 1, i + 2] * 4 for i in range(20, 34)]  # 14 requests of 12 tokens
    if where == "model":
        script(llm, fail=[prompts[5]], error=KeyboardInterrupt())
    else:
        engine.stat_loggers.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                     use_tqdm=False)
    engine.stat_loggers.clear()
    script(llm)
    assert_empty_and_serving(llm, ref_greedy)


# 9.6
def test_seeds_near_the_top_of_the_range(paged):
    """n=2, seed=2**64-1 overflowed on the second sample; now sample i uses seed + i mod 2**64."""
    params = dict(temperature=1.0, max_tokens=6)
    both = paged.generate([[5, 6, 7]], SamplingParams(n=2, seed=2**64 - 1, **params), use_tqdm=False)
    top = paged.generate([[5, 6, 7]], SamplingParams(seed=2**64 - 1, **params), use_tqdm=False)
    zero = paged.generate([[5, 6, 7]], SamplingParams(seed=0, **params), use_tqdm=False)
    assert both[0].outputs[0].token_ids == top[0].outputs[0].token_ids
    assert both[0].outputs[1].token_ids == zero[0].outputs[0].token_ids


@pytest.mark.parametrize("seed", ["x", -1, 2**64, 1.5, True])
def test_engine_seed_out_of_range(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got"):
        EngineConfig(seed=seed)


# 9.7
def test_sampling_params_given_as_a_dict(llm):
    with pytest.raises(ValueError, match=r"sampling_params must be a SamplingParams or a list of "
                                         r"them, got dict"):
        llm.generate("the engine", {"max_tokens": 2}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"sampling_params must be a SamplingParams, got dict"):
        llm.llm_engine.add_request("d", [1, 2], {"max_tokens": 2})
    assert not llm.llm_engine.has_unfinished_requests()


def test_numpy_token_ids(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    want = llm.generate([[3, 4, 5]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    ids = np.array([3, 4, 5])
    assert llm.generate(list(ids), greedy, use_tqdm=False)[0].outputs[0].token_ids == want
    out = llm.generate([list(ids)], SamplingParams(temperature=0.0, max_tokens=4,
                                                   stop_token_ids=list(np.array([want[1]]))),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == [3, 4, 5] and all(type(t) is int for t in out.prompt_token_ids)
    assert out.outputs[0].token_ids == want[:2] and out.outputs[0].stop_reason == want[1]


def test_stage_1_cuts_its_slots_from_kv_cache_memory(tiny_qwen3):
    slot = 64 * 512  # max_model_len tokens of float32 KV
    llm = LLM(str(tiny_qwen3), stage=1, dtype="float32", max_num_seqs=4, max_model_len=64,
              kv_cache_memory=2 * slot)
    llm.generate([[i, i + 1] for i in range(5)], SamplingParams(max_tokens=3), use_tqdm=False)
    assert llm.stats.max_num_running == 2  # batches of 2, not max_num_seqs=4
    with pytest.raises(ValueError, match=r"kv_cache_memory=100 bytes is smaller than one max_model_len=64 slot"):
        LLM(str(tiny_qwen3), stage=1, dtype="float32", max_model_len=64, kv_cache_memory=100)


@pytest.mark.parametrize("stage, fitted_len", [(2, 16), (3, 64)])
def test_small_budget_without_max_model_len_lowers_it_at_every_stage(tiny_qwen3, caplog, stage, fitted_len):
    """Stage 2 refused a budget that stage 3 ran with (9.7). Now, with max_model_len unset,
    both lower it with a warning (stage 2 into one slot per block the budget holds)."""
    budget = 4 * 16 * 512  # four blocks
    with caplog.at_level("WARNING", logger="folovllm"):
        llm = LLM(str(tiny_qwen3), stage=stage, dtype="float32", kv_cache_memory=budget)
    assert llm.llm_engine.config.max_model_len == fitted_len
    assert f"max_model_len lowered from 1024 to {fitted_len} tokens" in caplog.text
    out = llm.generate([[5, 6]], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == fitted_len - 2  # ran to max_model_len
    for stage_ in (2, 3):  # smaller than one block: refused at every stage
        with pytest.raises(ValueError, match=r"kv_cache_memory=100 bytes"):
            LLM(str(tiny_qwen3), stage=stage_, dtype="float32", kv_cache_memory=100)


def test_chat_message_without_content(llm):
    for conversation in ([{"role": "user"}], [{"role": "user", "content": 5}], ["hi"]):
        with pytest.raises(ValueError, match=r"chat message 0 must be a dict with a string 'role' "
                                             r"and a string 'content'"):
            llm.chat(conversation, use_tqdm=False)
    with pytest.raises(ValueError, match=r"a conversation must be a non-empty list"):
        llm.chat([[]], use_tqdm=False)


# 9.8
def test_vllm_prompt_forms(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    text = llm.generate("the engine", greedy, use_tqdm=False)[0]
    ids = llm.generate([text.prompt_token_ids], greedy, use_tqdm=False)[0]
    outs = llm.generate([{"prompt": "the engine"}, {"prompt_token_ids": text.prompt_token_ids}],
                        greedy, use_tqdm=False)
    assert outs[0].prompt == "the engine" and outs[1].prompt is None
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == text.outputs[0].token_ids
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    one = llm.generate({"prompt": "the engine"}, greedy, use_tqdm=False)  # one prompt, not a list
    assert one[0].outputs[0].token_ids == text.outputs[0].token_ids


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"text": "hi"}, r"prompt dict must have exactly one key, 'prompt' \(a TextPrompt\) or "
                         r"'prompt_token_ids' \(a TokensPrompt\); got keys \['text'\]"),
        ({"prompt": "hi", "prompt_token_ids": [1]}, r"prompt dict must have exactly one key"),
        ({"prompt": [1, 2]}, r"prompt\['prompt'\] must be a string, got list"),
        ({"prompt_token_ids": "hi"}, r"prompt\['prompt_token_ids'\] must be a list of token ids, got str"),
        ({"prompt_token_ids": [1, 512]}, r"prompt token ids must be integers in \[0, 512\)"),
        ({"prompt": ""}, r"prompt must be a non-empty string"),
    ],
)
def test_bad_prompt_dicts(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


# -- property: every request is refused at add time, or runs to a normal finish ---------------

_VALID = {
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 512),
    "min_p": st.floats(0, 1),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "repetition_penalty": st.floats(0.01, 100),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "max_tokens": st.one_of(st.none(), st.integers(1, 12)),
    "min_tokens": st.integers(0, 3),
    "stop": st.one_of(st.none(), st.sampled_from(["e", " the", "长", ["s", "t"]])),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, 511), max_size=3),
                                st.just([np.int64(7)])),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
}
_INVALID = {
    "n": st.sampled_from([0, -1, 2.0, "2"]),
    "temperature": st.sampled_from([-1.0, float("nan"), float("inf"), "1"]),
    "top_p": st.sampled_from([0.0, 1.5, float("nan")]),
    "top_k": st.sampled_from([-2, 513, 2**63, 1.5]),
    "min_p": st.sampled_from([-0.1, 1.5]),
    "seed": st.sampled_from([-1, 2**64, "7", 1.5]),
    "repetition_penalty": st.sampled_from([0.0, 1e-300, 1e300, -1.0]),
    "presence_penalty": st.sampled_from([-3.0, 2.5]),
    "frequency_penalty": st.sampled_from([3.0, float("inf")]),
    "max_tokens": st.sampled_from([0, -1, 2.5]),
    "min_tokens": st.sampled_from([-1, 20]),
    "stop": st.sampled_from(["", 5, ["a", ""], [None]]),
    "stop_token_ids": st.sampled_from([5, [-1], [512], [10**9], ["1"]]),
    "ignore_eos": st.sampled_from(["no", None]),
    "skip_special_tokens": st.sampled_from([1, "yes"]),
}
# Half the requests have only valid fields (so many run); the others may have any value.
_FIELDS = st.one_of(
    st.fixed_dictionaries({}, optional=_VALID),
    st.fixed_dictionaries({}, optional={k: st.one_of(v, _INVALID[k]) for k, v in _VALID.items()}),
)
_PROMPTS = st.one_of(
    st.lists(st.integers(0, 511), min_size=1, max_size=64),
    st.text(min_size=1, max_size=60),
    st.builds(lambda t: {"prompt": t}, st.text(min_size=1, max_size=20)),
    st.builds(lambda ids: {"prompt_token_ids": ids}, st.lists(st.integers(0, 511), min_size=1, max_size=20)),
    st.lists(st.integers(-2, 520), max_size=70),  # ids out of range, or too many
    st.text(max_size=300),  # empty, or more tokens than max_model_len
    st.sampled_from([None, 3.5, {"text": "hi"}, {"prompt": 1}, [1.0, 2.0], [True]]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The repros of issue 9, always tried first:
@example(prompts=["the engine"], kwargs=[dict(stop_token_ids=[10**9], min_tokens=1)])
@example(prompts=["the engine", [1, 2]], kwargs=[dict(top_k=2**63), dict(seed=2**64)])
@example(prompts=[[5, 6, 7]], kwargs=[dict(n=2, seed=2**64 - 1, max_tokens=3)])
@example(prompts=[[5, 6], {"prompt": "x"}], kwargs=[dict(stop=5), dict(repetition_penalty=1e-300)])
@given(prompts=st.lists(_PROMPTS, min_size=1, max_size=3),
       kwargs=st.lists(_FIELDS, min_size=1, max_size=3))
def test_every_request_is_refused_when_added_or_finishes_normally(paged, ref_greedy, prompts, kwargs):
    """Requests with valid and invalid values, types and sizes, several at a time on a KV
    cache of 16 blocks: each one either raises a ValueError when it is added, whose message
    names the field and what is allowed, or runs to "stop" / "length"; afterwards every block
    is back and the engine's next greedy request equals HF's."""
    engine = paged.llm_engine
    added = {}
    for i, (prompt, fields) in enumerate(zip(prompts, kwargs)):
        try:
            params = SamplingParams(**fields)
            engine.add_request(f"r{i}", prompt, params)
        except ValueError as e:
            message = str(e)
            named = message.split()[0].split("[")[0].strip("(")
            assert named in {*fields, "prompt"}, message
            assert "must" in message or "more than" in message, message  # what is allowed
            continue
        added[f"r{i}"] = params
        event("added")
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == set(added)
    for rid, params in added.items():
        assert len(finished[rid].outputs) == params.n
        for completion in finished[rid].outputs:
            assert completion.finish_reason in ("stop", "length"), completion
            assert all(0 <= t < engine.vocab_size for t in completion.token_ids)
            if params.max_tokens is not None:
                assert len(completion.token_ids) <= params.max_tokens
    assert_empty_and_serving(paged, ref_greedy)


@pytest.mark.parametrize("stage", [2, 3, 6])
def test_abort_frees_blocks_allocated_to_a_request_still_waiting(tiny_qwen3, stage):
    """Ctrl-C can land in schedule_waiting between allocate_slots and moving the request to
    `running`; LLM.generate's cleanup then aborts a request that is waiting but holds KV."""
    llm = LLM(str(tiny_qwen3), stage=stage, dtype="float32", max_model_len=64, max_num_seqs=2)
    engine = llm.llm_engine
    manager = engine.kv_cache_manager
    before = manager.num_reserved_tokens
    engine.add_request("w", [5, 6, 7, 8], SamplingParams(max_tokens=2))
    request = engine.scheduler.waiting[0]
    assert manager.allocate_slots(request, request.num_tokens)  # the interrupted admission
    assert manager.num_reserved_tokens > before
    engine.abort_request("w")
    assert manager.num_reserved_tokens == before
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and manager.num_reserved_tokens == before


def test_the_header_check_leaves_nn_module_and_memory_as_they_were(tiny_qwen3):
    """The check builds a model whose parameters go to the meta device by patching
    nn.Module.register_parameter for its duration: afterwards a module built anywhere has real
    parameters again, and the check imported none of torch's symbolic-shape machinery (sympy:
    ~150 MiB, which `with torch.device("meta")` pulled in through torch.arange)."""
    import sys

    from folovllm.model_executor.model_loader import check_checkpoint, load_hf_config
    from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    had_sympy = "sympy" in sys.modules
    check_checkpoint(Qwen3ForCausalLM, load_hf_config(tiny_qwen3), tiny_qwen3, torch.float32)
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    assert had_sympy or "sympy" not in sys.modules
