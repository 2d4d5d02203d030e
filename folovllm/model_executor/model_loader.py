"""Load a Hugging Face checkpoint folder (or hub id) into one of our model classes.

A checkpoint is published as::

    config.json                      architecture and sizes
    model.safetensors                all weights, or
    model.safetensors.index.json     {"weight_map": {tensor name: shard file}} + the shards
    tokenizer.json, tokenizer_config.json, ...

Every failure a user can cause (wrong path, unknown architecture, missing or corrupt weights)
becomes a `ValueError` that names the file and says what was expected.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from folovllm.model_executor.layers.linear import QuantizationConfig
from folovllm.model_executor.models import MODEL_REGISTRY

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a hub id such as `Qwen/Qwen3-0.6B`, downloaded once."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model must be a folder or a hub id, but {model!r} is a file")
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ValueError(f"model folder {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: all mean "cannot get this model"
        raise ValueError(
            f"model {model!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {e})"
        ) from e


def load_hf_config(path: Path) -> Any:
    """Read config.json and check that we implement its architecture."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; expected a Hugging Face checkpoint folder")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got a {type(raw).__name__}")
    architectures = raw.get("architectures") or []
    supported = [a for a in architectures if a in MODEL_REGISTRY]
    if not supported:
        raise ValueError(
            f"unknown architecture {architectures or raw.get('model_type')!r} in {config_file}; "
            f"supported: {sorted(MODEL_REGISTRY)}"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config.architectures = supported
    return config


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint was saved in (`dtype`, or `torch_dtype` in older configs)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def iterate_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from model.safetensors or the shards its index lists."""
    from safetensors import safe_open

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise ValueError(
            f"no weights in {path}: expected model.safetensors or model.safetensors.index.json"
        )
    for name in files:
        file = path / name
        if not file.is_file():
            raise ValueError(f"weight shard {file} listed in the index is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"weight file {file} is corrupt or unreadable ({e})") from e


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    model: str,
    dtype: Optional[torch.dtype] = None,
    device: str = "cpu",
    quant_config: Optional[QuantizationConfig] = None,
) -> tuple[nn.Module, Any, Path]:
    """-> (our model in eval mode with the checkpoint's weights, HF config, local folder).

    `quant_config` picks how the linear layers store their weights (`layers/linear.py`); None
    is the checkpoint's plain float weights."""
    path = resolve_model_path(model)
    config = load_hf_config(path)
    dtype = dtype or checkpoint_dtype(config)
    model_cls = MODEL_REGISTRY[config.architectures[0]]
    with _default_dtype(dtype), torch.device(device):
        net = model_cls(config, quant_config)
    loaded = net.load_weights(iterate_checkpoint(path))
    missing = net.expected_weights() - loaded
    if missing:
        raise ValueError(
            f"weights missing from the checkpoint in {path}: {sorted(missing)[:8]}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    return net.eval(), config, path
