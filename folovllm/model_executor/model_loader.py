"""Load a Hugging Face checkpoint folder (or hub id) into one of our model classes.

A checkpoint is published as::

    config.json                      architecture and sizes
    model.safetensors                all weights, or
    model.safetensors.index.json     {"weight_map": {tensor name: shard file}} + the shards
    tokenizer.json, tokenizer_config.json, ...

Every failure a user can cause (wrong path, unknown architecture, missing or corrupt weights)
becomes a `ValueError` that names the file and says what was expected. The order::

    config.json ─► sizes checked ─► headers vs a model on the meta device ─► allocate, read, load
                   (check_architecture)  (check_checkpoint: names, shapes,
                                          dtypes, nothing missing)
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from folovllm.model_executor.layers.fused_moe import FusedMoE
from folovllm.model_executor.layers.linear import LinearBase, QuantizationConfig
from folovllm.model_executor.layers.quantization import get_quant_config
from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
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
            f"supported: {sorted(a for a, cls in MODEL_REGISTRY.items() if not getattr(cls, 'refused', False))}"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers' own field checks (types, layer_types, ...)
        raise ValueError(f"{config_file} is not a valid {supported[0]} configuration: {e}") from e
    config.architectures = supported
    check_architecture(config, config_file)
    return config


# Upper bounds far above any model this engine runs (Qwen3-235B: hidden 4,096, 94 layers, 64
# heads, vocab 151,936), low enough that a typo cannot make the first allocation take minutes.
_ARCH_LIMITS = {
    "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024,
    "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24,
}


def check_architecture(config: Any, source: Path) -> None:
    """Refuse, before anything is allocated, sizes no model can have: every integer of the
    architecture positive and within `_ARCH_LIMITS`, query heads a multiple of the key/value heads,
    a positive finite `rms_norm_eps` and `rope_theta`. (A hidden size of 1e9 used to reach the
    allocator; 100,000 layers allocated for a minute and a half; a negative epsilon loaded and
    generated NaN.)"""
    for name, limit in _ARCH_LIMITS.items():
        value = getattr(config, name, None)
        if value is None and name in ("head_dim", "num_key_value_heads"):
            continue  # optional: hidden_size / heads, and heads (no GQA)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise ValueError(f"{name}={value!r} in {source}: must be an integer in 1..{limit}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} in {source} is not a multiple of "
                         f"num_key_value_heads={kv_heads} (each key/value head serves a whole group)")
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise ValueError(f"hidden_size={config.hidden_size} in {source} is not divisible by "
                         f"num_attention_heads={heads}, and no head_dim is given")
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(config, name, None)
        if value is None and name == "rope_theta":
            continue  # newer configs keep it under rope_parameters
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"{name}={value!r} in {source}: must be a positive finite number")


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint was saved in (`dtype`, or `torch_dtype` in older configs)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def checkpoint_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards its index lists (each checked to exist)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
    elif single.is_file():
        names = [single.name]
    else:
        raise ValueError(
            f"no weights in {path}: expected model.safetensors or model.safetensors.index.json"
        )
    files = [path / name for name in names]
    for file in files:
        if not file.is_file():
            raise ValueError(f"weight shard {file} listed in the index is missing")
    return files


def iterate_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from model.safetensors or the shards its index lists."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"weight file {file} is corrupt or unreadable ({e})") from e


# safetensors' dtype names (the header's "dtype") -> torch's
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def iterate_checkpoint_headers(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `iterate_checkpoint`, from the safetensors headers alone: each tensor as an empty
    tensor on the meta device with the stored shape and dtype. No data is read."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                entries = [(key, f.get_slice(key)) for key in f.keys()]
                headers = [(key, s.get_shape(), s.get_dtype()) for key, s in entries]
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"weight file {file} is corrupt or unreadable ({e})") from e
        for key, shape, dtype in headers:
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"checkpoint tensor {key!r} in {file} has dtype {dtype}, which "
                                 f"folovllm does not read; supported: {sorted(_SAFETENSORS_DTYPES)}")
            yield key, torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")


def check_checkpoint(model_cls: type[nn.Module], config: Any, path: Path, dtype: torch.dtype) -> None:
    """Load the checkpoint's headers into the model built with its parameters on the meta
    device (no memory, no data read): every tensor name known, every shape and dtype right, none missing, each a
    `ValueError` naming the tensor, before the real model is allocated and its weights read
    (a wrong shape at the last layer of a large model used to be found after allocating it
    and reading every tensor before it).

    For float checkpoints only: the quantized layers' loaders compare values (GPTQ's fused
    g_idx, compressed-tensors' weight_shape), which the meta device does not have; their
    names, shapes and dtypes are checked as they load."""
    with _BUILD_LOCK, _default_dtype(dtype), _parameters_on_meta():
        shadow = model_cls(config, None)
    _check_complete(shadow, shadow.load_weights(iterate_checkpoint_headers(path)), path)


# Held while a model is built: `_parameters_on_meta` patches nn.Module for the whole process,
# so no other thread may build its model meanwhile.
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (shape, dtype and its loading
    attributes kept, no memory), buffers stay where they are (accelerate's `init_empty_weights`).
    Not `with torch.device("meta")`: `torch.arange` on meta (the rotary cache) runs torch's
    Python references, whose import (sympy, dynamo) added ~150 MiB to the process. A parameter
    made with `torch.empty` is never touched before it moves, so it costs no resident memory."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)  # weight_loader, output_dim, ...
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _check_complete(net: nn.Module, loaded: set[str], path: Path) -> None:
    missing = net.expected_weights() - loaded
    if missing:
        raise ValueError(
            f"weights missing from the checkpoint in {path}: {sorted(missing)[:8]}"
            f"{' ...' if len(missing) > 8 else ''}"
        )


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
    quantization: Optional[str] = None,
) -> tuple[nn.Module, Any, Path]:
    """-> (our model in eval mode with the checkpoint's weights, HF config, local folder).

    `quant_config` picks how the linear layers store their weights (`layers/linear.py`); None
    reads it from the checkpoint, as vLLM does (stage 07: a GPTQ checkpoint's
    `quantization_config` gives 4-bit layers; a float checkpoint gives plain ones).
    `quantization` ("gptq") insists that the checkpoint is quantized that way."""
    path = resolve_model_path(model)
    config = load_hf_config(path)
    if quant_config is None:
        quant_config = get_quant_config(path, quantization)
    dtype = dtype or checkpoint_dtype(config)
    model_cls = MODEL_REGISTRY[config.architectures[0]]
    if quant_config is None:
        check_checkpoint(model_cls, config, path, dtype)
    with _BUILD_LOCK, _default_dtype(dtype), torch.device(device):
        net = model_cls(config, quant_config)
    _check_complete(net, net.load_weights(iterate_checkpoint(path)), path)
    for module in net.modules():  # re-lay weights out for their kernel (GPTQ's, oneDNN's)
        if isinstance(module, LinearBase):
            module.quant_method.process_weights_after_loading(module)
        elif isinstance(module, (ParallelLMHead, FusedMoE)):
            module.process_weights_after_loading()
    return net.eval(), config, path
