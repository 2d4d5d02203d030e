"""The labs (`labs/0N/`, `tests/labs_plugin.py`): every shipped starter fails its stage's tests
with the one clear line, and the same tests pass on the engine's code: without the switch (the
reference), and with the engine's own functions handed in through the switch (so the switch
itself breaks nothing a correct lab would pass).

The stage tests run in subprocesses (the switch is read once, when pytest starts), on a fast
subset of each stage that reaches every function of its lab (`FAST_TESTS`; the engine-through-
the-switch run checks that they do): one pytest process for all the starters, one for the
engine through the switch, one without it, started together. The starters and their pages are
checked here too: each replaces engine functions that exist, with the engine's signature and
docstring, and each page has the parts a lab page promises and is on the site.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import pytest

from tests.labs_plugin import (
    ENV,
    ROOT,
    LabError,
    LabGrader,
    LabTimeout,
    Target,
    check_signature,
    install,
    load_lab,
    not_implemented_line,
)

STAGES = sorted(p.name for p in (ROOT / "stages").iterdir() if p.is_dir() and p.name[:1].isdigit())
LABS = sorted(p.parent.name for p in (ROOT / "labs").glob("*/starter.py"))

# Per lab, tests of its stage that reach its functions and need no HF reference (fast): the
# starter must fail each of them with the lab's line, the engine must pass them.
FAST_TESTS = {
    "01": ["stages/01/test_01_generate.py::test_kv_reservation_follows_max_tokens_not_output"],
    "02": ["stages/02/test_02_continuous_batching.py::test_fcfs_order"],
    "03": ["stages/03/test_03_paged_kv.py::test_pool_refuses_double_free_and_over_allocation",
           "stages/03/test_03_paged_kv.py::test_a_prompt_as_long_as_the_whole_cache_is_admitted"],
    "04": ["stages/04/test_04_backends.py::test_torch_flash_any_tile_size[8-16]",
           "stages/04/test_04_e2e.py::test_metadata_is_built_once_per_step[torch_flash]"],  # an engine
    "05": ["stages/05/test_05_chunked_prefill.py::test_decodes_go_before_an_older_half_computed_prompt"],
    "06": ["stages/06/test_06_prefix_caching.py::test_pool_lookup_checks_the_stored_tokens",
           "stages/06/test_06_prefix_caching.py::test_eviction_is_least_recently_freed_first_tail_before_head"],
    "07": ["stages/07/test_07_gptq.py::test_pack_unpack_round_trip_and_bit_layout[4]",
           "stages/07/test_07_gptq.py::test_dequantize_follows_the_formula_with_act_order",
           "stages/07/test_07_gptq.py::test_gptq_beats_round_to_nearest_on_layer_output_error[asym-act_order]"],
    "08": [f"stages/08/test_08_tensor_parallel.py::{name}" for name in (
        "test_merged_column_then_row_parallel_sums_to_the_unsplit_mlp",
        "test_column_parallel_loads_whole_and_fused_tensors_and_checks_shapes")],
    "09": ["stages/09/test_09_speculative_decoding.py::test_ngram_lookup_examples",
           "stages/09/test_09_speculative_decoding.py::test_rejection_sample_keeps_the_target_distribution[1.0]"],
    "10": ["stages/10/test_10_structured_outputs.py::test_the_five_token_vocabulary_by_hand",
           "stages/10/test_10_structured_outputs.py::test_pack_bits_by_hand"],
    "11": ["stages/11/test_11_multi_lora.py::test_batched_op_matches_per_token_loop"],
}


def test_one_lab_per_stage() -> None:
    assert len(LABS) >= 8
    assert LABS == STAGES, f"stages without a lab: {sorted(set(STAGES) - set(LABS))}"
    assert sorted(FAST_TESTS) == LABS


@pytest.mark.parametrize("lab", LABS)
def test_starter_replaces_engine_functions_with_their_signature_and_docstring(lab: str) -> None:
    loaded = load_lab(lab)
    assert loaded is not None
    for target, function in loaded.replacements():
        engine = target.engine_function()  # exists, and is defined where REPLACES says
        assert function.__module__ == loaded.module.__name__, f"{target.name} is imported, not written"
        assert str(inspect.signature(function)) == str(inspect.signature(engine)), target
        if engine.__doc__:
            assert inspect.getdoc(function) == inspect.getdoc(engine), f"{target}: the docstring differs"
        # The body is the learner's: the starter gives TODOs and the one clear line, no solution.
        source = inspect.getsource(function)
        assert "# TODO" in source and f'raise NotImplementedError("{not_implemented_line(lab)}")' in source


@pytest.mark.parametrize("lab", LABS)
def test_lab_page_has_what_a_lab_promises(lab: str) -> None:
    text = (ROOT / "labs" / lab / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == ["What to implement", "Run it", "What the tests check", "Hints", "The reference solution"]
    assert f"FOLOVLLM_LAB=starter pytest stages/{lab}" in text
    assert [int(n) for n in re.findall(r"<summary>Hint (\d)</summary>", text)] == [1, 2, 3]
    for target, _ in load_lab(lab).replacements():  # type: ignore[union-attr]
        assert target.module.replace(".", "/") + ".py" in text, f"the page does not say where {target} is"
    # Shown on the site too, from this one file, and linked from its stage page's exercises.
    pages = [p for p in (ROOT / "docs" / "labs").glob(f"{lab}-*.md")
             if f'--8<-- "labs/{lab}/README.md"' in p.read_text(encoding="utf-8")]
    assert len(pages) == 1, f"docs/labs/ has no page that includes labs/{lab}/README.md"
    assert f"labs/{pages[0].name}" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    [stage_page] = [p for p in (ROOT / "docs" / "stages").glob(f"{lab}-*.md") if "## Exercises" in p.read_text()]
    stage_text = stage_page.read_text(encoding="utf-8")
    exercises = stage_text[stage_text.index("## Exercises"):stage_text.index("## Interview")]
    assert f"(../labs/{pages[0].name})" in exercises, f"{stage_page.name}: its Exercises do not link the lab"


def test_install_reaches_the_class_and_every_module_that_imported_the_function() -> None:
    from folovllm.core import block_hash, prefix_cache, scheduler

    originals = block_hash.hash_block_tokens, scheduler.Scheduler.schedule_waiting
    mp = pytest.MonkeyPatch()
    install(mp, Target.parse("folovllm.core.block_hash:hash_block_tokens"), fake_hash := lambda *a: None)
    install(mp, Target.parse("folovllm.core.scheduler:Scheduler.schedule_waiting"), fake_admit := lambda *a: 0)
    try:
        assert block_hash.hash_block_tokens is fake_hash
        assert prefix_cache.hash_block_tokens is fake_hash  # `from block_hash import ...` too
        assert scheduler.Scheduler.schedule_waiting is fake_admit
    finally:
        mp.undo()
    assert (block_hash.hash_block_tokens, scheduler.Scheduler.schedule_waiting) == originals
    assert prefix_cache.hash_block_tokens is originals[0]


def test_a_lab_function_with_another_signature_is_refused_in_one_line() -> None:
    def schedule_waiting(self, output):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    with pytest.raises(LabError, match=r"schedule_waiting\(self, output\) must take what the engine's "
                                       r"Scheduler.schedule_waiting\(self, output, budget\) takes"):
        check_signature(Target.parse("folovllm.core.scheduler:Scheduler.schedule_waiting"), schedule_waiting, "x")


def test_a_lab_loop_that_never_ends_is_stopped() -> None:
    """What the switch arms around each lab test: SIGALRM raises past `except Exception`."""
    grader = LabGrader("starter", timeout_s=0.2)
    previous = signal.signal(signal.SIGALRM, grader._time_out)
    signal.setitimer(signal.ITIMER_REAL, grader.timeout_s)
    deadline = time.monotonic() + 10
    try:
        with pytest.raises(LabTimeout, match="more than 0.2 s"):
            while time.monotonic() < deadline:
                try:
                    sum(range(10_000))  # a step
                except Exception:  # the engine's fault guard: the timeout must get past it
                    pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class StageRun:
    """One pytest process over every lab's FAST_TESTS, started at once (the three runs share the
    machine's cores instead of taking turns); `results()` waits for it."""

    def __init__(self, folder: Path, env_lab: dict[str, str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in (ENV, "FOLOVLLM_LAB_DIR")}
        env.update(env_lab, PYTHONPATH=str(ROOT))
        self.report = folder / "report.xml"
        self.tests = [t for lab in LABS for t in FAST_TESTS[lab]]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={self.report}",
             *self.tests],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def results(self) -> dict[str, tuple[str, str]]:
        """{node id: (outcome, message)}, message being the failure's one line."""
        output, _ = self.proc.communicate(timeout=600)
        assert self.report.is_file(), output[-4000:]
        results = {}
        for case in ET.parse(self.report).iter("testcase"):
            node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped") is not None
            outcome = "failed" if problem is not None else "skipped" if skipped else "passed"
            results[node] = (outcome, problem.get("message", "") if problem is not None else "")
        assert sorted(results) == sorted(self.tests), (sorted(results), output[-4000:])
        return results


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, StageRun]]:
    """The starters; the engine through the switch (lab files that hand back the engine's own
    functions, noting which were called); the engine without the switch (the reference)."""
    root = tmp_path_factory.mktemp("labs")
    engine_labs, called = root / "engine_labs", root / "called.txt"
    for lab in LABS:
        (engine_labs / lab).mkdir(parents=True)
        (engine_labs / lab / "engine.py").write_text(ENGINE_LAB.format(
            replaces=load_lab(lab).module.REPLACES, called=str(called), lab=lab))  # type: ignore[union-attr]
    for name in ("starter", "engine", "reference"):
        (root / name).mkdir()
    runs = {
        "starter": StageRun(root / "starter", {ENV: "starter"}),
        "engine": StageRun(root / "engine", {ENV: "engine", "FOLOVLLM_LAB_DIR": str(engine_labs)}),
        "reference": StageRun(root / "reference", {}),
    }
    runs["engine"].called = called  # type: ignore[attr-defined]
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def test_every_starter_fails_with_the_clear_line(stage_runs: dict[str, StageRun]) -> None:
    results = stage_runs["starter"].results()
    for lab in LABS:
        for test in FAST_TESTS[lab]:
            outcome, message = results[test]
            assert (outcome, message) == ("failed", not_implemented_line(lab)), (test, outcome, message)


def test_the_engine_passes_the_same_tests(stage_runs: dict[str, StageRun]) -> None:
    results = stage_runs["reference"].results()
    assert {t: r for t, r in results.items() if r[0] != "passed"} == {}


def test_the_engine_passes_them_through_the_switch_too(stage_runs: dict[str, StageRun]) -> None:
    """Graded through the switch (loaded, signature-checked, wrapped, installed, undone), the
    engine's own functions pass, as a correct lab must; and the fast tests call every function
    of every lab."""
    run = stage_runs["engine"]
    results = run.results()
    assert {t: r for t, r in results.items() if r[0] != "passed"} == {}
    want = {f"{lab} {name}" for lab in LABS for name in load_lab(lab).module.REPLACES}  # type: ignore[union-attr]
    assert set(run.called.read_text().split("\n")) - {""} == want  # type: ignore[attr-defined]


# A lab file that hands back the engine's functions, noting (at exit) which of them were called.
ENGINE_LAB = """\
import atexit, functools
from tests.labs_plugin import Target

REPLACES = {replaces!r}
_called = set()


def _noting(name, function):
    @functools.wraps(function)
    def noted(*args, **kwargs):
        _called.add(name)
        return function(*args, **kwargs)
    return noted


for _name, _spec in REPLACES.items():
    globals()[_name] = _noting(_name, Target.parse(_spec).engine_function())
atexit.register(lambda: open({called!r}, "a").write("".join(f"{lab} {{n}}\\n" for n in sorted(_called))))
"""
