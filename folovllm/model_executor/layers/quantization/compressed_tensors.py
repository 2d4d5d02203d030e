"""compressed-tensors W4A16: llm-compressor's checkpoints, read into GPTQ's layout once at load.

llm-compressor (the quantizer vLLM's documentation points to since 2025) writes its GPTQ and
round-to-nearest results in the compressed-tensors format: `quant_method: "compressed-tensors"`,
`format: "pack-quantized"`, and one config group of weight-only integer quantization (scheme
"W4A16": 4 bits, symmetric, groups of 128; "W4A16_ASYM" adds zero points). Per linear layer,
with N outputs, K inputs, P = 32 / bits codes per int32 and groups of G inputs::

    weight_packed      int32 [N, K / P]       codes packed along the INPUT dim
    weight_scale       float [N, K / G]       [N, 1] when channel-wise (one group per row)
    weight_zero_point  int32 [N / P, K / G]   packed along the OUTPUT dim; asymmetric only
    weight_g_idx       int32 [K]              group of each input; actorder "group" only
    weight_shape       int   [2]              [N, K], the unpacked shape

Codes and zero points are signed (q in [-8, 7] at 4 bits) and stored with an offset of
2^(bits-1), u = q + 8, so

    W[n, k] = (q - z) * s = (u_q - u_z) * s          symmetric: z = 0, so u_z = 8

which is GPTQ's formula with GPTQ's code = u_q and zero = u_z (v2, real zeros). The words are
GPTQ's too, the other way round::

    weight_packed[n, c]       bits j*b..  = code of input  k = c*P + j  =  qweight[c, n]
    weight_zero_point[c, g]   bits j*b..  = zero of output n = c*P + j  =  qzeros[g, c]

So `process_weights_after_loading` transposes the three tensors into `qweight` / `qzeros` /
`scales` (symmetric zeros are the constant word 0x88888888), and from there the layer is a
GPTQ layer: same kernels (`GPTQLinearMethod`), same tensor-parallel split (`RankGroups`).

actorder "group" (alias "dynamic") stores `weight_g_idx`, GPTQ's act-order; actorder "weight"
("static") quantized in activation order but kept the groups contiguous, so it needs no g_idx.

Left out, refused naming the field: other formats (`float-quantized`, `naive-quantized`,
`marlin-24`, `nvfp4-pack-quantized`, sparse formats), activation quantization (W8A8, FP8),
`tensor` and `block` strategies, several config groups or targets other than "Linear", layers
left unquantized except the LM head, transforms and a quantized KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from folovllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QuantizationConfig,
    WeightLoader,
    set_weight_attrs,
)
from folovllm.model_executor.layers.quantization.gptq import (
    GPTQConfig,
    GPTQLinearMethod,
    RankGroups,
    g_idx_param,
    layer_name,
    pack_int32,
)

ACTORDER_GROUP = ("group", "dynamic", True)  # stores weight_g_idx
ACTORDER_IN_ORDER = (None, False, "weight", "static")  # groups stay contiguous: no g_idx


def _refuse(field: str, value: Any, source: str, why: str) -> ValueError:
    return ValueError(f"compressed-tensors {field}={value!r} in {source}: {why}")


@dataclass(frozen=True)
class CompressedTensorsConfig(QuantizationConfig):
    """A `pack-quantized` checkpoint's weight settings (its one config group's `weights`)."""

    bits: int = 4
    group_size: int = 128  # -1: strategy "channel", one group over all inputs
    sym: bool = True
    actorder: bool = False  # actorder "group": weight_g_idx in the checkpoint

    @property
    def gptq(self) -> GPTQConfig:
        """The same weights as a GPTQ layer sees them after conversion (v2: real zeros)."""
        return GPTQConfig(bits=self.bits, group_size=self.group_size, desc_act=self.actorder,
                          sym=self.sym, checkpoint_format="gptq_v2")

    # --8<-- [start:ct_from_config]
    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str = "quantization_config") -> "CompressedTensorsConfig":
        """Read llm-compressor's fields; refuse, naming the field, what the GPTQ kernels cannot run."""
        if raw.get("format") != "pack-quantized":
            raise _refuse("format", raw.get("format"), source, "only 'pack-quantized' (W4A16 / W8A16) is supported")
        if raw.get("quantization_status", "compressed") != "compressed":
            raise _refuse("quantization_status", raw.get("quantization_status"), source,
                          "the weights must be stored compressed")
        for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if raw.get(field):
                raise _refuse(field, raw[field], source, "not supported")
        for entry in raw.get("ignore") or []:
            if "lm_head" not in entry:  # our LM head is never quantized; every other layer is
                raise _refuse("ignore", entry, source, "only the LM head may be left unquantized")
        groups = raw.get("config_groups") or {}
        if len(groups) != 1:
            raise _refuse("config_groups", sorted(groups), source, "exactly one config group is supported")
        [(name, scheme)] = groups.items()
        where = f"config_groups.{name}"
        if scheme.get("targets") != ["Linear"]:
            raise _refuse(f"{where}.targets", scheme.get("targets"), source, "only ['Linear'] is supported")
        if scheme.get("format", "pack-quantized") != "pack-quantized":
            raise _refuse(f"{where}.format", scheme.get("format"), source, "only 'pack-quantized' is supported")
        for field in ("input_activations", "output_activations"):
            if scheme.get(field):
                raise _refuse(f"{where}.{field}", scheme[field], source, "activation quantization is not supported")
        w = scheme.get("weights") or {}
        where += ".weights"
        bits, group_size = w.get("num_bits"), w.get("group_size")
        sized = isinstance(group_size, int) and not isinstance(group_size, bool)
        strategy = w.get("strategy") or ("group" if sized and group_size > 0 else "channel")
        checks = {
            "num_bits": (bits in (4, 8) and not isinstance(bits, bool), "must be 4 or 8"),
            "type": (w.get("type", "int") == "int", "only integer weights are supported"),
            "strategy": (strategy in ("group", "channel"), "only 'group' and 'channel' are supported"),
            "group_size": (
                sized and group_size > 0 if strategy == "group" else group_size in (None, -1),
                "must be a positive integer for strategy 'group' and null or -1 for 'channel'"),
            "symmetric": (isinstance(w.get("symmetric", True), bool), "must be true or false"),
            "dynamic": (w.get("dynamic", False) is False, "dynamic weight quantization is not supported"),
            "actorder": (w.get("actorder") in ACTORDER_GROUP + ACTORDER_IN_ORDER,
                         "must be null, 'group', 'weight', 'dynamic' or 'static'"),
            "block_structure": (w.get("block_structure") is None, "block quantization is not supported"),
            "zp_dtype": (w.get("zp_dtype") in (None, "torch.int8"), "zero points must be int8 codes (packed)"),
        }
        for field, (ok, why) in checks.items():
            if not ok:
                raise _refuse(f"{where}.{field}", w.get(field, strategy if field == "strategy" else None),
                              source, why)
        try:
            config = cls(bits=bits, group_size=group_size if strategy == "group" else -1,
                         sym=w.get("symmetric", True), actorder=w.get("actorder") in ACTORDER_GROUP)
            config.gptq  # the kernels' own checks (group size a multiple of the pack factor)
        except ValueError as e:
            raise ValueError(f"compressed-tensors {where}: {e} (in {source})") from None
        return config
    # --8<-- [end:ct_from_config]

    def get_quant_method(self, layer: LinearBase) -> Optional[LinearMethodBase]:
        return CompressedTensorsWNA16(self)


class CompressedTensorsWNA16(LinearMethodBase):
    """Registers the checkpoint's `weight_*` tensors (each split like GPTQ's for tensor
    parallelism), turns them into a GPTQ layer after loading, and multiplies as GPTQ does.
    vLLM's name for the scheme (`CompressedTensorsWNA16`): N-bit weights, 16-bit activations."""

    def __init__(self, quant_config: CompressedTensorsConfig) -> None:
        self.quant_config = quant_config
        self.gptq = GPTQLinearMethod(quant_config.gptq)

    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        cfg = self.quant_config
        pf, output_size = cfg.gptq.pack_factor, sum(output_partition_sizes)
        groups = RankGroups.of(layer, cfg.gptq, input_size, output_partition_sizes, "compressed-tensors")
        self.gptq.groups = groups

        def param(name: str, shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> None:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, **{"weight_loader": weight_loader, **attrs})
            layer.register_parameter(name, p)

        # The groups are dim 1 of the scales and zeros (dim 0 in GPTQ's layout).
        by_group = groups.loader_attrs(layer, group_dim=1)
        param("weight_packed", (output_size, input_size // pf), torch.int32,  # [N, K / P]
              output_dim=0, input_dim=1, packed_dim=1, pack_factor=pf)
        param("weight_scale", (output_size, groups.num_groups), params_dtype, output_dim=0, **by_group)
        if not cfg.sym:  # [N / P, groups]: packed along the outputs
            param("weight_zero_point", (output_size // pf, groups.num_groups), torch.int32,
                  output_dim=0, packed_dim=0, pack_factor=pf, **by_group)
        if cfg.actorder:
            layer.register_parameter("weight_g_idx", g_idx_param(layer, input_size, groups))
        # Not needed to compute, but a free check that the checkpoint is the model config.json says.
        param("weight_shape", (2,), torch.int64, weight_loader=_weight_shape_checker(layer))

    # --8<-- [start:ct_to_gptq]
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """The checkpoint's tensors, transposed into GPTQ's (module docstring), replace them;
        then GPTQ's own hook checks g_idx and picks the kernel."""
        cfg, groups = self.quant_config, self.gptq.groups
        qweight = layer.weight_packed.data.t().contiguous()  # [K / P, N]
        scales = layer.weight_scale.data.t().contiguous()  # [groups, N]
        K, N = qweight.shape[0] * cfg.gptq.pack_factor, qweight.shape[1]
        if cfg.sym:  # every zero is 2^(bits-1): the word 0x88888888 (0x80808080 at 8 bits)
            middle = torch.full((groups.num_groups, N), 2 ** (cfg.bits - 1))
            qzeros = pack_int32(middle, cfg.bits, dim=1)  # [groups, N / P]
        else:
            qzeros = layer.weight_zero_point.data.t().contiguous()  # [groups, N / P]
        if cfg.actorder:
            g_idx = layer.weight_g_idx.data
        else:  # groups in order: input k is in group k // G on this rank (one group if channel-wise)
            group = cfg.group_size if cfg.group_size != -1 else groups.input_size
            g_idx = (torch.arange(K, dtype=torch.int32) // group).to(qweight.device)
        for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"):
            if hasattr(layer, name):
                delattr(layer, name)
        for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.gptq.process_weights_after_loading(layer)
    # --8<-- [end:ct_to_gptq]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.gptq.apply(layer, x, bias)


def _weight_shape_checker(layer: nn.Module) -> WeightLoader:
    """A loader for `weight_shape` that checks it instead of keeping it: [rows of the part the
    shard id names (all of a layer that is not fused), all inputs]."""

    def check(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        shard_ids = getattr(layer, "shard_ids", ())
        rows = layer.output_size if shard_id is None else layer.output_sizes[shard_ids.index(shard_id)]
        if loaded_weight.tolist() != [rows, layer.input_size]:
            part = "" if shard_id is None else f" (shard {shard_id!r})"
            raise ValueError(
                f"weight_shape of {layer_name(layer)}{part} is {loaded_weight.tolist()}, but config.json "
                f"gives [{rows}, {layer.input_size}]"
            )
        param.data.copy_(loaded_weight)

    return check
