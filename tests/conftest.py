"""The shared fixtures are in `tests/fixtures.py` and the plain helpers in `tests/helpers.py`.

They are registered by the repository's root `conftest.py` (`pytest_plugins`), not here, so
that `pytest stages/0N` finds them too; registering them from this file as well would load the
same plugin twice, which pytest refuses.
"""
