"""oneDNN's caches of compiled matmuls are bounded (issue 28, item 3: RSS grew with every new
batch shape, ~0.5 MiB per [T, in] x [in, out] seen, until ~1 GiB).

folovllm's import sets `ONEDNN_PRIMITIVE_CACHE_CAPACITY` and torch's `LRU_CACHE_CAPACITY`
(folovllm/envs.py) before oneDNN reads them. No RSS is measured here (that is
`benchmarks/memory_rss.py`): the tests ask oneDNN itself, through `ONEDNN_VERBOSE`, whether a
shape seen before, then pushed out by newer ones, is compiled again (`create:cache_miss`) or
found (`create:cache_hit`). Unbounded (oneDNN's default keeps 1,024) it is found.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from folovllm import envs
from folovllm.model_executor.layers import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm._ONEDNN, reason="this torch has no oneDNN matmul")

# torch first, as an application would import it; folovllm's import must still come before
# oneDNN's first primitive. Each `rows` is one matmul shape [rows, 16] x [16, 32].
SCRIPT = """
import sys, torch, folovllm
from folovllm.model_executor.layers import cpu_gemm
layer = torch.nn.Linear(16, 32, bias=False)
with cpu_gemm.weight_packing(True):
    assert cpu_gemm.pack_linear_weight(layer)
with torch.inference_mode():
    for rows in map(int, sys.argv[1:]):
        cpu_gemm.dense_linear(torch.randn(rows, 16), layer.weight)
"""
CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY",
              "FOLOVLLM_ONEDNN_CACHE_CAPACITY")


def matmul_cache_outcomes(rows: list[int], **env: str) -> list[str]:
    """'hit' or 'miss' of oneDNN's primitive cache for each matmul, in a fresh process."""
    child_env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}  # pytest imported folovllm
    child_env.update(env, ONEDNN_VERBOSE="profile_create", FOLOVLLM_CPU_GEMM="onednn")  # oneDNN's layout
    done = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, rows)], env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.startswith("onednn_verbose") and ",create:cache_" in line
             and (",inner_product," in line or ",matmul," in line)]
    return ["hit" if ",create:cache_hit," in line else "miss" for line in lines]


def test_a_shape_pushed_out_by_newer_ones_is_compiled_again():
    """Capacity 4: rows 4..9 fill it, so rows=4 is compiled again, then found."""
    outcomes = matmul_cache_outcomes([4, 5, 6, 7, 8, 9, 4, 4], FOLOVLLM_ONEDNN_CACHE_CAPACITY="4")
    assert outcomes == ["miss"] * 7 + ["hit"]


def test_the_default_bound_holds_inside_onednn():
    """With nothing set, oneDNN keeps envs.ONEDNN_CACHE_CAPACITY compiled matmuls, not its own 1,024:
    one more shape than that pushes the first out."""
    n = envs.ONEDNN_CACHE_CAPACITY
    rows = list(range(4, 4 + n + 1))
    outcomes = matmul_cache_outcomes(rows + [rows[-1], rows[0]])
    assert outcomes == ["miss"] * len(rows) + ["hit", "miss"]


@pytest.mark.parametrize("given, expected", [
    ({}, (str(envs.ONEDNN_CACHE_CAPACITY),) * 2),
    ({"FOLOVLLM_ONEDNN_CACHE_CAPACITY": "7"}, ("7", "7")),
    ({"FOLOVLLM_ONEDNN_CACHE_CAPACITY": "7", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "9"}, ("7", "7")),
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "9", "LRU_CACHE_CAPACITY": "5"}, ("9", "5")),
])
def test_which_capacity_wins(monkeypatch, given, expected):
    """FOLOVLLM_ONEDNN_CACHE_CAPACITY sets both; without it the user's own values stay."""
    for key in CACHE_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    envs.apply_onednn_cache_capacity()
    assert (os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"]) == expected


@pytest.mark.parametrize("value", ["0", "-1", "lots", "1.5"])
def test_a_capacity_that_is_not_a_count_is_refused(monkeypatch, value):
    monkeypatch.setenv("FOLOVLLM_ONEDNN_CACHE_CAPACITY", value)
    with pytest.raises(ValueError, match="FOLOVLLM_ONEDNN_CACHE_CAPACITY"):
        envs.apply_onednn_cache_capacity()
