"""The labs switch: `FOLOVLLM_LAB=starter pytest stages/0N` grades `labs/0N/starter.py` with
stage 0N's own tests; without the variable the same tests run the engine's code.

Each lab's starter names the engine functions it stands in for, at its top::

    REPLACES = {"schedule_waiting": "folovllm.core.scheduler:Scheduler.schedule_waiting"}

For every test under `stages/0N/`, and for that test only (setup to teardown, so the session
fixtures the test builds use the learner's code too), this plugin puts the starter's functions
where the engine's were, with `pytest.MonkeyPatch`:

    a method    `Scheduler.schedule_waiting`  set on the class (a staticmethod stays one), so
                every instance, and every subclass that does not override it, calls the lab's
    a function  `hash_block_tokens`           set on its module *and* on every module of the
                repository that imported it by name (`from ... import hash_block_tokens` copies
                the reference: patching the defining module alone would miss those callers)

Nothing in `folovllm/` knows about labs: there is no `if LAB:` in the engine. The price is
that code running in another process (stage 08's tensor-parallel workers, stage 04's and 07's
Triton interpreter runs) still runs the engine's functions; the labs target in-process code.

A starter that still raises `NotImplementedError` fails the test with one line,
`not implemented: see labs/0N/README.md`, and the starter line that raised. On its way out of
the lab's function it becomes a `LabNotImplemented`, raised as `pytest.fail()` raises, past any
`except Exception`: the engine's fault guard (which finishes a failing step's requests with an
error and serves on) would otherwise swallow it, and the test would fail far from the cause, or
wait forever for a token.
Any other error of the learner's code is reported by pytest as usual. A test with a lab in it
that runs past FOLOVLLM_LAB_TIMEOUT seconds (180 unless set; 0: no limit) is stopped, naming the
lab line it was at: a scheduler lab's loop that never ends would otherwise hang the run.

`FOLOVLLM_LAB` names the file: `starter` is `labs/0N/starter.py`; `FOLOVLLM_LAB=mine` runs
`labs/0N/mine.py` (a copy to work in, leaving the starter as shipped). A stage with no such
file runs the engine's code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ROOT / "stages"
ENV = "FOLOVLLM_LAB"
# A test with a lab in it that runs longer than this is stopped (a loop of the lab's that never
# ends: an admission loop that never pops its head, a scheduler that admits nobody).
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "FOLOVLLM_LAB_TIMEOUT", 180.0
# Where the labs are: labs/ of this repository. tests/test_labs.py points it at a folder of lab
# files that hand back the engine's own functions, to show that the switch itself breaks nothing.
LABS = Path(os.environ.get("FOLOVLLM_LAB_DIR") or ROOT / "labs").resolve()


def not_implemented_line(lab: str) -> str:
    """The one line a starter's unfinished function fails a test with (the starter raises it
    too, so the learner sees the same words in both places)."""
    return f"not implemented: see labs/{lab}/README.md"


class LabNotImplemented(pytest.fail.Exception):  # type: ignore[misc,name-defined]
    """A lab function not written yet, on its way to the test. It is what `pytest.fail()`
    raises, a BaseException: the engine's fault guard (`except Exception`: a step that raises
    finishes its requests with an error and the engine serves on) lets it through, so the test
    stops there instead of failing far from the cause or looping while it waits for tokens that
    never come; and pytest, which knows it as a test outcome, keeps a fixture that raised it as
    failed (it would not, for any other BaseException)."""


class LabTimeout(pytest.fail.Exception):  # type: ignore[misc,name-defined]
    """A test with a lab in it ran past FOLOVLLM_LAB_TIMEOUT (raised by SIGALRM in the main
    thread, where pytest runs the test; a test outcome for the same reasons as above)."""


class LabError(Exception):
    """A lab file the switch cannot use (no REPLACES, a name it does not define, a signature that
    differs from the engine's): reported in one line, not as a traceback through this plugin."""


@dataclass(frozen=True)
class Target:
    """An engine function a lab stands in for: "package.module:Name" or "package.module:Class.name"."""

    module: str
    qualname: str

    @classmethod
    def parse(cls, spec: str) -> "Target":
        module, _, qualname = spec.partition(":")
        if not module or not qualname or qualname.count(".") > 1:
            raise LabError(f"a lab target is 'module:function' or 'module:Class.method', got {spec!r}")
        return cls(module, qualname)

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def owner(self) -> Any:
        """The module (a function) or the class (a method) whose attribute is replaced."""
        owner: Any = importlib.import_module(self.module)
        if "." in self.qualname:
            owner = getattr(owner, self.qualname.split(".")[0])
        return owner

    def engine_function(self) -> Callable[..., Any]:
        """The engine's own function, unwrapped from staticmethod/classmethod."""
        owner = self.owner()
        raw = vars(owner).get(self.name)  # defined *here*, not inherited: else the patch misses
        if raw is None:
            raise LabError(f"{self.module}:{self.qualname} does not exist (or is inherited: name the class "
                           "that defines it)")
        return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


@dataclass
class Lab:
    """One lab's file, loaded: which engine functions its functions replace."""

    lab: str  # "02"
    path: Path  # labs/02/starter.py
    module: ModuleType

    def replacements(self) -> list[tuple[Target, Callable[..., Any]]]:
        replaces = getattr(self.module, "REPLACES", None)
        if not isinstance(replaces, dict) or not replaces:
            raise LabError(f"{self.relpath} must define REPLACES = {{function name: 'module:Class.name'}}")
        pairs = []
        for name, spec in replaces.items():
            function = getattr(self.module, name, None)
            if not callable(function):
                raise LabError(f"{self.relpath}: REPLACES names {name!r}, which it does not define")
            pairs.append((Target.parse(spec), function))
        return pairs

    @property
    def relpath(self) -> str:
        return str(self.path.relative_to(ROOT)) if self.path.is_relative_to(ROOT) else str(self.path)


def lab_of(path: Path) -> Optional[str]:
    """"02" for a test file under stages/02/, None outside stages/."""
    try:
        parts = Path(path).resolve().relative_to(STAGES).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else None


def load_lab(lab: str, variant: str = "starter") -> Optional[Lab]:
    """labs/<lab>/<variant>.py as a module (a fresh one on each call), or None if there is none."""
    path = LABS / lab / f"{variant}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"folovllm_lab_{lab}_{variant}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Lab(lab, path, module)


def check_signature(target: Target, function: Callable[..., Any], where: str) -> None:
    """The lab's function must take what the engine's takes, or the engine could not call it."""

    def params(f: Callable[..., Any]) -> str:  # "(self, output, budget)": names, kinds, defaults
        plain = [p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(f).parameters.values()]
        return f"({', '.join(map(str, plain))})"

    want, got = params(target.engine_function()), params(function)
    if want != got:
        raise LabError(f"{where}: {function.__name__}{got} must take what the engine's "
                       f"{target.qualname}{want} takes")


def _our_modules() -> list[ModuleType]:
    """Loaded modules of this repository (engine, tests, stages), the labs themselves excepted."""
    root, labs = f"{ROOT}{os.sep}", f"{LABS}{os.sep}"
    ours = []
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None) or ""
        if file.startswith(root) and not file.startswith(labs):
            ours.append(module)
    return ours


def install(mp: pytest.MonkeyPatch, target: Target, function: Callable[..., Any]) -> None:
    """Put `function` where the engine's target is (see the module docstring)."""
    owner, original = target.owner(), target.engine_function()
    if isinstance(owner, type):
        raw = vars(owner)[target.name]
        if isinstance(raw, (staticmethod, classmethod)):
            function = type(raw)(function)
        mp.setattr(owner, target.name, function)
        return
    for module in _our_modules():
        for attribute, value in list(vars(module).items()):
            if value is original:
                mp.setattr(module, attribute, function)


@dataclass
class Raised:
    """A lab function that let a NotImplementedError out, and the starter line that raised it."""

    qualname: str
    where: str  # labs/02/starter.py:57


class LabReport:
    """A failed test's report, short: one line (pytest's summary prints `reprcrash.message` after
    the test id), then where to look."""

    def __init__(self, message: str, detail: str = "") -> None:
        self.message = message
        self.detail = detail
        self.reprcrash = self

    @classmethod
    def not_implemented(cls, lab: str, raised: Raised) -> "LabReport":
        return cls(not_implemented_line(lab), f"{raised.where}: {raised.qualname} raised NotImplementedError "
                                              "(the engine's function is replaced by the lab's)")

    def toterminal(self, tw: Any) -> None:
        tw.line(self.message, red=True, bold=True)
        if self.detail:
            tw.line(f"  {self.detail}")

    def __str__(self) -> str:
        return f"{self.message}\n  {self.detail}" if self.detail else self.message


class LabGrader:
    """The plugin object, registered only when FOLOVLLM_LAB is set."""

    def __init__(self, variant: str, timeout_s: float) -> None:
        self.variant = variant
        self.timeout_s = timeout_s
        self.labs: dict[str, Optional[Lab]] = {}
        self.patch: Optional[pytest.MonkeyPatch] = None
        self.raised: list[Raised] = []
        self.previous_handler: Any = signal.SIG_DFL

    def _lab(self, lab: str) -> Optional[Lab]:
        if lab not in self.labs:
            self.labs[lab] = load_lab(lab, self.variant)
        return self.labs[lab]

    def _recording(self, lab: Lab, target: Target, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function`; a NotImplementedError raised in the lab's file is noted, and goes on as a
        `LabNotImplemented`."""

        @functools.wraps(function)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except NotImplementedError as error:
                line = _last_line_in(error.__traceback__, lab.path)
                if line is None:  # raised by engine code the lab called: the learner's to see
                    raise
                self.raised.append(Raised(target.qualname, f"{lab.relpath}:{line}"))
                raise LabNotImplemented(str(error), pytrace=False) from error

        return recorded

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        self.raised = []
        lab_name = lab_of(item.path)
        lab = self._lab(lab_name) if lab_name else None
        if lab is not None:
            self.patch = pytest.MonkeyPatch()
            for target, function in lab.replacements():
                check_signature(target, function, lab.relpath)
                install(self.patch, target, self._recording(lab, target, function))
            if self.timeout_s > 0:
                self.previous_handler = signal.signal(signal.SIGALRM, self._time_out)
                signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        yield

    def _time_out(self, signum: int, frame: Any) -> None:
        raise LabTimeout(f"the test ran for more than {self.timeout_s:g} s", pytrace=False)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Any:
        yield
        if self.patch is not None:
            if self.timeout_s > 0:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, self.previous_handler)
            self.patch.undo()
            self.patch = None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        report = outcome.get_result()
        lab = self.labs.get(lab_of(item.path) or "")  # loaded at setup (or failing to load there)
        if not report.failed or lab is None:
            return
        # Raised through a lab function during this test, or in the test's own error: a fixture
        # that failed in an earlier test is raised again, traceback and all, in every later test
        # that uses it, without calling the lab again.
        error = call.excinfo.value if call.excinfo else None
        raised = self.raised[:1] or _raised_in(error, lab)
        if raised:
            report.longrepr = LabReport.not_implemented(lab.lab, raised[0])
        elif isinstance(error, LabError):
            report.longrepr = LabReport(str(error))
        elif isinstance(error, LabTimeout):
            report.longrepr = LabReport(
                f"{error} with labs/{lab.lab}: a loop that never ends? ({TIMEOUT_ENV}=seconds, 0: no limit)",
                f"stopped at {_where_stopped(error, lab)}")
        else:
            return
        report.sections = []  # captured output of an unfinished lab is noise (`-s` shows it)

    def pytest_report_header(self) -> str:
        found = sorted(p.parent.name for p in LABS.glob(f"*/{self.variant}.py"))
        return (f"labs: {ENV}={self.variant}: the tests of stages/<N> run labs/<N>/{self.variant}.py "
                f"in place of the engine's functions it names (labs found: {', '.join(found) or 'none'})")


def _raised_in(error: Optional[BaseException], lab: Lab) -> list[Raised]:
    """The NotImplementedError raised in the lab's file that `error` is or was caused by."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NotImplementedError):
            tb = error.__traceback__
            line = _last_line_in(tb, lab.path)
            if line is not None:
                while tb.tb_next is not None:
                    tb = tb.tb_next
                name = tb.tb_frame.f_code.co_name
                targets = {function.__name__: target for target, function in lab.replacements()}
                qualname = targets[name].qualname if name in targets else name
                return [Raised(qualname, f"{lab.relpath}:{line}")]
        error = error.__cause__ or error.__context__
    return []


def _where_stopped(error: BaseException, lab: Lab) -> str:
    """file:line (function) of the innermost frame in the lab's file, else of the innermost one."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    ours = [f for f in frames if Path(f.f_code.co_filename).resolve() == lab.path.resolve()]
    frame = (ours or frames)[-1]
    file = Path(frame.f_code.co_filename)
    shown = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
    return f"{shown}:{frame.f_lineno} ({frame.f_code.co_name})"


def _last_line_in(tb: Optional[TracebackType], path: Path) -> Optional[int]:
    """The line of the innermost frame of `tb` that is in `path`, if the error was raised there
    (not in engine code the lab called)."""
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None or Path(last.tb_frame.f_code.co_filename).resolve() != path.resolve():
        return None
    return last.tb_lineno


def pytest_configure(config: pytest.Config) -> None:
    variant = os.environ.get(ENV, "").strip()
    if not variant:
        return
    if not variant.isidentifier():
        raise pytest.UsageError(f"{ENV}={variant!r}: name a lab file, e.g. {ENV}=starter (labs/0N/starter.py)")
    try:
        timeout_s = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    except ValueError:
        raise pytest.UsageError(f"{TIMEOUT_ENV} is a number of seconds (0: no limit)") from None
    config.pluginmanager.register(LabGrader(variant, timeout_s), "folovllm-labs")
