"""The live trace page (`folovllm trace --serve`), loaded in a real headless browser while the
engine serves a workload. Skipped where no Chromium is installed (CI installs Debian's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from folovllm.config import EngineConfig, LATEST_STAGE
from folovllm.engine.llm_engine import LLMEngine
from folovllm.trace.recorder import LANE_STATES
from folovllm.trace.page import LiveView, make_server, run_workload_forever
from folovllm.trace.workloads import WORKLOADS, engine_config

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture
def live_page(tiny_qwen3):
    """The page's server and an engine replaying 'mixed' at stage 5 in a thread; both stopped."""
    workload = WORKLOADS["mixed"]
    engine = LLMEngine(str(tiny_qwen3), engine_config(str(tiny_qwen3), 5, workload, dtype="float32"))
    view = LiveView.follow(engine)
    server = make_server(view)
    stop = threading.Event()
    threads = [threading.Thread(target=server.serve_forever, daemon=True),
               threading.Thread(target=run_workload_forever, args=(engine, workload, 0.01, stop))]
    for t in threads:
        t.start()
    try:
        yield engine, view, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        threads[1].join(timeout=30)
        server.shutdown()
        server.server_close()
    assert not threads[1].is_alive()


def test_page_and_state_endpoint(live_page):
    _, _, url = live_page
    assert 'id="timeline"' in urllib.request.urlopen(f"{url}/", timeout=10).read().decode()
    state = json.loads(urllib.request.urlopen(f"{url}/state", timeout=10).read())
    assert {"step", "running", "waiting", "kv", "timeline"} <= state.keys()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{url}/nope", timeout=10)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_page_in_a_headless_browser_follows_the_engine(live_page, tmp_path):
    engine, view, url = live_page
    steps_before = view.tracer.steps[-1].step if view.tracer.steps else 0
    # --virtual-time-budget lets the page's polling timers run before the DOM is dumped.
    dom = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
         "--virtual-time-budget=2000", "--dump-dom", f"{url}/"],
        capture_output=True, text=True, timeout=120,
    ).stdout.split("<script>")[0]  # the rendered page, not the script's templates

    def number(element_id: str) -> int:
        return int(re.search(rf'id="{element_id}">(\d+)<', dom).group(1))

    assert int(re.search(r'data-updates="(\d+)"', dom).group(1)) >= 2  # it polled and redrew
    assert number("stage") == 5
    assert re.search(r'id="engine">stage 05 chunked prefill, attention \w+', dom)  # describe_engine
    assert number("step") > steps_before  # steps the engine took while the page was open
    assert 0 <= number("kv-used") <= number("kv-total") == engine.kv_cache_manager.kv_cache_config.num_blocks
    running = re.findall(r'<tr class="req" data-id="([^"]+)"', dom)
    assert len(running) == number("num-running")
    lanes = re.findall(r'<div class="lane" data-id="([^"]+)"', dom)
    assert set(running) <= set(lanes)
    states = set(re.findall(r'data-state="([a-z]*)"', dom)) - {""}
    assert "decode" in states and states <= set(LANE_STATES)


def test_cli_serve_runs_until_interrupted(tiny_qwen3):
    """`folovllm trace --serve` as a user runs it: it prints its address, serves the engine's
    state while it steps, and stops cleanly on Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "folovllm.entrypoints.cli", "trace", "--serve", "--model", str(tiny_qwen3),
         "--port", "0", "--step-delay", "0.01", "--workload", "docs"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread's stack
        # Ctrl-C must reach it even when this test runs in a background job of a shell without
        # job control (`bash .ci/run &`), which starts with SIGINT ignored: Python then installs
        # no KeyboardInterrupt handler in the child, and the server would never stop.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    output: list[str] = []
    try:
        line = ""
        while "http://" not in line:
            line = proc.stdout.readline()
            assert line, "the server exited before printing its address"
        url = re.search(r"http://\S+/", line).group(0)
        # Keep reading what it prints, so that it can never block on a full pipe, and so that
        # a failure below can show it.
        threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
        for _ in range(600):  # until the engine has taken its first step (30 s at most)
            state = json.loads(urllib.request.urlopen(f"{url}state", timeout=10).read())
            if state["step"] > 0:
                break
            time.sleep(0.05)
        # the CLI's default is the top of the ladder, and the page says what runs
        assert state["step"] > 0 and state["stage"] == LATEST_STAGE and state["kv"]["total"] > 0
        assert state["engine"].startswith(f"stage {LATEST_STAGE:02d} ")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            time.sleep(0.5)  # let the reader thread take the last lines
            raise AssertionError("still running 30 s after Ctrl-C; it printed:\n" + "".join(output[-50:]))
        assert rc == 0, "".join(output[-50:])


def test_openai_server_mounts_the_page_with_trace(tiny_qwen3):
    """`folovllm serve --trace`: the same page at /trace/, following what clients ask for."""
    from fastapi.testclient import TestClient

    from folovllm.config import EngineConfig
    from folovllm.engine.async_llm import AsyncLLM
    from folovllm.entrypoints.openai.api_server import build_app

    def app(trace: bool):
        config = EngineConfig.for_stage(5, dtype="float32", max_model_len=256, trace=trace)
        return build_app(AsyncLLM(LLMEngine(str(tiny_qwen3), config), "m"), "m")

    with TestClient(app(trace=True)) as client:
        page = client.get("/trace/")
        assert page.status_code == 200 and 'fetch("state"' in page.text  # relative: /trace/state
        body = {"model": "m", "prompt": "the engine", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).status_code == 200
        state = client.get("/trace/state").json()
        assert state["step"] == 5 and state["running"] == [] and state["kv"]["used"] == 0
        (lane,) = state["timeline"]["lanes"]
        assert lane["states"] == ["prefill"] + ["decode"] * 4
    with TestClient(app(trace=False)) as client:
        assert client.get("/trace/").status_code == 404


def test_view_rebuilds_the_running_requests_from_the_records_alone(tiny_qwen3):
    """The view never reads the engine: after every step, its running table (ids in admission
    order, tokens computed, blocks held) is what the scheduler holds, stalled requests included."""
    from folovllm.trace.workloads import replay

    engine = LLMEngine(str(tiny_qwen3), engine_config(str(tiny_qwen3), 3, WORKLOADS["tight-kv"], dtype="float32"))
    view = LiveView.follow(engine)
    seen = {"stalled": 0, "steps": 0}

    def check(_outputs) -> None:
        state = json.loads(view.snapshot)
        manager = engine.kv_cache_manager
        assert state["running"] == [
            {"id": r.request_id, "blocks": len(manager.get_block_table(r)), "computed": r.num_computed_tokens}
            for r in engine.scheduler.running]
        assert state["waiting"] == [r.request_id for r in engine.scheduler.waiting]
        assert state["kv"]["used"] == len({b for r in engine.scheduler.running for b in manager.get_block_table(r)})
        seen["stalled"] += len(engine.last_scheduler_stats.stalled)
        seen["steps"] += 1

    replay(engine, WORKLOADS["tight-kv"], on_step=check)
    assert seen["steps"] == engine.stats.num_forward_passes and seen["stalled"] > 0
