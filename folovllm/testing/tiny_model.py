"""Build small random-weight checkpoints that load exactly like `Qwen/Qwen3-0.6B`.

No weights can be downloaded where folovllm is tested, so tests, the demo and the benchmarks make
their own models: a BPE tokenizer trained locally with the `tokenizers` library, and a Qwen3 /
Qwen2 / Llama model built by HF transformers with random weights and saved with
`save_pretrained`. They then go through the same loading path as a real hub checkpoint.

Why `initializer_range=0.2` and not the default 0.02: with tiny random weights at 0.02 the model
greedily repeats a handful of tokens, so a broken attention path or cache can still produce the
"right" output. A larger scale gives diverse, confidently separated logits (`check_diverse`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Model sizes. "tiny" keeps tests fast; "bench" is big enough (25.4M parameters) that
# matmuls, not Python, dominate a step on one CPU thread.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    ),
    "bench": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
    ),
    # Qwen/Qwen3-0.6B's shapes with random weights (2.4 GB in float32), for speed only: the
    # vocabulary is the real one's size, the tokenizer still the small local BPE.
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, vocab_size=151_936,
    ),
}
ARCHITECTURES = ("qwen3", "qwen2", "llama")
_BUILD_VERSION = 2  # bump when the recipe changes so cached builds are redone

_WORDS = (
    "the engine schedules requests every step and each request owns its tokens while the cache "
    "keeps keys and values so a decode step only computes one new token per sequence prefill "
    "computes the whole prompt attention reads the cache through a block table pages of memory "
    "are handed out on demand finished requests leave and waiting ones join batches grow and "
    "shrink throughput rises latency falls a model predicts the next token from logits sampling "
    "picks it with temperature top p top k or greedy argmax quantized weights take four bits "
    "prefix caching shares blocks between prompts chunked prefill splits long prompts"
).split()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "folovllm"


def _corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences plus digits and punctuation, enough to train a small BPE."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"]))
    return lines


def build_tokenizer(path: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE tokenizer, save it as HF files in `path`; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(path)
    return tok.get_vocab_size()


def build_tiny_checkpoint(
    path: str | os.PathLike,
    arch: str = "qwen3",
    size: str = "tiny",
    seed: int = 0,
    initializer_range: float = 0.2,
    tie_word_embeddings: bool = True,
) -> Path:
    """Create (once) a random-weight HF checkpoint + tokenizer in `path`; returns the path."""
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    path = Path(path)
    recipe = dict(
        version=_BUILD_VERSION, arch=arch, size=size, seed=seed,
        initializer_range=initializer_range, tie=tie_word_embeddings,
    )
    stamp = path / "folovllm_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return path
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    config_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=SIZES[size].get("vocab_size", vocab_size),
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{k: v for k, v in SIZES[size].items() if k != "vocab_size"},
    )
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    # HF initialises every bias to 0 and every RMSNorm weight to 1: with those values a bias or
    # a norm weight that is never loaded (or loaded into the wrong place) changes nothing, and
    # no test could see it. Give them random values too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, initializer_range)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    model.save_pretrained(path)
    stamp.write_text(json.dumps(recipe))
    return path
