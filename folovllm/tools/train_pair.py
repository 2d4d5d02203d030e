"""Train a small target/draft model pair on the Python standard library's sources (stage 09).

    folovllm train-pair                     # build (or find) ~/.cache/folovllm/trained-pair/
    folovllm train-pair --threads 2         # the recipe on two free cores
    folovllm train-pair --jobs 2            # target and draft at once, one process each
    folovllm train-pair --out DIR --force   # train again elsewhere
    folovllm train-pair --distill           # then distil the draft from the target (minutes)

Why train at all: speculative decoding's speed-up is the fraction of drafted tokens the target
accepts, and random-weight models accept drafts for the wrong reasons (a random model repeats a
few tokens, so n-gram lookup "predicts" it perfectly; two random models never agree). A target
and a draft that both learned the same text give acceptance rates a reader can believe.

What it makes, from files every Python install has (no download)::

    stdlib *.py (sorted, tests left out) --every 20th file--> held-out split (never trained on)
        |
        +-- byte-level BPE tokenizer (tokenizers, 4,096 ids, <|endoftext|> between files)
        +-- target: Qwen3, 6 layers, hidden 256     } the same tokenizer, both trained
        +-- draft:  Qwen3, 1 layer,  hidden 192     } from scratch as plain language models

    out/target/  config.json model.safetensors generation_config.json tokenizer.json ...
    out/draft/   the same files (the tokenizer copied): each folder loads on its own, in
                 folovllm (`LLM(out/target)`) and in HF (`AutoModelForCausalLM`).
    out/train_pair.json  the recipe, held-out loss and perplexity of each, wall time

Training is a plain torch loop: HF `Qwen3ForCausalLM`, AdamW, linear warm-up then cosine decay,
random windows of `seq_len` tokens from the concatenated training files, a fixed seed. The same
recipe on the same Python gives the same weights (a fixed step count, never "train for N
seconds", so a slow machine only takes longer). The result is cached under
`~/.cache/folovllm/trained-pair` with its recipe; a changed recipe is built again.

Distilling (`--distill`): the draft above learned the text on its own, the honest baseline.
Speculation accepts a greedy draft when it equals the *target's* argmax, not the text's next
token, so a draft trained to imitate the target accepts more. `distill_draft` starts from the
trained draft and trains it further on the target's soft labels (the KL divergence from the
target's next-token distribution to the draft's, on random windows of the same training text),
into `out/draft-distilled/`, cached by its own recipe and the pair's: the target is reused, only
the draft trains again (DistillSpec, Zhou et al. 2023; vLLM's EAGLE heads are trained the same
way, on the target's outputs)::

    out/draft-distilled/   the distilled draft (loads like draft/)
                           distill.json: the recipe, held-out loss and greedy agreement with
                           the target (the share of positions where both argmaxes are equal)

Left out: any fine-tuning for chat (these are code models).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

EOS = "<|endoftext|>"
_RECIPE_VERSION = 1  # bump when the recipe changes so cached pairs are trained again


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3's sizes (head_dim 64 unless the model is tiny)."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that decides the weights; the cache is keyed by it."""

    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    target: ModelShape = ModelShape(4, 256, 768, 4, 2, 64)
    draft: ModelShape = ModelShape(1, 128, 384, 2, 1, 64)
    target_steps: int = 600
    draft_steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    held_out_every: int = 20  # file i (in sorted order) is held out when i % 20 == 0
    max_files: Optional[int] = None  # a tiny run (tests) reads only the first files
    eval_windows: int = 48  # held-out windows of seq_len tokens for the reported loss
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02  # HF's default; the tiny run uses 0.2 (see TINY_RECIPE)


# A run of the same script small enough for a test: seconds, not minutes. A few steps cannot
# teach a tiny model anything but "repeat the commonest token", and a model that repeats one
# token is a weak oracle (any broken attention still "matches"): so it starts from a larger
# initial scale (like testing/tiny_model.py) and stays diverse after its few steps.
TINY_RECIPE = TrainRecipe(
    vocab_size=512, seq_len=64, batch_size=4,
    target=ModelShape(2, 64, 128, 4, 2, 16), draft=ModelShape(1, 32, 64, 2, 1, 16),
    target_steps=8, draft_steps=4, lr=1e-3, warmup_steps=2, max_files=12, eval_windows=4,
    max_position_embeddings=512, initializer_range=0.2,
)


def default_pair_dir() -> Path:
    from folovllm.testing.tiny_model import default_cache_dir

    return default_cache_dir() / "trained-pair"


# --8<-- [start:corpus]
def stdlib_files(max_files: Optional[int] = None) -> list[Path]:
    """The standard library's .py files in a fixed order (sorted relative paths), without its
    test suites and installed packages: the same list on every run of one Python version."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(
        (p for p in lib.rglob("*.py") if not skip.intersection(p.relative_to(lib).parts)),
        key=lambda p: p.relative_to(lib).as_posix(),
    )
    return files[:max_files] if max_files else files


def split_corpus(files: Sequence[Path], held_out_every: int) -> tuple[list[str], list[str]]:
    """-> (training texts, held-out texts): every `held_out_every`-th file is held out."""
    train, held = [], []
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if i % held_out_every == 0 else train).append(text)
    return train, held
# --8<-- [end:corpus]


def train_tokenizer(texts: Sequence[str], vocab_size: int, out: Path) -> Any:
    """A byte-level BPE (every byte encodable: no unknown token), saved as HF files in `out`.
    -> the `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    hf_tok.save_pretrained(out)
    return hf_tok


def encode_corpus(tokenizer: Any, texts: Sequence[str]) -> "torch.Tensor":
    """Every text's ids, each followed by <|endoftext|>, concatenated -> [N] int64."""
    import torch

    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def make_model(shape: ModelShape, recipe: TrainRecipe, eos_id: int, vocab_size: int) -> Any:
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=vocab_size, max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
        initializer_range=recipe.initializer_range, **asdict(shape),
    )
    return transformers.Qwen3ForCausalLM(config).float()


def lr_at(step: int, recipe: TrainRecipe, total: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to a tenth of it."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_windows(held: "torch.Tensor", recipe: TrainRecipe) -> "torch.Tensor":
    """Non-overlapping windows of seq_len held-out tokens -> [W, seq_len]."""
    L = recipe.seq_len
    n = min(recipe.eval_windows, (len(held) - 1) // L)
    return held[: n * L].view(n, L)


def evaluate(model: Any, windows: "torch.Tensor") -> float:
    """Mean next-token cross-entropy (nats) over the held-out windows."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            batch = windows[i : i + 8]
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    model.train()
    return sum(losses) / len(windows)


# --8<-- [start:train_loop]
def train_model(name: str, shape: ModelShape, steps: int, recipe: TrainRecipe, data: "torch.Tensor",
                windows: "torch.Tensor", tokenizer: Any, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train one model from scratch on random windows of `data`; save it (with the tokenizer and
    a generation config) in `out`. -> its numbers (parameters, losses, seconds)."""
    import torch
    from tqdm import tqdm

    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(recipe.seed)
    model = make_model(shape, recipe, eos, len(tokenizer)).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(recipe.seed + 1)
    L, B = recipe.seq_len, recipe.batch_size
    start, ema = time.perf_counter(), None
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress, file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe, steps)
        starts = torch.randint(0, len(data) - L - 1, (B,), generator=g)
        batch = torch.stack([data[s : s + L] for s in starts.tolist()])  # [B, L]
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    seconds = time.perf_counter() - start
    held_loss = evaluate(model, windows)
    model.eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return dict(parameters=sum(p.numel() for p in model.parameters()), steps=steps,
                train_loss_ema=round(ema, 4), held_out_loss=round(held_loss, 4),
                held_out_perplexity=round(math.exp(held_loss), 3), train_seconds=round(seconds, 1),
                tokens_seen=steps * B * L)
# --8<-- [end:train_loop]


def _train_in_child(name: str, shape: ModelShape, steps: int, recipe: TrainRecipe, tmp: Path,
                    threads: int) -> dict[str, Any]:
    """`train_model` in a spawned process, from the tokenizer the parent saved: the corpus is
    encoded again (seconds), so nothing large crosses the process boundary."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer")
    train_texts, held_texts = split_corpus(stdlib_files(recipe.max_files), recipe.held_out_every)
    data, held = encode_corpus(tokenizer, train_texts), encode_corpus(tokenizer, held_texts)
    return train_model(name, shape, steps, recipe, data, held_out_windows(held, recipe), tokenizer,
                       tmp / name, progress=False)


def _stamp(recipe: TrainRecipe) -> dict[str, Any]:
    return dict(version=_RECIPE_VERSION, python=sys.version.split()[0], recipe=asdict(recipe))


def train_pair(out: Optional[Path] = None, recipe: TrainRecipe = TrainRecipe(), threads: Optional[int] = None,
               force: bool = False, progress: bool = True, jobs: int = 1) -> tuple[Path, Path]:
    """Build (once) the trained pair in `out` (default ~/.cache/folovllm/trained-pair);
    -> (target folder, draft folder). A finished build with the same recipe is reused.
    `jobs=2` trains the draft in a second process beside the target (each with `threads`
    threads): the same weights, in about the target's time alone."""
    import torch

    out = Path(out) if out is not None else default_pair_dir()
    report = out / "train_pair.json"
    if not force and report.is_file():
        try:
            if json.loads(report.read_text()).get("stamp") == _stamp(recipe):
                return out / "target", out / "draft"
        except json.JSONDecodeError:
            pass  # a broken report: train again
    if threads is not None:
        torch.set_num_threads(threads)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"folovllm: training the stage-09 model pair into {out} (once; "
        f"{recipe.target_steps} + {recipe.draft_steps} steps on {torch.get_num_threads()} thread(s))")
    wall = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = stdlib_files(recipe.max_files)
    if len(files) < 2 * recipe.held_out_every and recipe.max_files is None:
        raise ValueError(f"found only {len(files)} standard-library files under "
                         f"{sysconfig.get_paths()['stdlib']}; need the sources (*.py) installed")
    train_texts, held_texts = split_corpus(files, recipe.held_out_every)
    tokenizer = train_tokenizer(train_texts, recipe.vocab_size, tmp / "tokenizer")
    data, held = encode_corpus(tokenizer, train_texts), encode_corpus(tokenizer, held_texts)
    windows = held_out_windows(held, recipe)
    say(f"  corpus: {len(train_texts)} training files ({len(data):,} tokens), "
        f"{len(held_texts)} held out ({len(held):,} tokens), vocabulary {len(tokenizer)}")
    jobs_ = (("target", recipe.target, recipe.target_steps), ("draft", recipe.draft, recipe.draft_steps))
    results = {}
    if jobs > 1:  # the draft in a second process, beside the target: the same weights, sooner
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            name, shape, steps = jobs_[1]
            pending = pool.apply_async(_train_in_child, (name, shape, steps, recipe, tmp, torch.get_num_threads()))
            results["target"] = train_model(*jobs_[0], recipe, data, windows, tokenizer, tmp / "target", progress)
            results["draft"] = pending.get()
    else:
        for name, shape, steps in jobs_:
            results[name] = train_model(name, shape, steps, recipe, data, windows, tokenizer, tmp / name, progress)
    for name in results:
        say(f"  {name}: {results[name]['parameters']:,} parameters, held-out loss "
            f"{results[name]['held_out_loss']:.3f} (perplexity {results[name]['held_out_perplexity']:.2f}), "
            f"{results[name]['train_seconds']:.0f} s")
    shutil.rmtree(tmp / "tokenizer")
    summary = dict(stamp=_stamp(recipe), threads=torch.get_num_threads(), jobs=jobs,
                   corpus=dict(train_files=len(train_texts), held_out_files=len(held_texts),
                               train_tokens=len(data), held_out_tokens=len(held),
                               eval_tokens=windows.numel()),
                   wall_seconds=round(time.perf_counter() - wall, 1), **results)
    (tmp / "train_pair.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the finished pair appears at once: an interrupted run leaves only .partial
    say(f"folovllm: trained pair ready in {summary['wall_seconds']:.0f} s: {out}")
    return out / "target", out / "draft"


# --8<-- [start:distill]
@dataclass(frozen=True)
class DistillRecipe:
    """Distilling the trained draft from the trained target; the cache is keyed by it and by
    the pair's recipe. Windows and batch size are the pair's (`TrainRecipe.seq_len`,
    `batch_size`); the windows are drawn with another seed than the pair's training used."""

    steps: int = 150  # ~0.3M tokens: a few minutes on one core, on top of the pair's 1.2M
    lr: float = 1e-3
    warmup_steps: int = 10
    temperature: float = 1.0  # soft labels at T (the loss is scaled by T^2, Hinton et al.)
    seed: int = 1


TINY_DISTILL = DistillRecipe(steps=4, warmup_steps=1)
_DISTILL_VERSION = 1


def distill_loss(student_logits: "torch.Tensor", teacher_logits: "torch.Tensor",
                 temperature: float = 1.0) -> "torch.Tensor":
    """KL(teacher || student) of the next-token distributions at temperature T, averaged over
    positions, times T^2: [..., V] logits -> a scalar. Forward KL (the teacher's mass the
    student misses costs most) makes the student put its mode where the teacher's is, which is
    what a greedy draft needs to be accepted."""
    import torch.nn.functional as F

    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)  # [N, V]
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * t * t


def compare_to_target(draft: Any, target: Any, windows: "torch.Tensor") -> dict[str, float]:
    """On the held-out windows: the draft's loss on the text, its KL divergence from the
    target, and the share of positions where its argmax equals the target's (greedy
    agreement: the acceptance rate of a first greedy draft token, measured without an engine)."""
    import torch

    loss = kl = same = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            batch = windows[i : i + 8]
            out, t = draft(input_ids=batch, labels=batch), target(input_ids=batch).logits
            loss += out.loss.item() * len(batch)
            kl += distill_loss(out.logits, t).item() * len(batch)
            same += int((out.logits.argmax(-1) == t.argmax(-1)).sum())
    n = len(windows)
    return dict(held_out_loss=round(loss / n, 4), held_out_kl=round(kl / n, 4),
                greedy_agreement=round(same / windows.numel(), 4))


def distill_draft(pair_dir: Optional[Path] = None, recipe: DistillRecipe = DistillRecipe(),
                  threads: Optional[int] = None, force: bool = False, progress: bool = True) -> Path:
    """The trained draft of `pair_dir` (default: the cached pair) distilled from its target,
    built once into `pair_dir/draft-distilled` -> that folder. The pair must exist
    (`train_pair`); the target is only read."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair_dir = Path(pair_dir) if pair_dir is not None else default_pair_dir()
    try:
        pair_stamp = json.loads((pair_dir / "train_pair.json").read_text())["stamp"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"no trained pair in {pair_dir} (train_pair.json: {e}); run "
                         "`folovllm train-pair` first") from e
    out = pair_dir / "draft-distilled"
    stamp = dict(version=_DISTILL_VERSION, pair=pair_stamp, distill=asdict(recipe))
    report = out / "distill.json"
    if not force and report.is_file():
        try:
            if json.loads(report.read_text()).get("stamp") == stamp:
                return out
        except json.JSONDecodeError:
            pass
    if threads is not None:
        torch.set_num_threads(threads)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    fields = dict(pair_stamp["recipe"])
    pair = TrainRecipe(**{**fields, "target": ModelShape(**fields["target"]), "draft": ModelShape(**fields["draft"])})
    say(f"folovllm: distilling the draft from the target into {out} (once; {recipe.steps} steps "
        f"on {torch.get_num_threads()} thread(s))")
    wall = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(pair_dir / "target")
    train_texts, held_texts = split_corpus(stdlib_files(pair.max_files), pair.held_out_every)
    data, held = encode_corpus(tokenizer, train_texts), encode_corpus(tokenizer, held_texts)
    windows = held_out_windows(held, pair)
    target = AutoModelForCausalLM.from_pretrained(pair_dir / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(pair_dir / "draft", dtype=torch.float32)
    for p in target.parameters():
        p.requires_grad_(False)
    before = compare_to_target(draft.eval(), target, windows)
    draft.train()
    decay = [p for p in draft.parameters() if p.dim() >= 2]
    no_decay = [p for p in draft.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pair.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    schedule = replace(pair, lr=recipe.lr, warmup_steps=recipe.warmup_steps)  # lr_at's warm-up + cosine
    g = torch.Generator().manual_seed(recipe.seed)
    L, B = pair.seq_len, pair.batch_size
    start, ema = time.perf_counter(), None
    bar = tqdm(range(recipe.steps), desc="distill draft", disable=not progress, file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule, recipe.steps)
        starts = torch.randint(0, len(data) - L - 1, (B,), generator=g)
        batch = torch.stack([data[s : s + L] for s in starts.tolist()])  # [B, L]
        with torch.no_grad():
            teacher = target(input_ids=batch).logits  # [B, L, V]
        loss = distill_loss(draft(input_ids=batch).logits, teacher, recipe.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(kl=f"{ema:.3f}")
    seconds = time.perf_counter() - start
    draft.eval()
    after = compare_to_target(draft, target, windows)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    draft.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = dict(stamp=stamp, threads=torch.get_num_threads(), steps=recipe.steps,
                   kl_ema=round(ema, 4) if ema is not None else None, train_seconds=round(seconds, 1),
                   tokens_seen=recipe.steps * B * L, before=before, after=after,
                   wall_seconds=round(time.perf_counter() - wall, 1))
    (tmp / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    say(f"folovllm: distilled draft ready in {summary['wall_seconds']:.0f} s: greedy agreement with the "
        f"target {before['greedy_agreement']:.3f} -> {after['greedy_agreement']:.3f}, held-out loss "
        f"{before['held_out_loss']:.3f} -> {after['held_out_loss']:.3f}: {out}")
    return out
# --8<-- [end:distill]


def find_trained_pair() -> Optional[tuple[Path, Path]]:
    """The cached pair of the default recipe if it was built, else None (builds nothing)."""
    out = default_pair_dir()
    report = out / "train_pair.json"
    try:
        if json.loads(report.read_text()).get("stamp") == _stamp(TrainRecipe()):
            return out / "target", out / "draft"
    except (OSError, json.JSONDecodeError):
        pass
    return None


def add_parser(sub: Any) -> None:
    """`folovllm train-pair`'s options (registered by entrypoints/cli.py)."""
    p = sub.add_parser("train-pair", help="train the stage-09 target/draft pair on the stdlib sources (once, cached)")
    p.add_argument("--out", type=Path, default=None, help="folder (default ~/.cache/folovllm/trained-pair)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="train again even if the cache is current")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="2: train the draft in a second process beside the target (same weights)")
    p.add_argument("--target-steps", type=int, default=None)
    p.add_argument("--draft-steps", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="the seconds-long run the tests use")
    p.add_argument("--distill", action="store_true",
                   help="also distil the draft from the target (into <out>/draft-distilled; the pair is reused)")
    p.add_argument("--distill-steps", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    recipe = TINY_RECIPE if args.tiny else TrainRecipe()
    for key in ("target_steps", "draft_steps"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
            recipe = replace(recipe, **{key: value})
    distill = TINY_DISTILL if args.tiny else DistillRecipe()
    if args.distill_steps is not None:
        if args.distill_steps < 1:
            raise ValueError(f"--distill-steps must be a positive integer, got {args.distill_steps}")
        distill = replace(distill, steps=args.distill_steps)
    target, draft = train_pair(args.out, recipe, force=args.force, jobs=args.jobs)
    print(json.dumps(json.loads((target.parent / "train_pair.json").read_text()), indent=2))
    print(f"target: {target}\ndraft:  {draft}")
    if args.distill or args.distill_steps is not None:
        distilled = distill_draft(target.parent, distill, force=args.force)
        print(json.dumps({k: v for k, v in json.loads((distilled / "distill.json").read_text()).items()
                          if k != "stamp"}, indent=2))
        print(f"distilled draft: {distilled}")
    return 0
