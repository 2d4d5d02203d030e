"""`FusedMoE`: a mixture-of-experts MLP (vLLM's name and weight layout), its plain reference and
its grouped fast path.

A sparse MoE block replaces the dense MLP by E small MLPs ("experts") and a router::

    router_logits = x @ W_gate^T                      [T, E]
    p             = softmax(router_logits)            [T, E]
    w, ids        = top-k(p)                          [T, k] each; w /= sum(w) if norm_topk_prob
    y[t]          = sum_j w[t, j] * Expert_{ids[t, j]}(x[t])      Expert_e = down(silu(gate) * up)

Each token runs k of the E experts, so a step's cost is set by the experts its tokens *touch*
(each touched expert's weights are read once), not by E.

Two ways to compute the sum, both in torch:

    moe_reference   the lesson: loop over the experts; for each, find its tokens
                    (`torch.where`), run its MLP (gate, up, down as three matmuls), add the
                    weighted result back. What HF transformers' eager path does.
    fused_experts   the fast path (vLLM's `fused_experts`): sort the (token, expert) pairs by
                    expert once (`moe_align`: vLLM's align / permute step), gather the tokens in
                    that order, run ONE gate|up GEMM + SiLU·mul + ONE down GEMM per non-empty
                    expert segment, scale by the routing weights, and `index_add_` the rows back
                    into token order.

The same code serves decode (one or two tokens per touched expert) and prefill (many).

Weights, stacked at load into one tensor per projection (vLLM's names), gate and up fused::

    w13_weight  [E, 2I, H]    rows [0, I) = expert e's gate_proj ("w1"), [I, 2I) = up_proj ("w3")
    w2_weight   [E, H, I]     expert e's down_proj ("w2")

With tensor parallelism (stage 08) each rank keeps a 1/tp slice of every expert's intermediate
dimension, as vLLM does by default: w13 is column-parallel (rows [r*I/tp, (r+1)*I/tp) of gate
and of up), w2 row-parallel (the same columns), and the partial outputs are summed by one
all-reduce per layer. The router is replicated. With expert parallelism
(`enable_expert_parallel`) rank r keeps experts [r*E/tp, (r+1)*E/tp) whole instead, computes
only the pairs routed to them, and the same all-reduce sums the ranks' outputs: every rank
already holds every token (attention is tensor-parallel), so no token has to travel.

A third, the engine's on CPU with custom_ops="all": `fused_experts_cpu`, the same five steps in
ONE C++ call per layer (csrc/cpu/moe.cpp), on each layer's weights re-laid at load into the
panels it streams (gate and up side by side, so SiLU·mul happens in registers). The two torch
versions stay: the lesson, and the portable fallback that tests compare the kernel against.

Left out (docs/moe.md): all-to-all dispatch/combine (EP here rides the TP all-reduce), GPTQ experts in
the C++ kernel (they take the torch grouped path, one int4 kernel call per expert segment),
shared experts (Qwen2-MoE, DeepSeek), grouped top-k (DeepSeek-V3), and vLLM's padding of each
segment to a block size (a GPU kernel's tile; our GEMMs take any segment length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from folovllm.distributed.parallel_state import (
    get_expert_parallel_rank,
    get_expert_parallel_world_size,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from folovllm.model_executor.layers.activation import SiluAndMul
from folovllm._custom_ops import load_ops, ops_available
from folovllm.model_executor.layers.cpu_gemm import dense_linear, pack_weight, weight_packing_enabled
from folovllm.model_executor.layers.linear import QuantizationConfig, WeightShapeError, set_weight_attrs
from folovllm.model_executor.layers.quantization.gptq import (
    CpuInt4Weight,
    Int4PanelWeight,
    GPTQConfig,
    gptq_matmul_reference,
    qzeros_v1_to_v2,
    select_kernel,
)


def silu_and_mul_native(x: torch.Tensor) -> torch.Tensor:
    """[n, 2I] -> [n, I]: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --8<-- [start:fused_topk]
def fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router: [T, E] logits -> (topk_weights [T, k] float32, topk_ids [T, k] int64).

    Softmax over all E experts first, then top-k: the k weights sum to less than 1 unless
    `renormalize` (Qwen3-MoE's `norm_topk_prob`) rescales them to sum to 1. Softmax in float32,
    as HF does, whatever the model's dtype.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, k] each
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids
# --8<-- [end:fused_topk]


# --8<-- [start:moe_reference]
def moe_reference(
    hidden_states: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """The lesson, one expert at a time: which tokens chose expert e (and in which of their k
    slots), e's MLP on those tokens, each result scaled by its routing weight and added to its
    token's output row."""
    out = torch.zeros_like(hidden_states)  # [T, H]
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        token_idx, slot = torch.where(topk_ids == e)  # [n], [n]: the n tokens routed to e
        if token_idx.numel() == 0:
            continue  # an expert no token chose costs nothing
        x = hidden_states[token_idx]  # [n, H]
        gate = x @ w13[e, :inter].T  # [n, I]
        up = x @ w13[e, inter:].T  # [n, I]
        y = (F.silu(gate) * up) @ w2[e].T  # [n, H]
        weight = topk_weights[token_idx, slot].to(y.dtype)  # [n]
        out.index_add_(0, token_idx, y * weight[:, None])
    return out
# --8<-- [end:moe_reference]


@dataclass
class ExpertGroups:
    """The (token, expert) pairs of a batch sorted by expert: what `moe_align` returns."""

    sorted_token_ids: torch.Tensor  # [T*k] int64: the token each sorted pair reads
    sorted_weights: torch.Tensor  # [T*k] float32: its routing weight
    expert_ids: list[int]  # the experts with at least one pair, ascending
    offsets: list[int]  # segment of expert_ids[i] = pairs [offsets[i], offsets[i+1])

    @property
    def num_experts_touched(self) -> int:
        return len(self.expert_ids)


# --8<-- [start:moe_align]
def moe_align(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Group the T*k (token, expert) pairs by expert (vLLM's `moe_align_block_size` and its
    permute step, without the padding to a GPU tile). One stable sort, one bincount::

        topk_ids [T=3, k=2]     pair p = t*k + j
          t0: [2, 0]            p0 -> e2   p1 -> e0
          t1: [0, 3]            p2 -> e0   p3 -> e3
          t2: [2, 0]            p4 -> e2   p5 -> e0

        sorted by expert (stable: token order kept inside a segment)
          expert         0  0  0 | 2  2 | 3         expert 1: no pair, no segment
          pair           1  2  5 | 0  4 | 3
          token = p // k 0  1  2 | 0  2 | 1         <- sorted_token_ids
          counts [3, 0, 2, 1] -> expert_ids [0, 2, 3], offsets [0, 3, 5, 6]

    Gathering `hidden_states[sorted_token_ids]` lays every expert's tokens out contiguously, so
    each expert is one GEMM over its segment.
    """
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat_ids, stable=True)  # [T*k] pair indices, grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # [E]
    expert_ids, offsets = [], [0]
    for e, n in enumerate(counts):
        if n:
            expert_ids.append(e)
            offsets.append(offsets[-1] + n)
    return ExpertGroups(
        sorted_token_ids=order // top_k,
        sorted_weights=topk_weights.reshape(-1)[order],
        expert_ids=expert_ids,
        offsets=offsets,
    )
# --8<-- [end:moe_align]


# --8<-- [start:gptq_expert_weight]
@dataclass
class GPTQExpertWeight:
    """One expert's projection in GPTQ's 4-bit layout (`GPTQFusedMoEMethod`): x [n, K] -> [n, N].

    `parts` are the checkpoint matrices it is made of, their outputs side by side: gate and
    up for w13 (each keeps its own g_idx: with act-order they differ), down alone for w2. Each
    part is GPTQ's four tensors (`reference`: dequantized on each call, then one matmul; it
    reads 4-bit codes from memory, and builds a float copy of the expert in the cache) or a
    `CpuInt4Weight` (`cpu_int4`: torch's int4 CPU matmul, bfloat16 models) or an
    `Int4PanelWeight` (`cpu_int4_panel`: our int4 decode kernel), as stage 07's linear layers
    choose (`select_kernel`).
    """

    parts: list  # [(qweight, qzeros v2, scales, g_idx)] or [CpuInt4Weight] or [Int4PanelWeight]
    bits: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        ys = [p.matmul(x) if isinstance(p, (CpuInt4Weight, Int4PanelWeight)) else gptq_matmul_reference(x, *p, self.bits)
              for p in self.parts]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)  # [n, N]
        return y.to(x.dtype)
# --8<-- [end:gptq_expert_weight]


def expert_linear(x: torch.Tensor, weight: "torch.Tensor | GPTQExpertWeight") -> torch.Tensor:
    """x [n, K] @ one expert's weight [N, K]^T: a float (or oneDNN-packed) tensor through
    oneDNN, or a GPTQ expert through its kernel."""
    return weight.matmul(x) if isinstance(weight, GPTQExpertWeight) else dense_linear(x, weight)


# --8<-- [start:fused_experts]
def fused_experts(
    hidden_states: torch.Tensor,  # [T, H]
    w13: Sequence[torch.Tensor],  # [E, 2I, H], or E oneDNN-packed [2I, H], or E GPTQExpertWeight
    w2: Sequence[torch.Tensor],  # [E, H, I], or E oneDNN-packed [H, I], or E GPTQExpertWeight
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    act: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul_native,
    expert_map: Optional[torch.Tensor] = None,  # [E] global id -> local id, -1 elsewhere (EP)
) -> torch.Tensor:
    """The grouped fast path, step by step:

        1. align    sort the T*k pairs by expert               (moe_align)
        2. permute  x_sorted = x[sorted_token_ids]              [T*k, H]
        3. per non-empty segment s of expert e:
               h = act(x_sorted[s] @ w13[e]^T)                  [n, 2I] -> [n, I]  gate|up fused
               y_sorted[s] = h @ w2[e]^T                        [n, H]
        4. weight   y_sorted *= sorted_weights                 (the router's weights)
        5. combine  out.index_add_(0, sorted_token_ids, y_sorted)   back in token order: each
                    token's k rows are summed into its row

    With expert parallelism (`expert_map`), step 1 first maps each pair's expert to this rank's
    slot; another rank's pairs sort after every local segment and are never gathered, so the
    rank computes only its experts' rows and the all-reduce adds the other ranks' in.

    Python loops over touched experts only (at most min(E, T*k)); each iteration is two GEMMs,
    oneDNN's (`dense_linear`), on each expert's weights packed in oneDNN's layout when the engine
    packs weights (`FusedMoE.process_weights_after_loading`): at one or two rows per expert, a
    decode step's case, that halves the GEMM's time (benchmarks/moe_layer.py).
    """
    num_local = len(w13)
    if expert_map is not None:
        # Expert parallelism: this rank holds `num_local` of the E experts. A pair routed to
        # another rank's expert gets id `num_local`, one past the last local expert, so the
        # sort puts it after every local segment; only the local pairs are gathered and run.
        local_ids = expert_map[topk_ids]  # [T, k]
        topk_ids = torch.where(local_ids < 0, num_local, local_ids)
    groups = moe_align(topk_ids, topk_weights, num_local + 1 if expert_map is not None else num_local)
    num_pairs = groups.offsets[-1]  # the pairs this rank computes: [0, num_pairs)
    if groups.expert_ids and groups.expert_ids[-1] == num_local:
        num_pairs = groups.offsets[-2]  # EP: the other ranks' pairs, sorted last, are left out
    token_ids = groups.sorted_token_ids[:num_pairs]
    x_sorted = hidden_states[token_ids]  # [pairs, H]
    y_sorted = torch.empty_like(x_sorted)  # [pairs, H]
    for i, e in enumerate(groups.expert_ids):
        if e == num_local:
            break  # other ranks' experts (EP)
        start, end = groups.offsets[i], groups.offsets[i + 1]
        h = act(expert_linear(x_sorted[start:end], w13[e]))  # [n, 2I] -> [n, I]
        y_sorted[start:end] = expert_linear(h, w2[e])  # [n, H]
    y_sorted.mul_(groups.sorted_weights[:num_pairs].to(y_sorted.dtype)[:, None])
    out = torch.zeros_like(hidden_states)  # [T, H]
    out.index_add_(0, token_ids, y_sorted)
    return out
# --8<-- [end:fused_experts]


# --8<-- [start:fused_experts_cpu]
def prepack_moe_weight(w13: torch.Tensor, w2: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """w13 [E, 2I, H], w2 [E, H, I] -> the panels `fused_experts_cpu` streams, or None where the
    kernel does not run (weight packing off, i.e. custom_ops="none"; not CPU; a dtype other than
    float32 / bfloat16; kernels that cannot be built here)::

        w13p [E, Ipad/16, H, 32]        panel p, row k: gate_{16p..16p+15}[k] | up_{16p..16p+15}[k]
        w2p  [E, ceil(H/32), Ipad, 32]  panel p, row k: down_{32p..32p+31}[k]     (Ipad = I up to 16)

    (bfloat16 rows interleave their two halves of 16, so one load yields both: csrc/cpu/moe.cpp.)
    """
    if not (weight_packing_enabled() and w13.device.type == "cpu"
            and w13.dtype in (torch.float32, torch.bfloat16) and ops_available()):
        return None
    with torch.inference_mode():
        w13p, w2p = load_ops().prepack_moe_weight(w13.detach().contiguous(), w2.detach().contiguous())
    return w13p, w2p


def fused_experts_cpu(
    hidden_states: torch.Tensor,  # [T, H] float32 or bfloat16
    w13p: torch.Tensor,  # [E, Ipad/16, H, 32] (prepack_moe_weight)
    w2p: torch.Tensor,  # [E, ceil(H/32), Ipad, 32]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    intermediate_size: int,  # I (this rank's)
    expert_map: Optional[torch.Tensor] = None,  # [E] global id -> local id, -1 elsewhere (EP)
) -> torch.Tensor:
    """`fused_experts` in one C++ call (csrc/cpu/moe.cpp): counting sort of the pairs by expert,
    gather, gate|up with SiLU·mul in the same pass, down scaled by the routing weight, combine in
    token order; float32 accumulation whatever the dtype. With expert parallelism a pair whose
    expert is another rank's gets id -1, which the kernel skips."""
    if expert_map is not None:
        topk_ids = expert_map[topk_ids]  # [T, k] local ids, -1: another rank's expert
    return load_ops().fused_experts_cpu(hidden_states, w13p, w2p, topk_weights.float(), topk_ids.long(),
                                        intermediate_size)
# --8<-- [end:fused_experts_cpu]


class FusedMoE(nn.Module):
    """The experts of one sparse MoE block (vLLM's `FusedMoE`): stacked weights, the router's
    top-k, the grouped computation, and (stage 08) the all-reduce of the split experts.

    `forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]`; the router's linear layer
    belongs to the model (`mlp.gate`), like vLLM's.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        params_dtype: Optional[torch.dtype] = None,
        prefix: str = "",
        quant_config: Optional[QuantizationConfig] = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"{prefix}: top_k={top_k} must be in 1..num_experts={num_experts}")
        self.prefix = prefix
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        # --8<-- [start:moe_partition]
        # Expert parallelism (vLLM's `enable_expert_parallel`): rank r holds experts
        # [r*E/ep, (r+1)*E/ep) whole, and the experts are not sliced (tp 1 for them). Otherwise
        # every rank holds its 1/tp slice of every expert's intermediate dimension.
        self.ep_size, self.ep_rank = get_expert_parallel_world_size(), get_expert_parallel_rank()
        self.use_ep = self.ep_size > 1
        self.tp_size = 1 if self.use_ep else get_tensor_model_parallel_world_size()
        self.tp_rank = 0 if self.use_ep else get_tensor_model_parallel_rank()
        if num_experts % self.ep_size:
            raise ValueError(f"{prefix}: enable_expert_parallel=True with tensor_parallel_size={self.ep_size} "
                             f"must divide num_experts={num_experts}: each rank holds whole experts")
        if intermediate_size % self.tp_size:
            raise ValueError(f"{prefix}: tensor_parallel_size={self.tp_size} must divide the experts' "
                             f"moe_intermediate_size={intermediate_size}")
        self.num_local_experts = num_experts // self.ep_size
        self.first_local_expert = self.ep_rank * self.num_local_experts
        # [E] global expert id -> local id on this rank, -1 for another rank's (vLLM's expert_map)
        self.expert_map: Optional[torch.Tensor] = None
        if self.use_ep:
            self.expert_map = torch.full((num_experts,), -1, dtype=torch.long)
            self.expert_map[self.first_local_expert:self.first_local_expert + self.num_local_experts] = \
                torch.arange(self.num_local_experts)
        self.intermediate_size_per_partition = intermediate_size // self.tp_size
        params_dtype = params_dtype or torch.get_default_dtype()
        # --8<-- [end:moe_partition]
        if quant_config is None:
            self.quant_method: FusedMoEMethodBase = UnquantizedFusedMoEMethod()
        elif isinstance(quant_config, GPTQConfig):
            if self.tp_size > 1:
                raise ValueError(
                    f"{prefix}: GPTQ experts with tensor_parallel_size={self.tp_size} need "
                    "enable_expert_parallel=True (each rank then holds whole experts); slicing "
                    "each expert's packed 4-bit weights across ranks is not built")
            self.quant_method = GPTQFusedMoEMethod(quant_config)
        else:
            raise ValueError(f"{prefix}: {type(quant_config).__name__} experts are not supported; "
                             "a MoE checkpoint may be float or GPTQ")
        self.quant_method.create_weights(self, params_dtype)
        for param in self.parameters(recurse=False):
            set_weight_attrs(param, weight_loader=self.weight_loader)
        self.act_fn = SiluAndMul()  # a CustomOp: our C++ kernel when custom_ops="all"
        # Each expert's weights in its kernel's layout (oneDNN's when the engine packs weights,
        # GPTQ's kernel's), set after loading; None: the stacked float tensors.
        self.w13_packed: Optional[list] = None
        self.w2_packed: Optional[list] = None
        # Or the whole layer's weights in `fused_experts_cpu`'s panels (float experts with
        # custom_ops="all"): one C++ call per layer instead of the Python loop over experts.
        self.w13_kernel: Optional[torch.Tensor] = None
        self.w2_kernel: Optional[torch.Tensor] = None
        # This layer's row [E] of the model's routing counts (`ExpertLoadRecorder`), or None:
        # nobody counts, nothing is computed (vLLM's `expert_load_view`).
        self.expert_load_view: Optional[torch.Tensor] = None

    def process_weights_after_loading(self) -> None:
        """Lay each expert's weights out for its kernel (`quant_method`)."""
        self.quant_method.process_weights_after_loading(self)

    # Checkpoint projection name -> vLLM's shard id.
    CKPT_SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    # Checkpoint projection -> (stacked parameter prefix, slot along dim 1 for GPTQ's parts).
    SHARD_SLOTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}

    # --8<-- [start:moe_weight_loader]
    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: str, expert_id: int
    ) -> None:
        """Put one expert's checkpoint tensor into its slot of the stacked parameter::

            mlp.experts.{e}.gate_proj.weight [I, H]  (w1) -> w13_weight[e, 0:I/tp]     rank's rows
            mlp.experts.{e}.up_proj.weight   [I, H]  (w3) -> w13_weight[e, I/tp:2I/tp]
            mlp.experts.{e}.down_proj.weight [H, I]  (w2) -> w2_weight[e]              rank's columns

        Rank r keeps intermediate features [r * I/tp, (r+1) * I/tp) of each expert: rows of
        gate and up (column-parallel), columns of down (row-parallel). With expert parallelism
        it keeps its own experts whole and skips the others' tensors.
        """
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"{self.prefix}: expert {expert_id} is out of range: the config has "
                             f"num_experts={self.num_experts}")
        expert_id -= self.first_local_expert  # global -> this rank's slot (EP; 0 offset otherwise)
        if not 0 <= expert_id < self.num_local_experts:
            return  # another rank's expert
        if not isinstance(self.quant_method, UnquantizedFusedMoEMethod):  # GPTQ's four tensors
            self.quant_method.load_expert_tensor(param, loaded_weight, shard_id, expert_id)
            return
        inter, full = self.intermediate_size_per_partition, self.intermediate_size
        start = self.tp_rank * inter
        if shard_id in ("w1", "w3"):
            if tuple(loaded_weight.shape) != (full, self.hidden_size):
                raise WeightShapeError(tuple(loaded_weight.shape), (full, self.hidden_size))
            offset = 0 if shard_id == "w1" else inter
            param.data[expert_id, offset:offset + inter].copy_(loaded_weight[start:start + inter])
        elif shard_id == "w2":
            if tuple(loaded_weight.shape) != (self.hidden_size, full):
                raise WeightShapeError(tuple(loaded_weight.shape), (self.hidden_size, full))
            param.data[expert_id].copy_(loaded_weight[:, start:start + inter])
        else:
            raise ValueError(f"FusedMoE has shards w1, w2, w3, not {shard_id!r}")
    # --8<-- [end:moe_weight_loader]

    def checkpoint_names(self, prefix: str) -> dict[str, list[str]]:
        """The HF checkpoint tensors that fill each stacked parameter of the experts at
        `prefix` (`model.layers.1.mlp.experts`): {"...w13_weight": [...gate_proj.weight,
        up_proj.weight of each expert], "...w2_weight": [...down_proj.weight of each expert]};
        for GPTQ experts the same with `w13_qweight` <- `gate_proj.qweight`, and so on."""
        names = {}
        for param_name, _ in self.named_parameters(recurse=False):
            stacked, key = param_name.split("_", 1)  # "w13", "qweight"
            projs = ("gate_proj", "up_proj") if stacked == "w13" else ("down_proj",)
            names[f"{prefix}.{param_name}"] = [f"{prefix}.{e}.{p}.{key}" for e in range(self.num_experts)
                                               for p in projs]
        return names

    # `model.layers.3.mlp.experts.17.up_proj.qweight` -> ("model.layers.3.mlp.experts", 17,
    # "up_proj", "qweight"); the key is `weight` in a float checkpoint, GPTQ's four in a GPTQ one
    CKPT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\."
                           r"(weight|qweight|qzeros|scales|g_idx)$")

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], router_logits [T, E] -> [T, H] (summed over ranks)."""
        topk_weights, topk_ids = fused_topk(router_logits, self.top_k, self.renormalize)
        if self.expert_load_view is not None:  # tokens routed to each expert, this step
            self.expert_load_view += torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)
        if self.w13_kernel is not None:  # the whole layer in one C++ call
            out = fused_experts_cpu(hidden_states, self.w13_kernel, self.w2_kernel, topk_weights, topk_ids,
                                    self.intermediate_size_per_partition, expert_map=self.expert_map)
            return tensor_model_parallel_all_reduce(out)
        w13 = self.w13_weight if self.w13_packed is None else self.w13_packed
        w2 = self.w2_weight if self.w2_packed is None else self.w2_packed
        # TP: partial sums of every expert's slice; EP: whole results of this rank's experts.
        # Either way each token's output is the sum over ranks: one all-reduce.
        out = fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, act=self.act_fn,
                            expert_map=self.expert_map)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, renormalize={self.renormalize}, "
                f"tp_size={self.tp_size}, ep_size={self.ep_size}")


# --8<-- [start:expert_load_recorder]
class ExpertLoadRecorder:
    """Counts the tokens routed to each expert of each MoE layer (vLLM's EPLB
    `expert_load_pass`), for the engine's per-step record (`SchedulerStats.expert_load`)::

        expert_load_pass  [L, E] int64    L = the model's FusedMoE layers, in order
        layer i's FusedMoE.expert_load_view = expert_load_pass[i]   (a view: += writes here)

    Each layer adds one `bincount` of its top-k ids per forward pass (T*k ints: nothing next
    to its GEMMs); `take()` hands the counts since the last take to the executor once per
    call and starts again from zero. A dense model gets `NoExpertLoadRecorder`: no buffer, no
    bincount, `take()` is None. Every rank routes every token (the router is replicated, under
    TP and EP alike), so rank 0's counts are the whole batch's.
    """

    def __init__(self, layers: list[FusedMoE]) -> None:
        device = next(layers[0].parameters()).device
        self.expert_load_pass = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.int64,
                                            device=device)  # [L, E]
        for i, layer in enumerate(layers):
            layer.expert_load_view = self.expert_load_pass[i]

    @staticmethod
    def for_model(model: nn.Module) -> "ExpertLoadRecorder | NoExpertLoadRecorder":
        layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        return ExpertLoadRecorder(layers) if layers else NoExpertLoadRecorder()

    def take(self) -> Optional[torch.Tensor]:
        """-> [L, E] int64 on the CPU: tokens routed to each expert since the last take."""
        counts = self.expert_load_pass.cpu().clone()
        self.expert_load_pass.zero_()
        return counts
# --8<-- [end:expert_load_recorder]


class NoExpertLoadRecorder:
    """A dense model's recorder: nothing to count."""

    def take(self) -> None:
        return None


# -- how the experts store their weights (vLLM's FusedMoEMethodBase and its subclasses) ---------


class FusedMoEMethodBase:
    """Creates a `FusedMoE`'s stacked parameters and lays them out for a kernel after loading."""

    def create_weights(self, layer: FusedMoE, params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        raise NotImplementedError


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """Float experts: `w13_weight [E/ep, 2I/tp, H]`, `w2_weight [E/ep, H, I/tp]`."""

    def create_weights(self, layer: FusedMoE, params_dtype: torch.dtype) -> None:
        E, H, inter = layer.num_local_experts, layer.hidden_size, layer.intermediate_size_per_partition
        # torch.empty: the checkpoint overwrites every element.
        layer.w13_weight = nn.Parameter(torch.empty(E, 2 * inter, H, dtype=params_dtype), requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(E, H, inter, dtype=params_dtype), requires_grad=False)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        """With weight packing on (custom_ops="all" on CPU, `cpu_gemm.weight_packing`), re-lay
        the layer's w13 and w2 in the panels of `fused_experts_cpu` (float32, bfloat16), else
        each expert's in oneDNN's blocked layout, one tensor per expert; then drop the stacked
        copies (same bytes, not twice). A no-op otherwise."""
        packed = prepack_moe_weight(layer.w13_weight, layer.w2_weight)
        if packed is not None:
            layer.w13_kernel, layer.w2_kernel = packed
            for name in ("w13_weight", "w2_weight"):
                setattr(layer, name, nn.Parameter(torch.empty(0, dtype=packed[0].dtype), requires_grad=False))
            return
        w13 = [pack_weight(layer.w13_weight[e]) for e in range(layer.num_local_experts)]
        if any(w is None for w in w13):
            return
        layer.w13_packed = w13
        layer.w2_packed = [pack_weight(layer.w2_weight[e]) for e in range(layer.num_local_experts)]
        for name in ("w13_weight", "w2_weight"):  # an empty stand-in keeps the parameter's name
            setattr(layer, name, nn.Parameter(torch.empty(0, dtype=layer.w13_packed[0].dtype), requires_grad=False))


# --8<-- [start:gptq_fused_moe_method]
class GPTQFusedMoEMethod(FusedMoEMethodBase):
    """GPTQ experts in the layout GPTQModel writes: each expert's gate, up and down is its own
    GPTQ linear layer (`...experts.{e}.gate_proj.{qweight,qzeros,scales,g_idx}`; stage 07's
    format), stacked at load, vLLM's parameter names (P = 32 / bits, G = group size)::

        w13_qweight  int32 [E, 2, H/P, I]    slot 0 = gate_proj, 1 = up_proj (each keeps its
        w13_qzeros   int32 [E, 2, H/G, I/P]  own groups and g_idx: act-order orders differ)
        w13_scales         [E, 2, H/G, I]
        w13_g_idx    int32 [E, 2, H]
        w2_qweight   int32 [E, I/P, H]       down_proj
        w2_qzeros    int32 [E, I/G, H/P]
        w2_scales          [E, I/G, H]
        w2_g_idx     int32 [E, I]

    After loading, v1 zeros become real zeros (`qzeros_v1_to_v2`) and each expert becomes two
    `GPTQExpertWeight`s on the kernel stage 07 would pick for a layer of that shape: the grouped
    path (`fused_experts`) is unchanged, only its per-segment matmul reads 4-bit weights. The
    router (`mlp.gate`) stays float, as GPTQModel leaves it. Whole experts only: tensor
    parallelism needs expert parallelism with GPTQ experts.
    """

    def __init__(self, quant_config: GPTQConfig) -> None:
        self.quant_config = quant_config

    def create_weights(self, layer: FusedMoE, params_dtype: torch.dtype) -> None:
        cfg, E, H, inter = self.quant_config, layer.num_local_experts, layer.hidden_size, layer.intermediate_size
        pf = cfg.pack_factor
        for size in (H, inter):
            if size % pf or (cfg.group_size != -1 and size % cfg.group_size):
                raise ValueError(f"{layer.prefix}: GPTQ bits={cfg.bits}, group_size={cfg.group_size} "
                                 f"must divide the experts' input size {size} (hidden_size, moe_intermediate_size)")
        groups = {H: 1 if cfg.group_size == -1 else H // cfg.group_size,
                  inter: 1 if cfg.group_size == -1 else inter // cfg.group_size}

        def param(*shape: int, dtype: torch.dtype = torch.int32) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

        layer.w13_qweight = param(E, 2, H // pf, inter)
        layer.w13_qzeros = param(E, 2, groups[H], inter // pf)
        layer.w13_scales = param(E, 2, groups[H], inter, dtype=params_dtype)
        layer.w13_g_idx = param(E, 2, H)
        layer.w2_qweight = param(E, inter // pf, H)
        layer.w2_qzeros = param(E, groups[inter], H // pf)
        layer.w2_scales = param(E, groups[inter], H, dtype=params_dtype)
        layer.w2_g_idx = param(E, inter)

    @staticmethod
    def load_expert_tensor(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: str, expert_id: int) -> None:
        """One expert's GPTQ tensor (`gate_proj.qweight`, ...) into its slot of the stacked one."""
        stacked, slot = FusedMoE.SHARD_SLOTS[shard_id]
        target = param.data[expert_id, slot] if stacked == "w13" else param.data[expert_id]
        if tuple(loaded_weight.shape) != tuple(target.shape):
            raise WeightShapeError(tuple(loaded_weight.shape), tuple(target.shape))
        target.copy_(loaded_weight)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        cfg = self.quant_config
        if cfg.checkpoint_format == "gptq":
            layer.w13_qzeros.data = qzeros_v1_to_v2(layer.w13_qzeros.data, cfg.bits)
            layer.w2_qzeros.data = qzeros_v1_to_v2(layer.w2_qzeros.data, cfg.bits)
        for g_idx, scales in ((layer.w13_g_idx, layer.w13_scales), (layer.w2_g_idx, layer.w2_scales)):
            if g_idx.numel() and not 0 <= int(g_idx.min()) <= int(g_idx.max()) < scales.shape[-2]:
                raise ValueError(f"{layer.prefix}: a g_idx of the GPTQ experts points outside its "
                                 f"{scales.shape[-2]} groups")
        H, inter = layer.hidden_size, layer.intermediate_size
        dtype, device = layer.w13_scales.dtype, layer.w13_scales.device
        kernels = {"w13": select_kernel(cfg, device, dtype, H, inter),
                   "w2": select_kernel(cfg, device, dtype, inter, H)}

        def part(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 kernel: str) -> Any:
            if kernel == "cpu_int4":
                return CpuInt4Weight.from_gptq(qweight, qzeros, scales, g_idx)
            if kernel == "cpu_int4_panel":
                return Int4PanelWeight.from_gptq(qweight, qzeros, scales, g_idx)
            return (qweight, qzeros, scales, g_idx)  # reference (triton: not for experts yet)

        layer.w13_packed = [
            GPTQExpertWeight([part(layer.w13_qweight[e, s], layer.w13_qzeros[e, s], layer.w13_scales[e, s],
                                   layer.w13_g_idx[e, s], kernels["w13"]) for s in (0, 1)], cfg.bits)
            for e in range(layer.num_local_experts)]
        layer.w2_packed = [
            GPTQExpertWeight([part(layer.w2_qweight[e], layer.w2_qzeros[e], layer.w2_scales[e],
                                   layer.w2_g_idx[e], kernels["w2"])], cfg.bits)
            for e in range(layer.num_local_experts)]
        self.kernels = kernels
        # the int4 layout replaces the checkpoint's (cpu_int4_panel's keeps them for now: the
        # expert-parallel checks read each rank's checkpoint shapes; an eighth of float32 extra)
        if set(kernels.values()) == {"cpu_int4"}:
            for name, _ in list(layer.named_parameters(recurse=False)):
                setattr(layer, name, nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False))
# --8<-- [end:gptq_fused_moe_method]
