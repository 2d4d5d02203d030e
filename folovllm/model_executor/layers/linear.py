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

The classes and their names are vLLM's. Each layer reads the tensor-parallel size and rank
from `distributed/parallel_state.py` when it is built (1 and 0 without stage 08, where the
loaders copy whole tensors, or one fused shard into its rows) and keeps only its rank's slice:

    ColumnParallelLinear  rows of W (output features) [r * out/tp, (r+1) * out/tp), per fused part
    RowParallelLinear     columns of W (input features) [r * in/tp, (r+1) * in/tp); all-reduce after
    ReplicatedLinear      all of W on every rank

The token embedding and the LM head split the vocabulary instead
(`layers/vocab_parallel_embedding.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from folovllm.distributed.parallel_state import (
    divide,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from folovllm.model_executor.layers.cpu_gemm import dense_linear, pack_linear_weight

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


def check_weight_dtype(name: str, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """A floating-point parameter takes floating-point checkpoint values only: `copy_` would
    cast int32 or bool values silently (a corrupt or mislabelled checkpoint then generated
    garbage). Integer parameters are not checked: GPTQ's qweight, qzeros and g_idx are int32 by
    design, and their loaders check their shapes."""
    if param.is_floating_point() and not loaded_weight.is_floating_point():
        raise ValueError(f"checkpoint tensor {name!r} has dtype {loaded_weight.dtype}, expected a "
                         f"floating-point dtype (the model's parameter is {param.dtype})")


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    """Attach loading metadata (`output_dim`, `input_dim`, `packed_dim`, `pack_factor`,
    `weight_loader`) to a parameter, where the model's `load_weights` and the layer's loader
    find it."""
    for key, value in attrs.items():
        setattr(param, key, value)


def narrow_along(
    tensor: torch.Tensor, param: torch.Tensor, dim_attr: str, offset: int, size: int
) -> torch.Tensor:
    """The view of `tensor` (a parameter or a checkpoint tensor laid out like it) that holds
    features [offset, offset + size) along the dimension `param` declares as `dim_attr`
    ("output_dim" or "input_dim"), in the units of the unquantized layer, whatever packing the
    parameter declares.

    A parameter without that dimension is not split along it (GPTQ's `g_idx` [in] has no
    output_dim; a row-parallel bias has no input_dim): the whole tensor is the slice.
    """
    dim = getattr(param, dim_attr, None)
    if dim is None:
        return tensor
    if getattr(param, "packed_dim", None) == dim:  # e.g. qzeros: 8 outputs per int32
        offset, size = offset // param.pack_factor, size // param.pack_factor
    return tensor.narrow(dim, offset, size)


def check_full_size(param: torch.Tensor, dim_attr: str, loaded_weight: torch.Tensor, size: int) -> None:
    """Before a rank cuts its slice: the checkpoint tensor must hold all `size` features along
    `dim_attr` (or a narrower tensor would silently give this rank the wrong slice)."""
    dim = getattr(param, dim_attr, None)
    if dim is None:
        return
    if getattr(param, "packed_dim", None) == dim:
        size //= param.pack_factor
    if loaded_weight.dim() <= dim or loaded_weight.shape[dim] != size:
        expected = list(param.shape)
        expected[dim] = size
        raise WeightShapeError(tuple(loaded_weight.shape), tuple(expected))


def output_slice(param: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """The view of `param` that holds output features [offset, offset + size)."""
    return narrow_along(param.data, param, "output_dim", offset, size)


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

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once by the loader after every checkpoint tensor is in place (vLLM's hook): a
        quant method checks what was loaded and re-lays it out for its kernel (stage 07's GPTQ
        repacks for torch's int4 CPU matmul). Nothing to do for plain weights."""


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

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """On CPU, the GEMM this weight will use (vLLM's `dispatch_cpu_unquantized_gemm`):
        oneDNN's packed layout when weight packing is on (`cpu_gemm.py`)."""
        pack_linear_weight(layer)




class QuantizationConfig(ABC):
    """A checkpoint's quantization format, as read from its config (stage 07: GPTQ's bits, group
    size, act order); it hands each linear layer the method that stores and multiplies its
    weights."""

    @abstractmethod
    def get_quant_method(self, layer: "LinearBase") -> Optional[LinearMethodBase]:
        """The method for `layer`, or None to leave it unquantized."""

    def skips_checkpoint_tensor(self, name: str) -> bool:
        """True for a tensor this format's writers add that the model has no parameter for
        (the loader then skips it instead of refusing the checkpoint)."""
        return False


class LinearBase(nn.Module):
    """`y = x W^T + b` whose weight storage belongs to `quant_method` and whose loading belongs
    to `weight_loader`. Subclasses differ only in how a checkpoint tensor maps onto the
    parameters (and, from stage 08, which slice of it this rank keeps).

    The bias is created here, never by the quant method: quantized checkpoints keep it in the
    model's dtype. It is split like the output features (`output_dim=0`).

    Sizes on this rank: `input_size_per_partition` and `output_partition_sizes` (one per fused
    part); `partition()` is where each subclass says how it splits (stage 08).
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
        prefix: str = "",
    ) -> None:
        """`output_sizes`: the sizes of the fused parts, in order (they add up to
        `output_size`); a layer that is not fused is one part. `prefix`: the layer's name in
        the model (`model.layers.0.mlp.down_proj`, vLLM's), for errors that must name it."""
        super().__init__()
        self.prefix = prefix
        self.input_size = input_size
        self.output_size = output_size
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        assert sum(self.output_sizes) == output_size, (self.output_sizes, output_size)
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.input_size_per_partition, self.output_partition_sizes = self.partition()
        params_dtype = params_dtype or torch.get_default_dtype()
        method = quant_config.get_quant_method(self) if quant_config is not None else None
        self.quant_method = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(
            self, self.input_size_per_partition, self.output_partition_sizes, params_dtype,
            self.weight_loader,
        )
        if bias:
            out = sum(self.output_partition_sizes)
            self.bias = nn.Parameter(torch.empty(out, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, output_dim=0, weight_loader=self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def partition(self) -> tuple[int, list[int]]:
        """(input features, [output features of each fused part]) this rank holds. Replicated:
        everything."""
        return self.input_size, list(self.output_sizes)

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
            f"bias={self.bias is not None}, quant_method={type(self.quant_method).__name__}, "
            f"tp_size={self.tp_size}"
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
    (vLLM's `gather_output=True` option, an all-gather, is not needed by our models). A fused
    layer splits each part, so rank r holds [part0_r | part1_r | ...].

    Fused layers (`MergedColumnParallelLinear`, `QKVParallelLinear`) are column-parallel layers
    whose output is several checkpoint tensors side by side; `shard_ids` names them and
    `output_sizes` gives their sizes, in order.
    """

    shard_ids: tuple[ShardId, ...] = ()

    def partition(self) -> tuple[int, list[int]]:
        return self.input_size, [divide(size, self.tp_size) for size in self.output_sizes]

    def shard_rank(self, shard_id: Optional[ShardId]) -> int:
        """Which 1/tp slice of a part this rank holds (QKV overrides it for replicated kv heads)."""
        return self.tp_rank

    # --8<-- [start:column_weight_loader]
    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None
    ) -> None:
        """`shard_id=None`: the checkpoint tensor is the whole (fused) output. Otherwise it is
        one part, copied into that part's output features along `param.output_dim`.

        Rank r takes slice `shard_rank` of the part (size = the part's size / tp) and puts it at
        the part's offset *on this rank*::

            checkpoint k_proj [Hkv*D, in]         rank 1's qkv_proj.weight [(Hq+2Hkv)/2 * D, in]
            |  k heads of rank 0 |                 | q_1 | k_1 | v_1 |
            |  k heads of rank 1 | --narrow-->           ^ offset = q_size / tp
        """
        if shard_id is None and len(self.output_sizes) > 1 and self.tp_size > 1:
            # A fused tensor saved whole: each rank needs its slice of every part.
            check_full_size(param, "output_dim", loaded_weight, self.output_size)
            for i, part_id in enumerate(self.shard_ids):
                offset = sum(self.output_sizes[:i])
                part = narrow_along(loaded_weight, param, "output_dim", offset, self.output_sizes[i])
                self.weight_loader(param, part, part_id)
            return
        if shard_id is None:
            if self.tp_size == 1:
                default_weight_loader(param, loaded_weight)
                return
            part = 0
        elif shard_id in self.shard_ids:
            part = self.shard_ids.index(shard_id)
        else:
            raise ValueError(f"{type(self).__name__} has shards {self.shard_ids}, not {shard_id!r}")
        size = self.output_partition_sizes[part]  # the part's features on this rank
        if self.tp_size > 1:
            check_full_size(param, "output_dim", loaded_weight, self.output_sizes[part])
            start = self.shard_rank(shard_id) * size
            loaded_weight = narrow_along(loaded_weight, param, "output_dim", start, size)
        offset = sum(self.output_partition_sizes[:part])
        default_weight_loader(output_slice(param, offset, size), loaded_weight)
    # --8<-- [end:column_weight_loader]


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
        prefix: str = "",
    ) -> None:
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(
            input_size, sum(output_sizes), bias, quant_config, params_dtype, output_sizes=output_sizes,
            prefix=prefix,
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
    tp > Hkv, each kv head is replicated on tp / Hkv ranks instead of split (as in vLLM)::

        Hq=4, Hkv=2, tp=4    rank    0    1    2    3
                             q       q0   q1   q2   q3
                             k, v    kv0  kv0  kv1  kv1    (num_kv_head_replicas = 2)

    `num_heads` / `num_kv_heads` are the heads of this rank.
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
        prefix: str = "",
    ) -> None:
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tensor_model_parallel_world_size()
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= self.total_num_kv_heads:  # fewer kv heads than ranks: replicate them
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, self.total_num_kv_heads)
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        q_size = total_num_heads * head_size
        kv_size = self.total_num_kv_heads * head_size
        super().__init__(
            hidden_size, q_size + 2 * kv_size, bias, quant_config, params_dtype,
            output_sizes=[q_size, kv_size, kv_size], prefix=prefix,
        )

    def partition(self) -> tuple[int, list[int]]:
        kv = self.num_kv_heads * self.head_size
        return self.input_size, [self.num_heads * self.head_size, kv, kv]

    def shard_rank(self, shard_id: Optional[ShardId]) -> int:
        return self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas


class RowParallelLinear(LinearBase):
    """Split along the input features, the rows of A in `Y = X A` (A = W^T): the layer after a
    column-parallel one (o_proj after qkv_proj, down_proj after gate_up_proj).

        rank r: x_r [T, in / tp] -> y_r = x_r W_r^T [T, out]   (a partial sum)
        y = all_reduce(sum over r of y_r) + b

    Stage 08: each rank keeps columns [r * in/tp, (r+1) * in/tp) of W, i.e. the loader narrows
    the checkpoint tensor along `param.input_dim`; `forward` all-reduces the output of
    `quant_method.apply` across ranks, and the bias, which is not split, is added once (on one
    rank before the reduce, or after it) so it is not summed tp times. With one rank the loader
    copies the whole tensor and the all-reduce does nothing.
    """

    def partition(self) -> tuple[int, list[int]]:
        return divide(self.input_size, self.tp_size), list(self.output_sizes)

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None
    ) -> None:
        """Rank r keeps input features [r * in/tp, (r+1) * in/tp) of a parameter with an
        `input_dim`; the bias (no input_dim) is copied whole."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no fused shards, got shard id {shard_id!r}")
        if self.tp_size > 1:
            check_full_size(param, "input_dim", loaded_weight, self.input_size)
            size = self.input_size_per_partition
            loaded_weight = narrow_along(loaded_weight, param, "input_dim", self.tp_rank * size, size)
        default_weight_loader(param, loaded_weight)

    # --8<-- [start:row_forward]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_r [T, in / tp] -> [T, out], the same on every rank."""
        bias = self.bias if self.tp_rank == 0 else None  # added once, not tp times
        partial = self.quant_method.apply(self, x, bias)  # [T, out], this rank's share of the sum
        return tensor_model_parallel_all_reduce(partial)
    # --8<-- [end:row_forward]
