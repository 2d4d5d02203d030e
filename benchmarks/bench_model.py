"""The benchmark model (the machine the numbers come from is described by `benchmarks.results`).

The model is `folovllm.testing.tiny_model`'s "bench" size, Qwen3 architecture, random weights
(initializer_range 0.2, seed 0), float32, built locally once and cached under
`folovllm.testing.tiny_model.default_cache_dir() / "bench-qwen3"` (~/.cache/folovllm/bench-qwen3).
It loads through the same path as a real hub checkpoint, in folovllm and in HF transformers.

Shapes (Qwen3ForCausalLM)::

    vocab_size               512   (a BPE trained locally; ids 0..2 are special, eos = 2)
    hidden_size              512
    num_hidden_layers          8
    num_attention_heads        8   head_dim 64 (q: 512 -> 512)
    num_key_value_heads        4   (GQA, group 2; k, v: 512 -> 256)
    intermediate_size       1536   (SwiGLU MLP)
    q_norm / k_norm          yes   (Qwen3: RMSNorm on each head's q and k)
    max_position_embeddings 2048
    tie_word_embeddings     True

    parameters              25,437,696  (~25.4M: 3,146,880 per layer x 8 + 262,144 embedding
                                         + 512 final norm); 97 MiB in float32
    KV cache per token      16 KiB in float32 (2 x 8 layers x 4 kv heads x 64 x 4 bytes)

About 51 MFLOP per token in the matmuls: big enough that on one CPU thread the matmuls, not
Python, dominate a step; small enough that a full benchmark runs in minutes. Its vocabulary is
tiny (512 vs Qwen3's 151,936), so the LM head and sampler weigh far less here than in a real
model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BENCH_ARCH = "qwen3"
BENCH_SIZE = "bench"
BENCH_PARAMS = 25_437_696  # checked by bench_model_info()


def bench_model_path() -> Path:
    """Build (once; later calls reuse the cache) and return the benchmark checkpoint folder."""
    from folovllm.testing.tiny_model import build_tiny_checkpoint, default_cache_dir

    return build_tiny_checkpoint(default_cache_dir() / f"bench-{BENCH_ARCH}", arch=BENCH_ARCH,
                                 size=BENCH_SIZE)


def bench_model_info(path: Path) -> dict[str, Any]:
    """The model's shapes as read back from its config.json, for the results file."""
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "max_position_embeddings", "tie_word_embeddings", "dtype")
    info = {k: cfg.get(k) for k in keys}
    info.update(name=f"folovllm tiny_model {BENCH_ARCH}/{BENCH_SIZE} (random weights)",
                path=str(path), num_parameters=BENCH_PARAMS)
    return info
