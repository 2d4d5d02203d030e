"""Stage 11's fixture: the test adapters of each tiny architecture, made once per session."""

from __future__ import annotations

from typing import Callable

import pytest

from lora_cases import Adapter, make_adapters


@pytest.fixture(scope="session")
def adapters(tiny_checkpoints, tmp_path_factory) -> Callable[[str], dict[str, Adapter]]:
    """adapters(arch) -> {"A", "B", "C"}: PEFT checkpoints of `lora_cases.ADAPTER_SPECS`."""
    cache: dict[str, dict[str, Adapter]] = {}

    def get(arch: str) -> dict[str, Adapter]:
        if arch not in cache:
            cache[arch] = make_adapters(tiny_checkpoints[arch], tmp_path_factory.mktemp(f"lora_{arch}"))
        return cache[arch]

    return get
