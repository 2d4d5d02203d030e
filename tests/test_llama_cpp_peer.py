"""The llama.cpp peer's pure-Python parts (benchmarks/llama_cpp_peer.py): reading its tools'
outputs, the command lines it runs, the converter wrapper, the table. Nothing is built or run
from llama.cpp here (the install takes minutes); fake outputs in the tools' formats instead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import llama_cpp_peer as peer

# what `llama-bench -o json` prints on stdout (two tests, fields trimmed to those read + a few)
LLAMA_BENCH_STDOUT = """[
  {
    "build_commit": "abc1234", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "",
    "backends": "CPU", "model_filename": "m.gguf", "model_type": "qwen3 0.6B all F32",
    "model_size": 2384000000, "model_n_params": 596000000, "n_batch": 2048, "n_ubatch": 512,
    "n_threads": 2, "n_prompt": 128, "n_gen": 0, "n_depth": 0, "avg_ns": 1000, "stddev_ns": 10,
    "avg_ts": 70.5, "stddev_ts": 1.5, "samples_ns": [1000], "samples_ts": [70.5]
  },
  {
    "build_commit": "abc1234", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "",
    "backends": "CPU", "model_filename": "m.gguf", "model_type": "qwen3 0.6B all F32",
    "model_size": 2384000000, "model_n_params": 596000000, "n_batch": 2048, "n_ubatch": 512,
    "n_threads": 2, "n_prompt": 0, "n_gen": 64, "n_depth": 0, "avg_ns": 1000, "stddev_ns": 10,
    "avg_ts": 5.01, "stddev_ts": 0.1, "samples_ns": [1000, 1000], "samples_ts": [5.0, 5.02]
  }
]
"""

BATCHED_STDOUT = """
main: n_kv_max = 1536, n_batch = 2048, n_ubatch = 512, flash_attn = -1
{"n_kv_max": 1536, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 128, "tg": 64, "pl": 8, "n_kv": 1536, "t_pp": 19.9, "speed_pp": 51.4, "t_tg": 28.8, "speed_tg": 17.8, "t": 48.7, "speed": 31.5}

llama_perf_context_print: load time = 100 ms
"""


def fake_build(tmp_path: Path) -> peer.LlamaCpp:
    llama = peer.LlamaCpp(str(tmp_path), "native")
    llama.bin.mkdir(parents=True)
    for tool in ("llama-bench", "llama-batched-bench", "llama-quantize"):
        (llama.bin / tool).write_text("")
    return llama


def test_parse_llama_bench_json_reads_each_test():
    rows = peer.parse_llama_bench_json("log line before\n" + LLAMA_BENCH_STDOUT + "after\n")
    assert [r["test"] for r in rows] == ["pp128", "tg64"]
    assert rows[0]["tok_s"] == 70.5 and rows[1]["samples_tok_s"] == [5.0, 5.02]
    assert rows[1]["threads"] == 2 and rows[1]["model_size"] == 2384000000
    with pytest.raises(ValueError, match="no JSON array"):
        peer.parse_llama_bench_json("error: failed to load model\n")


def test_parse_batched_bench_jsonl_keeps_only_the_rows():
    (row,) = peer.parse_batched_bench_jsonl(BATCHED_STDOUT)
    assert (row["pp"], row["tg"], row["pl"]) == (128, 64, 8)
    assert row["speed_tg"] == 17.8 and row["t_tg"] == 28.8
    with pytest.raises(ValueError, match="no JSON rows"):
        peer.parse_batched_bench_jsonl("main: n_kv_max = 1536\n")


def test_command_lines(tmp_path):
    llama = fake_build(tmp_path)
    cmd = peer.llama_bench_command(llama, "m.gguf", 2, n_prompt=1024)
    assert cmd[0].endswith("build-native/bin/llama-bench")
    assert cmd[cmd.index("-p") + 1] == "1024" and cmd[cmd.index("-n") + 1] == "0"
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("-o") + 1] == "json"
    with pytest.raises(ValueError, match="one test at a time"):
        peer.llama_bench_command(llama, "m.gguf", 1, n_prompt=128, n_gen=64)
    cmd = peer.batched_bench_command(llama, "m.gguf", 1, n_parallel=(8, 16))
    # every sequence whole in the context: 16 x (128 + 64)
    assert cmd[cmd.index("-c") + 1] == "3072" and cmd[cmd.index("-npl") + 1] == "8,16"
    assert cmd[cmd.index("-tb") + 1] == "1"
    with pytest.raises(FileNotFoundError, match="install_llama_cpp.sh"):
        peer.LlamaCpp(str(tmp_path / "none")).tool("llama-bench")


def test_converter_command_answers_the_pre_tokenizer_lookup(tmp_path):
    """The wrapper runs the converter as __main__ with its arguments, and the pre-tokenizer
    lookup patched: a fake converter with the same layout (conversion/base.py) shows both."""
    src = tmp_path / "src" / "vendor" / "llama.cpp"
    (src / "conversion").mkdir(parents=True)
    (src / "conversion" / "__init__.py").write_text("")
    (src / "conversion" / "base.py").write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized')\n")
    (src / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom conversion.base import TextModel\n"
        "if __name__ == '__main__':\n    print(TextModel().get_vocab_base_pre(None), sys.argv[1:])\n")
    llama = peer.LlamaCpp(str(tmp_path))
    cmd = peer.converter_command(llama, "/models/m", "/out/m-f32.gguf", "f32")
    assert cmd[0] == str(tmp_path / "venv" / "bin" / "python")
    out = subprocess.run([sys.executable] + cmd[1:], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "qwen2 ['/models/m', '--outtype', 'f32', '--outfile', '/out/m-f32.gguf']"
    with pytest.raises(ValueError, match="llama-quantize"):
        peer.converter_command(llama, "/models/m", "x.gguf", "q4_0")


def test_system_info_isa():
    info = "system_info: n_threads = 1 | CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 |"
    assert peer.system_info_isa(info) == "AVX512"
    assert peer.system_info_isa(info.replace("AVX512 = 1", "AVX512 = 0")) == "AVX2"


def _engine_rows(scale: float) -> dict:
    rate = lambda x: dict(tok_s_wall=x * scale, tok_s_cpu=x * scale * 1.1)  # noqa: E731
    return dict(prefill_128=rate(40.0), decode_1=rate(3.0),
                batch_8=dict(prefill=rate(50.0), decode=rate(18.0), total=rate(31.0), step_ms=450.0))


def test_medians_and_the_ratio_table():
    reps = [{"decode_1": dict(tok_s_wall=w, tok_s_cpu=w), "isa": "AVX512"} for w in (1.0, 3.0, 2.0)]
    med = peer._median_rows(reps)
    assert med["decode_1"]["tok_s_wall"] == 2.0 and med["decode_1"]["samples_tok_s_wall"] == [1.0, 3.0, 2.0]
    assert med["isa"] == "AVX512"
    result = dict(command="python -m benchmarks.llama_cpp_peer", date="2026-12-07T00:00:00",
                  machine=dict(cpu="AMD EPYC", cpu_cores=2, torch_threads=1, torch="2.13.0+cpu"),
                  folovllm_isa="avx512", llama_cpp_build="native", model="qwen3-0.6b", repeats=3,
                  threads=[1], prefill_lens=[128], n_parallel=[8], bandwidth=None, bytes_per_step_folovllm=1,
                  types={"f32": {"1": {"llama.cpp": dict(_engine_rows(1.0), isa="AVX512"),
                                       "folovllm": _engine_rows(2.0)}}})
    md = peer.render_markdown(result)
    # folovllm / llama.cpp, not the other way round
    assert "| decode, batch 1 | 3.0 [3.3] | 6.0 [6.6] | **2.00x** [2.00x] |" in md
    assert "8 × (128 in + 64 out): total" in md
    json.dumps(result)  # the record stays JSON


def test_q4_0_table_puts_each_gptq_kernel_beside_llama_cpp_or_alone():
    """Beside Q4_0, one column (and ratio) per folovllm GPTQ kernel; with --skip-llama the same
    rows without llama.cpp's columns or ratios; the bytes per step under the table."""
    base = dict(command="python -m benchmarks.llama_cpp_peer --types q4_0", date="2026-12-08T00:00:00",
                machine=dict(cpu="AMD EPYC", cpu_cores=2, torch_threads=1, torch="2.13.0+cpu"),
                folovllm_isa="avx2", llama_cpp_build="native", model="qwen3-0.6b", repeats=3,
                threads=[1], prefill_lens=[128], n_parallel=[8], bandwidth=None,
                folovllm_engines={"q4_0": {"folovllm": peer.describe_engine("q4_0", "folovllm"),
                                           "folovllm q8": peer.describe_engine("q4_0", "folovllm q8")}},
                bytes_per_step={"q4_0": {"folovllm": 870e6, "folovllm q8": 870e6}})
    ours = {"folovllm": _engine_rows(2.0), "folovllm q8": _engine_rows(3.0)}
    md = peer.render_markdown(dict(base, types={"q4_0": {"1": {"llama.cpp": _engine_rows(1.0), **ours}}}))
    assert "cpu_int4_panel_q8" in md and "folovllm 870 MB" in md
    assert "| decode, batch 1 | 3.0 [3.3] | 6.0 [6.6] | **2.00x** [2.00x] | 9.0 [9.9] | **3.00x** [3.00x] |" in md
    alone = peer.render_markdown(dict(base, skip_llama=True, types={"q4_0": {"1": ours}}))
    assert "| decode, batch 1 | 6.0 [6.6] | 9.0 [9.9] |" in alone and "llama.cpp was not run" in alone
