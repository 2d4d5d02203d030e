"""Lab 08: tensor parallelism: which slice of a weight each rank keeps, and the all-reduce.

Fill in the three methods below; `FOLOVLLM_LAB=starter pytest stages/08` grades them (they replace
`ColumnParallelLinear.weight_loader`, `RowParallelLinear.weight_loader` and
`RowParallelLinear.forward` of `folovllm/model_executor/layers/linear.py` while stage 08's tests
run in the test process; the tensor-parallel worker processes the engine starts import the
engine's own code). Read labs/08/README.md first.

    ColumnParallelLinear  rows of W (output features) [r * out/tp, (r+1) * out/tp), per fused part
    RowParallelLinear     columns of W (input features) [r * in/tp, (r+1) * in/tp); all-reduce after

`self` is the layer: `self.tp_size`, `self.tp_rank`, `self.input_size`,
`self.input_size_per_partition`, `self.output_sizes` (the fused parts, whole),
`self.output_partition_sizes` (the parts on this rank), `self.shard_ids`, `self.shard_rank(id)`,
`self.quant_method`, `self.bias`. The helpers below are the engine's: use them.
"""

from __future__ import annotations

from typing import Optional

import torch

from folovllm.model_executor.layers import linear  # noqa: F401  (linear.tensor_model_parallel_all_reduce)
from folovllm.model_executor.layers.linear import (  # noqa: F401
    ShardId,
    check_full_size,
    default_weight_loader,
    narrow_along,
    output_slice,
)

# The engine functions these replace (module:Class.method).
REPLACES = {
    "column_weight_loader": "folovllm.model_executor.layers.linear:ColumnParallelLinear.weight_loader",
    "row_weight_loader": "folovllm.model_executor.layers.linear:RowParallelLinear.weight_loader",
    "forward": "folovllm.model_executor.layers.linear:RowParallelLinear.forward",
}


def column_weight_loader(
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
    # TODO 1: a fused tensor saved whole (no shard id, several parts, tp > 1): check its full
    #         size (`check_full_size(param, "output_dim", loaded_weight, self.output_size)`), cut
    #         it into its parts (`narrow_along(loaded_weight, param, "output_dim", offset, size)`)
    #         and load each part as a shard (`self.weight_loader(param, part, shard_id)`).
    # TODO 2: no shard id otherwise: one rank copies the tensor whole (`default_weight_loader`);
    #         with tp > 1 it is part 0. A shard id: its part is `self.shard_ids.index(shard_id)`
    #         (an unknown id: ValueError).
    # TODO 3: with tp > 1, check the part's full size, then keep this rank's slice of it: slice
    #         number `self.shard_rank(shard_id)` of `self.output_partition_sizes[part]` features.
    # TODO 4: copy it where that part starts on this rank: `default_weight_loader(
    #         output_slice(param, offset, size), loaded_weight)`.
    raise NotImplementedError("not implemented: see labs/08/README.md")


def row_weight_loader(
    self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None
) -> None:
    """Rank r keeps input features [r * in/tp, (r+1) * in/tp) of a parameter with an
    `input_dim`; the bias (no input_dim) is copied whole."""
    # TODO 1: a row-parallel layer has no fused shards: a shard id is a ValueError.
    # TODO 2: with tp > 1, check the full input size, then narrow the tensor to this rank's
    #         input features (`narrow_along(..., "input_dim", ...)` leaves the bias whole).
    # TODO 3: copy it (`default_weight_loader`).
    raise NotImplementedError("not implemented: see labs/08/README.md")


def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x_r [T, in / tp] -> [T, out], the same on every rank."""
    # TODO 1: this rank's partial product: `self.quant_method.apply(self, x, bias)`. The bias is
    #         not split: add it on one rank only, or the sum adds it tp times.
    # TODO 2: sum the partial products of all ranks: `linear.tensor_model_parallel_all_reduce`
    #         (look it up on the module when you call it: the tests replace it there).
    raise NotImplementedError("not implemented: see labs/08/README.md")
