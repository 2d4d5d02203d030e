"""The `folovllm` command: generate, demo, and clear errors (exit code 2) on bad input."""

from __future__ import annotations

import pytest

from folovllm.entrypoints.cli import _parse_bytes, main
from folovllm.config import LATEST_STAGE, STAGE_NAMES


def test_generate_prints_text_finish_reason_and_stats(tiny_qwen3, capsys):
    rc = main(["generate", "--model", str(tiny_qwen3), "--dtype", "float32", "--prompt", "the engine",
               "--temperature", "0", "--max-tokens", "5", "--stage", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "=== prompt: 'the engine'" in out
    assert "(5 tokens, finish_reason=length" in out
    assert "num_forward_passes=5" in out  # one prefill + four decodes


def test_generate_bad_input_exits_2_with_the_reason(tiny_qwen3, capsys):
    rc = main(["generate", "--model", str(tiny_qwen3), "--prompt", "x", "--top-p", "1.5"])
    assert rc == 2
    assert "top_p must be in (0, 1], got 1.5" in capsys.readouterr().err
    rc = main(["generate", "--model", str(tiny_qwen3)])
    assert rc == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    rc = main(["generate", "--model", "/no/such/folder", "--prompt", "x"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_prints_one_row_per_built_stage(tiny_qwen3, capsys):
    rc = main(["demo", "--model", str(tiny_qwen3), "--dtype", "float32", "--num-requests", "6",
               "--max-model-len", "256"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| 0")]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"{s:02d} {STAGE_NAMES[s]}" for s in range(1, LATEST_STAGE + 1)
    ]


def test_parse_bytes():
    assert _parse_bytes("2GiB") == 2 * 2**30
    assert _parse_bytes("512MiB") == 512 * 2**20
    assert _parse_bytes("1000") == 1000
    with pytest.raises(Exception, match="expected a size"):
        _parse_bytes("lots")
