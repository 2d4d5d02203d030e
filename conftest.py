"""Root conftest: makes the shared fixtures of `tests/fixtures.py` available to every test
folder (`tests/`, `stages/0N/`), whichever of them pytest is asked to run."""

pytest_plugins = ["tests.fixtures"]
