"""`folovllm train-pair` (folovllm/tools/train_pair.py), on a tiny run of the same script.

The full run takes minutes; these tests run its `TINY_RECIPE` (a dozen stdlib files, two tiny
models, a few steps) and check what the full run relies on: the checkpoints it writes load in
folovllm and in HF transformers with the same greedy tokens, the draft shares the target's
tokenizer, the held-out files are never trained on, and the cache is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from folovllm.tools import train_pair as tp
from tests.helpers import hf_greedy_ignore_eos, num_distinct


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tp.train_pair(tmp_path_factory.mktemp("pair") / "trained-pair", tp.TINY_RECIPE, progress=False)


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["def __init__(self, name", "import os\nimport sys\n\n", "    return self._",
             "class Error(Exception):\n    ", "for i in range(len("]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("which", ["target", "draft"])
def test_trained_checkpoint_greedy_equals_hf(tiny_pair: tuple[Path, Path], which: str) -> None:
    """Each trained folder is a normal HF checkpoint: folovllm's greedy tokens equal HF's."""
    import transformers

    from folovllm import LLM, SamplingParams

    path = dict(zip(("target", "draft"), tiny_pair))[which]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(tokenizer)
    expected = [hf_greedy_ignore_eos(hf, p, 16) for p in prompts]
    assert num_distinct(expected) >= 20, "the tiny run's greedy output is too repetitive to test with"
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_pair_shares_one_tokenizer_and_reports_losses(tiny_pair: tuple[Path, Path]) -> None:
    target, draft = tiny_pair
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    t_cfg, d_cfg = (json.loads((p / "config.json").read_text()) for p in tiny_pair)
    assert t_cfg["vocab_size"] == d_cfg["vocab_size"] == tp.TINY_RECIPE.vocab_size
    assert d_cfg["num_hidden_layers"] < t_cfg["num_hidden_layers"]
    assert (target / "generation_config.json").is_file()
    report = json.loads((target.parent / "train_pair.json").read_text())
    for name in ("target", "draft"):
        assert report[name]["held_out_loss"] > 0 and report[name]["steps"] >= 1
    # A second call with the same recipe finds the cache instead of training again.
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert tp.train_pair(target.parent, tp.TINY_RECIPE, progress=False) == tiny_pair
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_held_out_split_is_disjoint_and_fixed() -> None:
    files = tp.stdlib_files(max_files=45)
    assert files == tp.stdlib_files(max_files=45)  # the same order every run
    train, held = tp.split_corpus(files, held_out_every=20)
    assert len(held) == 3 and len(train) == 42  # files 0, 20, 40
    assert all(h not in train for h in held if h.strip())  # (empty __init__.py files repeat)


def test_cli_refuses_bad_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from folovllm.entrypoints.cli import main

    assert main(["train-pair", "--tiny", "--out", str(tmp_path), "--target-steps", "0"]) == 2
    assert "--target-steps must be a positive integer" in capsys.readouterr().err


def test_demo_trained_uses_the_pair_and_shows_text(tiny_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`folovllm demo --trained` runs the trained target (built by train_pair, here the tiny
    run's) and prints its greedy completion of the demo's Python prompt."""
    import transformers

    from folovllm.entrypoints import cli

    monkeypatch.setattr(tp, "train_pair", lambda *a, **k: tiny_pair)
    assert cli.main(["demo", "--trained", "--stages", "6", "--num-requests", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"model: {tiny_pair[0]}" in out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_pair[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    ids = tokenizer.encode(cli.DEMO_CODE_PROMPT, add_special_tokens=False)
    tokens = hf_greedy_ignore_eos(hf, ids, 96)
    if tokenizer.eos_token_id in tokens:  # the demo stops there (and prints no special token)
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    expected = tokenizer.decode(tokens)
    assert cli.DEMO_CODE_PROMPT + expected in out


def test_distill_loss_is_the_kl_divergence_from_the_target() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    for t in (1.0, 2.0):
        p, q = (teacher / t).softmax(-1), (student / t).softmax(-1)
        expected = (p * (p.log() - q.log())).sum(-1).mean() * t * t  # per position, averaged
        assert torch.allclose(tp.distill_loss(student, teacher, t), expected, atol=1e-6)
    assert float(tp.distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_distilled_draft_moves_toward_the_target(tiny_pair: tuple[Path, Path]) -> None:
    """`distill_draft` trains only the draft, towards the target: its held-out KL to the target
    falls; the target's and the plain draft's files are untouched; the result is cached."""
    target, draft = tiny_pair
    before = {p: p.stat().st_mtime_ns for p in (target / "model.safetensors", draft / "model.safetensors")}
    recipe = tp.DistillRecipe(steps=6, lr=1e-2, warmup_steps=1)
    out = tp.distill_draft(target.parent, recipe, progress=False)
    report = json.loads((out / "distill.json").read_text())
    assert report["after"]["held_out_kl"] < report["before"]["held_out_kl"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((out / "config.json").read_text())["vocab_size"] == tp.TINY_RECIPE.vocab_size
    assert (out / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert tp.distill_draft(target.parent, recipe, progress=False) == out  # cached
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="no trained pair"):
        tp.distill_draft(target.parent / "nowhere", recipe, progress=False)
