"""Our GPTQ quantizer (Frantar et al., 2022): float checkpoint in, GPTQModel-format checkpoint out.

    folovllm quantize MODEL OUT --bits 4 --group-size 128 [--desc-act] [--asym]

Round-to-nearest (RTN) rounds each weight on its own. GPTQ rounds the input columns of a layer
one at a time and, after each, changes the columns not yet rounded so the layer's *output* on
calibration inputs X moves as little as possible. For one output row w (the rows are independent
and share X) the loss is the output error

    L(w') = || w X - w' X ||^2 = (w - w') H (w - w')^T,    H = 2 X X^T / n    [K, K]

Rounding column q turns its error into e_q = w_q - round(w_q); the best change of the remaining
columns F (Optimal Brain Surgeon, with H_F^-1 the inverse Hessian over F) is

    delta_F = - e_q / [H_F^-1]_qq * [H_F^-1]_q,F

GPTQ's three tricks make this fast and stable:

1. a fixed column order (left to right, or act-order: by decreasing diag(H), the inputs that
   carry the most energy first), the same for every row, so all rows update together;
2. the rows of H_F^-1 it needs are the rows of the upper Cholesky factor U of H^-1
   (H^-1 = U^T U), scaled: compute U once (with damping, `damp * mean(diag H)` added to the
   diagonal so H is safely positive definite) and never invert again;
3. lazy batches: update the columns inside a block of 128 at once, and the rest of the matrix
   once per block with one matmul (Err [N, B] @ U[block, rest]): the same result, far fewer
   memory passes.

Groups: a group's scale and zero are chosen (min-max) when the sweep reaches its first column,
from the weights *as updated so far*. Layers are quantized decoder block by decoder block: the
calibration inputs of block l come from blocks < l already quantized (GPTQ's sequential order).
Within a block, all four matmuls see the float block's inputs (GPTQModel's `true_sequential`,
which re-runs the block after each matmul, is left out). The LM head and embeddings stay float,
and so does a MoE router; each expert is calibrated on the tokens routed to it
(`ExpertCalibration`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from folovllm.model_executor.layers.attention import Attention, AttentionMetadata
from folovllm.model_executor.layers.fused_moe import FusedMoE, fused_topk
from folovllm.model_executor.layers.linear import LinearBase
from folovllm.model_executor.layers.quantization import get_quant_config
from folovllm.model_executor.layers.quantization.gptq import (
    GPTQConfig,
    dequantize_gptq,
    pack_int32,
    qzeros_v1_to_v2,
    qzeros_v2_to_v1,
)
from folovllm.model_executor.model_loader import iterate_checkpoint, load_model, resolve_model_path

QUANTIZE_METHODS = ("gptq", "rtn")  # `folovllm quantize --method`


@dataclass
class QuantizedWeight:
    """One [N, K] weight as GPTQ stores it, plus what it dequantizes to."""

    codes: torch.Tensor  # int [K, N] in [0, 2^bits)
    scales: torch.Tensor  # float16 [groups, N]
    zeros: torch.Tensor  # int [groups, N], real zeros (v2 convention)
    g_idx: torch.Tensor  # int32 [K]
    dequantized: torch.Tensor  # float32 [N, K]: exactly what a loader rebuilds from the above


# --8<-- [start:minmax]
def minmax_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of the grid that spans w's [min, max] (and 0): w [N, G] ->
    scale float32 [N] (already rounded to float16, as stored), zero int64 [N]."""
    maxq = 2**bits - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    if sym:  # a grid symmetric around 0: zero sits in the middle, (maxq + 1) / 2
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = ((hi - lo) / maxq).half().float()  # the checkpoint stores float16 scales
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq).long()
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes, dequantized) of w [N] on the grid (scale, zero) [N]."""
    codes = (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)
    return codes.long(), (codes - zero) * scale
# --8<-- [end:minmax]


class GPTQ:
    """The GPTQ state of one weight: its Hessian, accumulated over calibration batches."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach().float()  # [N, K]
        K = self.weight.shape[1]
        self.H = torch.zeros(K, K, dtype=torch.float64)
        self.num_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x [T, K] inputs of the layer. Keeps H = 2/n sum x x^T as a running mean."""
        x = x.reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        self.H *= self.num_samples / (self.num_samples + n)
        self.num_samples += n
        x = math.sqrt(2 / self.num_samples) * x
        self.H += x.t() @ x

    # --8<-- [start:gptq_quantize]
    def quantize(
        self, bits: int, group_size: int, sym: bool, desc_act: bool,
        damp: float = 0.01, block_size: int = 128,
    ) -> QuantizedWeight:
        W = self.weight.clone()  # [N, K], rounded column by column in place
        N, K = W.shape
        H = self.H.clone().float()
        dead = torch.diag(H) == 0  # inputs that were always 0: any weight is exact there
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = torch.argsort(torch.diag(H), descending=True, stable=True) if desc_act else torch.arange(K)
        W, H = W[:, perm], H[perm][:, perm]  # visit the columns in `perm` order
        H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
        # U: upper Cholesky factor of H^-1. Row q of U (from q on) is the inverse Hessian row
        # the OBS update needs after columns < q are fixed, divided by sqrt([H_F^-1]_qq) = U[q,q].
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        group = K if group_size == -1 else group_size
        if group < K:  # blocks made of whole groups, so a group's grid sees its current weights
            block_size = max(block_size // group, 1) * group
        codes = torch.zeros(N, K, dtype=torch.long)
        scales, zeros = [], []
        for b0 in range(0, K, block_size):
            b1 = min(b0 + block_size, K)
            W1 = W[:, b0:b1].clone()  # this block, updated column by column
            Err = torch.zeros_like(W1)
            for i in range(b1 - b0):
                q = b0 + i
                if q % group == 0:  # a new group: its grid from the weights as they are now
                    ahead = torch.cat([W1[:, i:], W[:, b1:]], 1)[:, :group]
                    scale, zero = minmax_params(ahead, bits, sym)
                    scales.append(scale)
                    zeros.append(zero)
                c, deq = quantize_column(W1[:, i], scale, zero, bits)
                codes[:, q] = c
                err = (W1[:, i] - deq) / U[q, q]  # [N]
                W1[:, i:] -= err[:, None] * U[q, q:b1][None, :]  # OBS update inside the block
                W1[:, i] = deq
                Err[:, i] = err
            W[:, b0:b1] = W1
            W[:, b1:] -= Err @ U[b0:b1, b1:]  # the lazy update of everything to the right
        # --8<-- [end:gptq_quantize]

        inv = torch.argsort(perm)
        g_idx = (torch.arange(K) // group)[inv]  # group of each original input
        return QuantizedWeight(
            codes=codes[:, inv].t().contiguous(),  # [K, N]
            scales=torch.stack(scales).half(),  # [groups, N]
            zeros=torch.stack(zeros),
            g_idx=g_idx.to(torch.int32),
            dequantized=W[:, inv],
        )


# --8<-- [start:rtn]
def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest: each weight rounded on its own to its group's min-max grid, no error
    compensation and no calibration data. GPTQ's baseline, and the fast way to make a checkpoint
    whose values do not matter (speed runs on random weights): W [N, K] -> the same four
    tensors GPTQ writes, groups in order (no act-order: RTN has no Hessian to order by).
    With `sym` the stored weight is clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1) * s."""
    W = weight.detach().float()  # [N, K]
    N, K = W.shape
    group = K if group_size == -1 else group_size
    if group <= 0 or K % group:
        raise ValueError(f"group_size={group_size} must divide the weight's {K} inputs (or be -1)")
    Wg = W.view(N, K // group, group).transpose(0, 1)  # [groups, N, G]
    scales, zeros = zip(*(minmax_params(Wg[g], bits, sym) for g in range(K // group)))
    scale, zero = torch.stack(scales), torch.stack(zeros)  # [groups, N] each
    codes = (torch.round(Wg / scale[..., None]) + zero[..., None]).clamp(0, 2**bits - 1)  # [groups, N, G]
    dequantized = (codes - zero[..., None]) * scale[..., None]
    return QuantizedWeight(
        codes=codes.transpose(1, 2).reshape(K, N).long(),  # [K, N]
        scales=scale.half(),
        zeros=zero,
        g_idx=(torch.arange(K) // group).to(torch.int32),
        dequantized=dequantized.transpose(0, 1).reshape(N, K),
    )
# --8<-- [end:rtn]


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on the same grids (min-max per group): the baseline GPTQ must beat.
    Returns the dequantized [N, K] weight."""
    return rtn_quantize_weight(weight, bits, group_size, sym).dequantized


def to_checkpoint_tensors(q: QuantizedWeight, config: GPTQConfig) -> dict[str, torch.Tensor]:
    """GPTQModel's four tensors for one layer, in `config.checkpoint_format`. v1 is written the
    way GPTQModel writes it: the packed real zeros minus 1 as one 32-bit subtraction per word, so
    an asymmetric group whose zero is 0 borrows from its neighbour and the loader's word-level
    +1 (`qzeros_v1_to_v2`) gives every zero back."""
    qzeros = pack_int32(q.zeros, config.bits, dim=1)  # [groups, N / P], real zeros (v2)
    if config.checkpoint_format == "gptq":
        qzeros = qzeros_v2_to_v1(qzeros, config.bits)
    return {
        "qweight": pack_int32(q.codes, config.bits, dim=0),  # [K / P, N]
        "qzeros": qzeros,
        "scales": q.scales,
        "g_idx": q.g_idx,
    }


# -- running our model on calibration text ----------------------------------------------------


@torch.no_grad()
def forward_sequences(model: nn.Module, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Our model's final hidden states for each sequence, all prefilled in one flat batch with a
    contiguous KV cache of one row per sequence (no engine): [sum of lengths, hidden]."""
    lens = [len(s) for s in seqs]
    width = max(lens)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    for layer in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (len(seqs), width, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    input_ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(n) for n in lens])
    md = AttentionMetadata.from_lists(lens, lens, [[row] for row in range(len(seqs))], positions, width)
    return model(input_ids, positions, md)


@torch.no_grad()
def perplexity(model: nn.Module, seqs: Sequence[Sequence[int]], batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over `seqs`."""
    total, count = 0.0, 0
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        logits = model.compute_logits(forward_sequences(model, chunk))  # [T, vocab]
        for s, lg in zip(chunk, logits.split([len(s) for s in chunk])):
            total += torch.nn.functional.cross_entropy(lg[:-1].float(), torch.tensor(s[1:]), reduction="sum").item()
            count += len(s) - 1
    return math.exp(total / count)


class _StopForward(Exception):
    pass


def _fused_parts(layer: LinearBase) -> list[tuple[str, int, int]]:
    """(checkpoint module name, first output row, rows) of each part of a (fused) layer."""
    names = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    own = layer.prefix.rsplit(".", 1)[-1]
    parts = names.get(own, [own])
    offsets = [sum(layer.output_sizes[:i]) for i in range(len(layer.output_sizes))]
    return [(p, o, n) for p, o, n in zip(parts, offsets, layer.output_sizes)]


def _name_and_check_layers(model: nn.Module, config: GPTQConfig) -> None:
    """Give every linear and MoE layer its name (`prefix`, the checkpoint's), refusing a group
    size that does not divide a layer's inputs."""
    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            module.prefix = name
            for size in (module.hidden_size, module.intermediate_size):
                if config.group_size != -1 and size % config.group_size:
                    raise ValueError(f"group_size={config.group_size} does not divide the experts' "
                                     f"{size} inputs in {name}; use a divisor of it or -1")
        if isinstance(module, LinearBase):
            module.prefix = name
            if config.group_size != -1 and module.input_size % config.group_size:
                raise ValueError(
                    f"group_size={config.group_size} does not divide the {module.input_size} "
                    f"inputs of {name}; use a divisor of it or -1"
                )


# --8<-- [start:quantize_model]
@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration: Sequence[Sequence[int]],
    config: GPTQConfig,
    damp: float = 0.01,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Quantize every linear layer of our float `model` (in place: its weights become their
    dequantized values, so block l+1 is calibrated on what block l will really compute).
    Returns the GPTQ checkpoint tensors, under the HF names (`...q_proj.qweight`, ...)."""
    from tqdm import tqdm

    out: dict[str, torch.Tensor] = {}
    _name_and_check_layers(model, config)
    blocks = model.model.layers
    for block in tqdm(blocks, desc="GPTQ layers", disable=not progress):
        # A MoE router (`mlp.gate`) stays float, as GPTQModel leaves it; its experts are
        # calibrated on the tokens routed to each (`ExpertCalibration`).
        linears = [m for m in block.modules() if isinstance(m, LinearBase) and not m.prefix.endswith(".mlp.gate")]
        states = {m: GPTQ(m.weight) for m in linears}
        experts = [ExpertCalibration(m) for m in block.modules() if isinstance(m, FusedMoE)]
        # down_proj (or the experts): once its input is seen, the rest of the model is not needed
        last = experts[-1].layer if experts else linears[-1]

        def hook(module: nn.Module, args: tuple) -> None:
            if isinstance(module, FusedMoE):
                next(c for c in experts if c.layer is module).add_batch(*args)
            else:
                states[module].add_batch(args[0])
            if module is last:
                raise _StopForward

        handles = [m.register_forward_pre_hook(hook) for m in [*linears, *(c.layer for c in experts)]]
        try:
            for b in range(0, len(calibration), 8):
                try:
                    forward_sequences(model, calibration[b : b + 8])
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        for m, state in states.items():
            for part, row0, rows in _fused_parts(m):
                # Each checkpoint matrix (q, k, v, ...) on its own, with the shared Hessian.
                part_state = GPTQ(m.weight[row0 : row0 + rows])
                part_state.H, part_state.num_samples = state.H, state.num_samples
                q = part_state.quantize(config.bits, config.group_size, config.sym, config.desc_act, damp=damp)
                m.weight[row0 : row0 + rows] = q.dequantized.to(m.weight.dtype)
                prefix = m.prefix.rsplit(".", 1)[0] + "." + part
                for key, tensor in to_checkpoint_tensors(q, config).items():
                    out[f"{prefix}.{key}"] = tensor
                if m.bias is not None:
                    out[f"{prefix}.bias"] = m.bias[row0 : row0 + rows].clone()
        for calibration_state in experts:
            out.update(calibration_state.quantize(config, damp))
    return out
# --8<-- [end:quantize_model]


@torch.no_grad()
def rtn_quantize_model(model: nn.Module, config: GPTQConfig) -> dict[str, torch.Tensor]:
    """`quantize_model` with round-to-nearest in place of GPTQ: the same layers (every linear of
    the decoder blocks and every expert; routers, embeddings and the head stay float), the same
    checkpoint tensors, no calibration forward and no error compensation. Seconds instead of
    minutes on Qwen3-0.6B; for checkpoints whose accuracy does not matter (speed runs)."""
    if config.desc_act:
        raise ValueError("round-to-nearest has no Hessian to order the columns by: desc_act must be off")
    _name_and_check_layers(model, config)
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, weight: torch.Tensor) -> None:
        q = rtn_quantize_weight(weight, config.bits, config.group_size, config.sym)
        for key, tensor in to_checkpoint_tensors(q, config).items():
            out[f"{prefix}.{key}"] = tensor

    for block in model.model.layers:
        for m in block.modules():
            if isinstance(m, LinearBase) and not m.prefix.endswith(".mlp.gate"):
                for part, row0, rows in _fused_parts(m):
                    prefix = m.prefix.rsplit(".", 1)[0] + "." + part
                    put(prefix, m.weight[row0 : row0 + rows])
                    if m.bias is not None:
                        out[f"{prefix}.bias"] = m.bias[row0 : row0 + rows].clone()
            elif isinstance(m, FusedMoE):
                inter = m.intermediate_size
                for e in range(m.num_experts):
                    put(f"{m.prefix}.{e}.gate_proj", m.w13_weight[e][:inter])
                    put(f"{m.prefix}.{e}.up_proj", m.w13_weight[e][inter:])
                    put(f"{m.prefix}.{e}.down_proj", m.w2_weight[e])
    return out


# --8<-- [start:expert_calibration]
class ExpertCalibration:
    """GPTQ for a `FusedMoE`'s experts: each expert's Hessians from the calibration tokens the
    router sends it (what GPTQModel's hooks on each expert's nn.Linear see)::

        X_e = hidden states of the tokens whose top-k holds e      -> H of gate_proj and up_proj
        h_e = silu(X_e gate_e^T) * (X_e up_e^T)  (float weights)   -> H of down_proj

    An expert no calibration token chose gets H = I (GPTQ then rounds like RTN) rather than
    H = 0, which would read every input as dead and zero the expert. The results go back into
    the float layer (dequantized), so the next block is calibrated on what this one computes.
    """

    def __init__(self, layer: FusedMoE) -> None:
        self.layer = layer
        inter = layer.intermediate_size
        self.w13 = [GPTQ(layer.w13_weight[e]) for e in range(layer.num_experts)]  # [2I, H]: gate | up
        self.w2 = [GPTQ(layer.w2_weight[e]) for e in range(layer.num_experts)]  # [H, I]
        self.inter = inter

    def add_batch(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> None:
        layer, inter = self.layer, self.inter
        _, topk_ids = fused_topk(router_logits, layer.top_k, layer.renormalize)
        for e in range(layer.num_experts):
            tokens = (topk_ids == e).any(-1).nonzero().flatten()
            if tokens.numel() == 0:
                continue
            x = hidden_states[tokens].float()  # [n, H]
            self.w13[e].add_batch(x)
            w13 = layer.w13_weight[e].float()
            self.w2[e].add_batch(torch.nn.functional.silu(x @ w13[:inter].T) * (x @ w13[inter:].T))

    def quantize(self, config: GPTQConfig, damp: float) -> dict[str, torch.Tensor]:
        """-> GPTQModel's tensors of every expert (`{prefix}.{e}.gate_proj.qweight`, ...)."""
        layer, inter, out = self.layer, self.inter, {}
        for e in range(layer.num_experts):
            for state in (self.w13[e], self.w2[e]):
                if state.num_samples == 0:
                    state.H, state.num_samples = torch.eye(state.H.shape[0], dtype=torch.float64), 1
            parts = [("gate_proj", self.w13[e], layer.w13_weight[e], slice(0, inter)),
                     ("up_proj", self.w13[e], layer.w13_weight[e], slice(inter, 2 * inter)),
                     ("down_proj", self.w2[e], layer.w2_weight[e], slice(None))]
            for proj, state, weight, rows in parts:
                part_state = GPTQ(weight[rows])
                part_state.H, part_state.num_samples = state.H, state.num_samples
                q = part_state.quantize(config.bits, config.group_size, config.sym, config.desc_act, damp=damp)
                weight[rows] = q.dequantized.to(weight.dtype)
                for key, tensor in to_checkpoint_tensors(q, config).items():
                    out[f"{layer.prefix}.{e}.{proj}.{key}"] = tensor
        return out
# --8<-- [end:expert_calibration]


def calibration_from_tokenizer(path: Path, num_samples: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Calibration sequences when the user gives no text: the tokenizer's own training-like
    text is not available, so sample token ids uniformly (fine for random-weight models; give
    real text with --calibration for a trained one)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(path))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_samples, seq_len), generator=g).tolist()


def calibration_from_text(path: Path, text: str, num_samples: int, seq_len: int) -> list[list[int]]:
    """Consecutive windows of `seq_len` tokens of `text`."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    step = max(seq_len, (len(ids) - seq_len) // max(num_samples, 1))
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, step)][:num_samples]


def save_quantized(
    src: Path, out: Path, tensors: dict[str, torch.Tensor], model: nn.Module, config: GPTQConfig
) -> None:
    """Write `out` as a GPTQModel checkpoint: the float tensors that are not quantized
    (embeddings, norms, head) from `src`, the GPTQ tensors, and config.json with
    `quantization_config` (plus quantize_config.json, which older AutoGPTQ readers look for)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    quantized_modules = {k.rsplit(".", 1)[0] for k in tensors}
    state = dict(tensors)
    for name, tensor in iterate_checkpoint(src):
        if name.rsplit(".", 1)[0] not in quantized_modules:
            state[name] = tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = config.to_dict()
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    _copy_tokenizer_files(src, out)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation settings: every small file but the weights and the configs."""
    skip = ("config.json", "quantize_config.json", "model.safetensors.index.json")
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and f.name not in skip:
            shutil.copy(f, dst / f.name)


def dequantize_checkpoint(gptq_path: str, out: str) -> Path:
    """Write the float32 checkpoint that a GPTQ checkpoint dequantizes to (the same model with
    float weights): the ablation that isolates our kernels from the quantization error."""
    from safetensors.torch import save_file

    src, dst = resolve_model_path(gptq_path), Path(out)
    config = get_quant_config(src, "gptq")
    tensors = dict(iterate_checkpoint(src))
    state = {}
    for name, tensor in tensors.items():
        module, key = name.rsplit(".", 1)
        if key == "qweight":
            qzeros = tensors[f"{module}.qzeros"]
            if config.checkpoint_format == "gptq":
                qzeros = qzeros_v1_to_v2(qzeros, config.bits)
            w = dequantize_gptq(tensor, qzeros, tensors[f"{module}.scales"].float(),
                                tensors[f"{module}.g_idx"], config.bits)
            state[f"{module}.weight"] = w.t().contiguous()  # [N, K]
        elif key not in ("qzeros", "scales", "g_idx"):
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw.pop("torch_dtype", None)
    raw["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    _copy_tokenizer_files(src, dst)
    return dst


def quantize_checkpoint(
    model: str, out: str, bits: int = 4, group_size: int = 128, desc_act: bool = False,
    sym: bool = True, checkpoint_format: Optional[str] = None, calibration: Optional[Iterable[Sequence[int]]] = None,
    num_samples: int = 32, seq_len: int = 128, damp: float = 0.01, progress: bool = True,
    method: str = "gptq",
) -> Path:
    """`folovllm quantize`: load the float checkpoint `model` in float32, quantize it on
    `calibration` token sequences (default: random tokens), write the GPTQ checkpoint to `out`.
    `checkpoint_format` defaults to v1 ("gptq", read by every GPTQ loader) for symmetric grids
    and "gptq_v2" for asymmetric ones. An asymmetric v1 file is written exactly as GPTQModel
    writes one (a zero of 0 borrows from its neighbour word-level) and folovllm and GPTQModel read
    it back exactly, but a reader that adds the 1 back field by field gets such a group wrong;
    v2 stores the real zeros, which every v2 reader takes as they are.

    `method="rtn"`: round-to-nearest (`rtn_quantize_model`), no calibration and no error
    compensation: the same format, made in seconds, for speed runs."""
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"method={method!r}; allowed: {QUANTIZE_METHODS}")
    fmt = checkpoint_format or ("gptq" if sym else "gptq_v2")
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, checkpoint_format=fmt)
    net, _, path = load_model(model, torch.float32)
    if getattr(net, "quant_config", None) is not None:
        raise ValueError(f"{path} is already quantized")
    if method == "rtn":
        if calibration is not None:
            raise ValueError("round-to-nearest uses no calibration text")
        tensors = rtn_quantize_model(net, config)
    else:
        seqs = list(calibration) if calibration is not None else calibration_from_tokenizer(path, num_samples, seq_len)
        if not seqs:
            raise ValueError("no calibration sequences")
        tensors = quantize_model(net, seqs, config, damp=damp, progress=progress)
    save_quantized(path, Path(out), tensors, net, config)
    return Path(out)
