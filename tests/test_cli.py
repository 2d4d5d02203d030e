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


def test_custom_ops_flag_reaches_the_engine(tiny_qwen3, monkeypatch):
    seen = {}
    import folovllm

    class Spy(folovllm.LLM):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(folovllm, "LLM", Spy)
    rc = main(["generate", "--model", str(tiny_qwen3), "--dtype", "float32", "--prompt", "x",
               "--max-tokens", "2", "--custom-ops", "none"])
    assert rc == 0 and seen["custom_ops"] == "none"
    with pytest.raises(SystemExit):  # argparse refuses a value outside auto | all | none
        main(["generate", "--model", str(tiny_qwen3), "--prompt", "x", "--custom-ops", "fast"])


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


def test_serve_with_a_missing_model_exits_2(capsys):
    assert main(["serve", "/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_answers_then_sigterm_lets_the_open_stream_finish_and_exits_0(tiny_qwen3):
    """`folovllm serve` as a real process: it answers the openai client; SIGTERM while a stream is
    open lets that stream run to its end, then the process exits with status 0."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "folovllm.entrypoints.cli", "serve", str(tiny_qwen3), "--stage", "3",
           "--dtype", "float32", "--max-model-len", "256", "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model=str(tiny_qwen3), prompt="the engine", max_tokens=200,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"  # all 200 tokens, not cut off
        assert proc.wait(timeout=30) == 0
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive(tiny_qwen3, capsys, threads):
    """`--threads -1` printed a traceback and `--threads 0` was ignored (issue 9.7)."""
    rc = main(["generate", "--model", str(tiny_qwen3), "--prompt", "x", "--threads", threads])
    assert rc == 2
    assert f"folovllm: error: --threads must be a positive integer, got {threads}" in capsys.readouterr().err


def test_config_json_that_is_a_list_is_an_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[]")
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    assert rc == 2
    assert "config.json must hold a JSON object, got a list" in capsys.readouterr().err
