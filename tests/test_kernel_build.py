"""The kernel build can never hang a start (`folovllm/_custom_ops.py:build_extension`).

What used to happen: the first start compiled the CPU kernels under torch's lock file; a start
killed during that minute (Ctrl-C, a supervisor's SIGTERM, the OOM killer, a CI timeout) left the
file behind and every later start waited on it forever, silently. Two checkouts shared one build
folder and rebuilt each other.

Each test here builds a tiny Python extension (one C function, compiled in about a second)
through the same `build_extension` the kernels use, in separate processes, as two starts would.
A compiler wrapper (`$CXX`) logs every compilation and can be made slow, so a test can kill a
build while it compiles and count how many compilations each scenario costs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from folovllm import _custom_ops

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and _custom_ops.ops_available()),
    reason="needs a C++ compiler and ninja (the CPU kernels cannot be built here)",
)

EXTENSION = textwrap.dedent("""\
    // A Python module with one function, answer(), returning ANSWER.
    #include <Python.h>
    #define STR2(x) #x
    #define STR(x) STR2(x)
    #define CAT2(a, b) a##b
    #define CAT(a, b) CAT2(a, b)
    static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(ANSWER); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
    PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
""")

START = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from folovllm._custom_ops import build_extension
    module = build_extension("tiny", [Path(sys.argv[1])], root=Path(sys.argv[2]))
    print("answer", module.answer(), flush=True)
""")


def source_tree(folder: Path, answer: int) -> Path:
    """A checkout of the tiny extension in `folder` whose answer() returns `answer`."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "tiny.cpp"
    source.write_text(EXTENSION.replace("ANSWER", str(answer)))
    return source


@pytest.fixture
def compiler(tmp_path: Path) -> dict[str, str]:
    """The environment of a start whose compiler logs each compilation to `$LOG` (touching
    `$STARTED` first) and sleeps `$SLOW` seconds before compiling."""
    wrapper = tmp_path / "cxx"
    wrapper.write_text(textwrap.dedent("""\
        #!/bin/sh
        case " $* " in *" -c "*)
            echo compile >> "$LOG"; touch "$STARTED"; sleep "${SLOW:-0}";;
        esac
        exec c++ "$@"
    """))
    wrapper.chmod(0o755)
    return dict(os.environ, CXX=str(wrapper), LOG=str(tmp_path / "compilations.log"),
                STARTED=str(tmp_path / "started"), SLOW="0", FOLOVLLM_CONFIGURE_LOGGING="1",
                FOLOVLLM_KERNEL_BUILD_TIMEOUT="120")


def compilations(env: dict[str, str]) -> int:
    log = Path(env["LOG"])
    return len(log.read_text().splitlines()) if log.exists() else 0


def start(source: Path, root: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", START, str(source), str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the start did not finish within {timeout} s (it hangs):\n{err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    return out, err


def test_a_start_killed_while_compiling_does_not_block_the_next(tmp_path, compiler):
    source, root = source_tree(tmp_path / "checkout", 42), tmp_path / "cache"
    # The first start compiles slowly and is killed mid-compilation: SIGKILL, so nothing of it
    # can clean up, and its compiler lives on as an orphan in the build folder it was given.
    first = start(source, root, dict(compiler, SLOW="60"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(compiler["STARTED"]).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        leftovers = list(root.glob("tiny_*.build-*"))
        assert leftovers and (leftovers[0] / "lock").exists()  # torch's lock file, left behind

        # The next start builds (its own folder, not the orphan's) and loads, within seconds.
        out, err = finish(start(source, root, compiler), timeout=120)
        assert "answer 42" in out
        assert "compiling tiny" in err and "compiled tiny in" in err  # said at the default level
        assert compilations(compiler) == 2  # the killed one and the one that finished
        folders = [p for p in root.iterdir() if p.is_dir()]  # the killed build's folder is gone
        assert len(folders) == 1 and (folders[0] / _custom_ops.DONE_FILE).exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the orphaned compiler


def test_two_starts_at_once_both_succeed_and_compile_once(tmp_path, compiler):
    source, root = source_tree(tmp_path / "checkout", 7), tmp_path / "cache"
    env = dict(compiler, SLOW="2")
    procs = [start(source, root, env) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert all("answer 7" in out for out, _ in results)
    assert compilations(compiler) == 1
    assert sum("waiting for another process" in err for _, err in results) == 1


def test_checkouts_sharing_one_cache_never_rebuild_each_other(tmp_path, compiler):
    root = tmp_path / "cache"
    a, b = source_tree(tmp_path / "a", 1), source_tree(tmp_path / "b", 2)
    a_copy = source_tree(tmp_path / "a-copy", 1)  # another clone of the same sources
    for source, answer, compiled in [(a, 1, 1), (b, 2, 2), (a, 1, 2), (a_copy, 1, 2)]:
        out, _ = finish(start(source, root, compiler))
        assert f"answer {answer}" in out
        assert compilations(compiler) == compiled
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2


def test_the_build_key_follows_sources_flags_and_the_target(tmp_path, monkeypatch):
    source = source_tree(tmp_path / "a", 1)
    key = _custom_ops.build_key([source], [], ["-O3"], [])
    assert key == _custom_ops.build_key([source_tree(tmp_path / "elsewhere", 1)], [], ["-O3"], [])
    assert key != _custom_ops.build_key([source], [], ["-O2"], [])
    header = tmp_path / "a" / "ops.h"
    header.write_text("// a header the sources include\n")
    assert key != _custom_ops.build_key([source], [header], ["-O3"], [])
    monkeypatch.setenv("FOLOVLLM_CPU_ISA", "avx2")
    assert "-march=x86-64-v3" in _custom_ops.kernel_cflags()
    monkeypatch.setenv("FOLOVLLM_CPU_ISA", "native")
    assert "-march=native" in _custom_ops.kernel_cflags()
    monkeypatch.setenv("FOLOVLLM_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="FOLOVLLM_CPU_ISA must be one of native, avx2"):
        _custom_ops.kernel_cflags()


def test_build_kernels_command_says_where_the_kernels_are(capsys):
    from folovllm.entrypoints.cli import main

    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert "C++ kernels" in out and "ready in" in out
    folder = out.split("ready in", 1)[1].split(": ", 1)[1].split(" under ")[0]
    assert (_custom_ops.envs.kernel_cache_root() / folder / _custom_ops.DONE_FILE).exists()


def test_the_avx2_build_is_refused_on_a_cpu_without_avx2(monkeypatch):
    """A binary built for x86-64-v3 would die of an illegal instruction on an older CPU: the
    switch is refused, naming the missing features, and "auto" then runs the torch code."""
    monkeypatch.setenv("FOLOVLLM_CPU_ISA", "avx2")
    monkeypatch.setattr(_custom_ops.cpu_platform, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(_custom_ops, "_ops", None)
    monkeypatch.setattr(_custom_ops, "_build_error", None)
    with pytest.raises(RuntimeError, match="does not report avx2, fma"):
        _custom_ops.load_ops()
