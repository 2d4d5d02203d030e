"""Root conftest: makes the shared fixtures of `tests/fixtures.py` available to every test
folder (`tests/`, `stages/0N/`), whichever of them pytest is asked to run.

folovllm's own stderr handler is turned off here (FOLOVLLM_CONFIGURE_LOGGING=0, before folovllm
is imported), so every log record reaches pytest's capture (`caplog`); processes the tests start
inherit it."""

import os

os.environ.setdefault("FOLOVLLM_CONFIGURE_LOGGING", "0")

pytest_plugins = ["tests.fixtures", "tests.labs_plugin"]
