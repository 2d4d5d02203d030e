"""Linear layers that own how their weights are stored and loaded: the seam for GPTQ (stage 07)
and tensor parallelism (stage 08).

A plain `nn.Linear` fixes two things a later stage needs to change:

- *how the weight is stored and multiplied*: GPTQ keeps no `weight` at all, but int32 `qweight`
  (eight 4-bit values packed along the input dimension), `qzeros`, `scales` and `g_idx`, and
  multiplies with a dequantizing kernel;
- *which part of a checkpoint tensor this process holds*: with tensor parallelism each rank keeps
  a slice of the output rows (column-parallel) or of the input columns (row-parallel).

So each layer here delegates both to objects it owns:

    LinearBase
      .quant_method   a LinearMethodBase: `create_weights()` registers the parameters (plain
                      `weight` for UnquantizedLinearMethod; stage 07's GPTQ method registers
                      `qweight`/`qzeros`/`scales`/`g_idx` instead), `apply()` does the matmul
      parameters      each carries `weight_loader(param, loaded_weight, shard_id=None)` (the
                      layer's: it knows where a shard goes) and the dimensions a loader must
                      respect: `output_dim` (the dim that holds output features), `input_dim`,
                      and for packed tensors `packed_dim` + `pack_factor`

The model's `load_weights` only maps checkpoint names to parameters and calls
`param.weight_loader`; it never needs to know a layout. A quant method declares its own dims,
e.g. GPTQ's `qweight` [in / 8, out] has `input_dim=0, output_dim=1, packed_dim=0`, and its
`qzeros` [groups, out / 8] has `output_dim=1, packed_dim=1, pack_factor=8`, so shard offsets on
it are divided by 8.

The classes and their names are vLLM's. Today every layer runs on one rank (tp_size = 1): the
loaders copy whole tensors, or one fused shard into its rows. The docstrings say where stage 08
cuts each layer. The LM head and the token embedding stay `nn.Linear` / `nn.Embedding` in the
model files; stage 08 swaps in vocab-parallel versions (vLLM's `ParallelLMHead`,
`VocabParallelEmbedding`) that split the vocabulary across ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

WeightLoader = Callable[..., None]  # (param, loaded_weight, shard_id=None) -> None
ShardId = Union[int, str]


class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit the slot it was loaded into. `load_weights` catches it
    and re-raises it with the checkpoint tensor's name, which the loaders do not know."""

    def __init__(self, loaded_shape: tuple[int, ...], expected_shape: tuple[int, ...]) -> None:
        super().__init__(f"tensor of shape {loaded_shape} loaded into a slot of shape {expected_shape}")
        self.loaded_shape = loaded_shape
        self.expected_shape = expected_shape


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into `param` (or into a slice of one), casting the dtype.
    Used for every parameter without a `weight_loader` of its own (norms, embedding, LM head)."""
    if param.shape != loaded_weight.shape:
        raise WeightShapeError(tuple(loaded_weight.shape), tuple(param.shape))
    param.data.copy_(loaded_weight)


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    """Attach loading metadata (`output_dim`, `input_dim`, `packed_dim`, `pack_factor`,
    `weight_loader`) to a parameter, where the model's `load_weights` and the layer's loader
    find it."""
    for key, value in attrs.items():
        setattr(param, key, value)


def output_slice(param: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """The view of `param` that holds output features [offset, offset + size), in the units of the
    unquantized layer, whatever dimension and packing the parameter declares.

    A parameter without `output_dim` is not split along the output (GPTQ's `g_idx` [in]): every
    shard of a fused layer carries all of it, so the whole parameter is the slot.
    """
    output_dim = getattr(param, "output_dim", None)
    if output_dim is None:
        return param.data
    if getattr(param, "packed_dim", None) == output_dim:  # e.g. qzeros: 8 outputs per int32
        offset, size = offset // param.pack_factor, size // param.pack_factor
    return param.data.narrow(output_dim, offset, size)


class LinearMethodBase(ABC):
    """How one linear layer stores its weights and computes `y = x W^T + b` from them."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        """Register the layer's weight parameters on `layer`, each with `weight_loader` and its
        `output_dim` / `input_dim` (and `packed_dim` / `pack_factor` if packed) attached.

        `input_size` is the input features this rank sees; `output_partition_sizes` the output
        features of each fused part on this rank ([q, k, v] for a QKV layer, [gate, up] for a
        merged one): a method whose groups or packing must not straddle two parts can check them.
        The bias is not the method's business: the layer creates it.
        """

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """[..., input_size] -> [..., output_size]."""


class UnquantizedLinearMethod(LinearMethodBase):
    """A plain `weight` [out, in] in the model's dtype and one `F.linear`: what `nn.Linear` does."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        # torch.empty: the checkpoint overwrites every element, so a random init is wasted work.
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size, dtype=params_dtype),  # [out, in]
            requires_grad=False,
        )
        set_weight_attrs(weight, output_dim=0, input_dim=1, weight_loader=weight_loader)
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias)


# --8<-- [start:dense_linear]
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, x [T, in] @ weight [out, in]^T, through oneDNN on CPU.

    On CPU, `F.linear` calls MKL's sgemm, which on this AMD EPYC runs 1.2-1.8x slower than
    oneDNN's matmul on the shapes of Qwen3-0.6B (one thread, T = 1..512; 2.1x for the LM head at
    T = 8; `benchmarks/profile_step.py` and docs/performance.md). vLLM's CPU backend uses oneDNN
    for the same reason. Same math, a different summation order: results differ from
    `F.linear` by float32 rounding (~1e-6), which `tests/test_linear.py` checks. Everything
    else (CUDA, float16, a 3-D input, a build without oneDNN) takes `F.linear`, the reference.
    """
    if (_ONEDNN and x.device.type == "cpu" and x.dim() == 2 and x.dtype in _ONEDNN_DTYPES
            and weight.dtype == x.dtype and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
# --8<-- [end:dense_linear]


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class QuantizationConfig(ABC):
    """A checkpoint's quantization format, as read from its config (stage 07: GPTQ's bits, group
    size, act order); it hands each linear layer the method that stores and multiplies its
    weights."""

    @abstractmethod
    def get_quant_method(self, layer: "LinearBase") -> Optional[LinearMethodBase]:
        """The method for `layer`, or None to leave it unquantized."""


class LinearBase(nn.Module):
    """`y = x W^T + b` whose weight storage belongs to `quant_method` and whose loading belongs
    to `weight_loader`. Subclasses differ only in how a checkpoint tensor maps onto the
    parameters (and, from stage 08, which slice of it this rank keeps).

    The bias is created here, never by the quant method: quantized checkpoints keep it in the
    model's dtype. It is split like the output features (`output_dim=0`).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: Optional[QuantizationConfig] = None,
        params_dtype: Optional[torch.dtype] = None,
        *,
        output_sizes: Optional[Sequence[int]] = None,
    ) -> None:
        """`output_sizes`: the sizes of the fused parts, in order (they add up to
        `output_size`); a layer that is not fused is one part."""
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        assert sum(self.output_sizes) == output_size, (self.output_sizes, output_size)
        params_dtype = params_dtype or torch.get_default_dtype()
        method = quant_config.get_quant_method(self) if quant_config is not None else None
        self.quant_method = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(
            self, input_size, self.output_sizes, params_dtype, self.weight_loader
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, output_dim=0, weight_loader=self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)  # [..., in] -> [..., out]

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None
    ) -> None:
        """A layer that is not fused takes the checkpoint tensor whole."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no fused shards, got shard id {shard_id!r}")
        default_weight_loader(param, loaded_weight)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_sizes={self.output_sizes}, "
            f"bias={self.bias is not None}, quant_method={type(self.quant_method).__name__}"
        )


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight and computes the whole output (stage 08 leaves it as it
    is: for layers too small to be worth splitting, e.g. a MoE router)."""


class ColumnParallelLinear(LinearBase):
    """Split along the output features: the columns of A in Megatron-LM's `Y = X A` (A = W^T).

        x [T, in] --(all ranks)--> rank r: y_r = x W_r^T   [T, out / tp]

    Stage 08: each rank keeps rows [r * out/tp, (r+1) * out/tp) of W (and of the bias), i.e. the
    loader narrows the checkpoint tensor along `param.output_dim` before copying. No
    communication: the next layer is a `RowParallelLinear` that consumes the split output as is
    (vLLM's `gather_output=True` option, an all-gather, is not needed by our models).

    Fused layers (`MergedColumnParallelLinear`, `QKVParallelLinear`) are column-parallel layers
    whose output is several checkpoint tensors side by side; `shard_ids` names them and
    `output_sizes` gives their sizes, in order.
    """

    shard_ids: tuple[ShardId, ...] = ()

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None
    ) -> None:
        """`shard_id=None`: the checkpoint tensor is the whole (fused) output. Otherwise it is
        one part, copied into that part's output features along `param.output_dim`.

        Stage 08: narrow `loaded_weight` along `output_dim` to this rank's share of the part,
        and take the part's offset and size per rank (`output_sizes` divided by tp).
        """
        if shard_id is None:
            default_weight_loader(param, loaded_weight)
            return
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} has shards {self.shard_ids}, not {shard_id!r}")
        i = self.shard_ids.index(shard_id)
        offset = sum(self.output_sizes[:i])
        default_weight_loader(output_slice(param, offset, self.output_sizes[i]), loaded_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers with the same input, fused into one matmul: the MLP's
    gate_proj and up_proj become `gate_up_proj` (shard ids 0 and 1).

        gate_up_proj.weight  [2 * I, hidden]
        rows [0, I)   <- gate_proj.weight (shard 0)
        rows [I, 2I)  <- up_proj.weight   (shard 1)

    Stage 08: each rank keeps its slice of *each* part ([gate_r; up_r]), not a slice of the
    concatenation, so `SiluAndMul` can still split the rank's output in two halves.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        quant_config: Optional[QuantizationConfig] = None,
        params_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(
            input_size, sum(output_sizes), bias, quant_config, params_dtype, output_sizes=output_sizes
        )


class QKVParallelLinear(ColumnParallelLinear):
    """The attention's q_proj, k_proj and v_proj fused into one matmul, `qkv_proj` (shard ids
    "q", "k", "v"). With grouped-query attention k and v have fewer heads than q::

        qkv_proj.weight  [(Hq + 2 * Hkv) * D, hidden]        D = head_size

        output row  0           Hq*D          (Hq+Hkv)*D       (Hq+2*Hkv)*D
                    |-----------|-------------|----------------|
                    |  q: Hq    |  k: Hkv     |  v: Hkv        |
                    |  heads    |  heads      |  heads         |
                    |-----------|-------------|----------------|
                     q_proj      k_proj        v_proj           <- checkpoint tensors

    The forward output splits the same way: `q, k, v = y.split([Hq*D, Hkv*D, Hkv*D], -1)`.

    Stage 08: each rank keeps Hq / tp query heads and Hkv / tp key/value heads, cut from each of
    the three blocks (so a rank's output is again q | k | v, for its own heads). When
    tp > Hkv, vLLM replicates each kv head on tp / Hkv ranks instead of splitting it.
    """

    shard_ids = ("q", "k", "v")

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: Optional[int] = None,
        bias: bool = False,
        quant_config: Optional[QuantizationConfig] = None,
        params_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.head_size = head_size
        self.num_heads = total_num_heads  # per rank from stage 08: total // tp
        self.num_kv_heads = total_num_kv_heads or total_num_heads
        q_size = self.num_heads * head_size
        kv_size = self.num_kv_heads * head_size
        super().__init__(
            hidden_size, q_size + 2 * kv_size, bias, quant_config, params_dtype,
            output_sizes=[q_size, kv_size, kv_size],
        )


class RowParallelLinear(LinearBase):
    """Split along the input features, the rows of A in `Y = X A` (A = W^T): the layer after a
    column-parallel one (o_proj after qkv_proj, down_proj after gate_up_proj).

        rank r: x_r [T, in / tp] -> y_r = x_r W_r^T [T, out]   (a partial sum)
        y = all_reduce(sum over r of y_r) + b

    Stage 08: each rank keeps columns [r * in/tp, (r+1) * in/tp) of W, i.e. the loader narrows
    the checkpoint tensor along `param.input_dim`; `forward` all-reduces the output of
    `quant_method.apply` across ranks, and the bias, which is not split, is added once (on one
    rank before the reduce, or after it) so it is not summed tp times. Today (one rank) the
    loader copies the whole tensor and `forward` is `LinearBase.forward`.
    """
