"""folovllm's log lines on stderr, visible without any setup (vLLM's `vllm/logger.py`).

Python prints only WARNING and above when nobody configured logging, so a minute-long first
build announced at INFO looked like a hang. The "folovllm" logger therefore gets a handler of
its own at INFO (`FOLOVLLM_LOGGING_LEVEL`), and does not pass its records on to the root logger
(they would print twice in an application that configured logging).
`FOLOVLLM_CONFIGURE_LOGGING=0` leaves all of it to the application (the test suite does that, so
pytest's log capture sees every record).
"""

from __future__ import annotations

import logging
import sys

from folovllm import envs

_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
_configured = False


def configure_root_logger() -> None:
    """Give the "folovllm" logger its stderr handler, once."""
    global _configured
    if _configured or not envs.configure_logging():
        return
    _configured = True
    root = logging.getLogger("folovllm")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(envs.logging_level())
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """The logger of one module (`init_logger(__name__)`), under "folovllm"."""
    configure_root_logger()
    return logging.getLogger(name)
