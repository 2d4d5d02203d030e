"""Quantized weight formats behind the linear-layer seam (`layers/linear.py`): stage 07.

`get_quant_config(path)` reads a checkpoint's quantization settings the way vLLM does: from
`quantization_config` in config.json, or from a separate `quantize_config.json` (older AutoGPTQ
exports). It returns the format's `QuantizationConfig`, or None for a float checkpoint.

Two formats, one kernel family: GPTQ (`gptq.py`: GPTQModel's and AutoGPTQ's files, and our own
quantizer's) and compressed-tensors' `pack-quantized` W4A16 (`compressed_tensors.py`:
llm-compressor's files), converted to GPTQ's layout at load. AWQ, Marlin-repacked kernels and
activation quantization are left out (see docs/stages/07-gptq.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from folovllm.model_executor.layers.linear import QuantizationConfig

QUANTIZATION_METHODS = ("gptq", "compressed-tensors")


def read_quantization_config(path: Path) -> Optional[tuple[dict[str, Any], str]]:
    """-> (the raw settings, the file they came from), or None for a float checkpoint."""
    config_file = path / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text()).get("quantization_config")
        if raw:
            return raw, f"{config_file} (quantization_config)"
    separate = path / "quantize_config.json"
    if separate.is_file():
        try:
            return json.loads(separate.read_text()), str(separate)
        except json.JSONDecodeError as e:
            raise ValueError(f"{separate} is not valid JSON: {e}") from e
    return None


def get_quant_config(path: Path, quantization: Optional[str] = None) -> Optional[QuantizationConfig]:
    """The checkpoint's quantization, as a `QuantizationConfig` (None: float weights).

    `quantization` is vLLM's `--quantization`: None takes whatever the checkpoint says; a name
    insists on it and refuses a checkpoint that is not quantized that way.
    """
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be None or one of {QUANTIZATION_METHODS}, got {quantization!r}")
    found = read_quantization_config(path)
    if found is None:
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} but {path} is not a quantized checkpoint (no "
                "quantization_config in config.json and no quantize_config.json)"
            )
        return None
    raw, source = found
    # AutoGPTQ's quantize_config.json predates `quant_method`; everything it wrote is GPTQ.
    method = raw.get("quant_method", "gptq")
    if method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quant_method={method!r} in {source} is not supported; supported: {QUANTIZATION_METHODS}"
        )
    if quantization is not None and method != quantization:
        raise ValueError(f"quantization={quantization!r} but {source} says quant_method={method!r}")
    if method == "compressed-tensors":
        from folovllm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig.from_config(raw, source)
    from folovllm.model_executor.layers.quantization.gptq import GPTQConfig

    return GPTQConfig.from_config(raw, source)
