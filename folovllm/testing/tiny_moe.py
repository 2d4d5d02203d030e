"""Small random-weight Qwen3-MoE checkpoints that load exactly like `Qwen/Qwen3-30B-A3B`.

The same recipe as `tiny_model.py` (a locally trained BPE tokenizer, weights drawn by HF
transformers at `initializer_range=0.2` so greedy outputs are diverse, random norm weights),
with the MoE knobs a test needs to vary: the number of experts, top-k, `norm_topk_prob`, which
layers stay dense (`mlp_only_layers`, `decoder_sparse_step`) and tied embeddings.

HF saves the experts one tensor per projection per expert
(`model.layers.1.mlp.experts.3.gate_proj.weight`), as the hub checkpoints are.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from folovllm.testing.tiny_model import build_tokenizer

_BUILD_VERSION = 1


@dataclass(frozen=True)
class MoeRecipe:
    num_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool = True
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    tie_word_embeddings: bool = True
    seed: int = 0
    initializer_range: float = 0.2
    sizes: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    ))


def build_tiny_moe_checkpoint(path: str | os.PathLike, recipe: MoeRecipe = MoeRecipe()) -> Path:
    """Create (once) a random-weight HF Qwen3-MoE checkpoint + tokenizer in `path`."""
    import torch
    import transformers

    path = Path(path)
    stamp_value = dict(version=_BUILD_VERSION, **asdict(recipe))
    stamp_value["mlp_only_layers"] = list(recipe.mlp_only_layers)
    stamp = path / "folovllm_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == stamp_value:
        return path
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    config = transformers.Qwen3MoeConfig(
        vocab_size=recipe.sizes.get("vocab_size", vocab_size),
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        initializer_range=recipe.initializer_range,
        tie_word_embeddings=recipe.tie_word_embeddings,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k,
        norm_topk_prob=recipe.norm_topk_prob,
        mlp_only_layers=list(recipe.mlp_only_layers),
        decoder_sparse_step=recipe.decoder_sparse_step,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{k: v for k, v in recipe.sizes.items() if k != "vocab_size"},
    )
    torch.manual_seed(recipe.seed)
    model = transformers.Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # random norm weights, so a norm loaded into the wrong place shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    model.save_pretrained(path)
    stamp.write_text(json.dumps(stamp_value))
    return path
