"""Stage 10 on CPU: what structured outputs cost, for both backends, on one thread.

    python -m benchmarks.stage10_structured            # full run, about a minute
    python -m benchmarks.stage10_structured --quick    # smoke run (printed, not written)

Three vocabularies:

    bench     the bench model's tokenizer (`benchmarks.bench_model`: a byte-level BPE of 512
              tokens, ids 0..2 special, EOS 2)
    synthetic a synthetic byte-level vocabulary of Qwen3's size (151,936): the 256 single
              bytes, then random words and fragments of 2..12 bytes (ASCII letters, digits,
              punctuation, a space in front of a third of them, some multi-byte UTF-8); random
              fragments share few prefixes, so this is the trie's worst case
    BPE       a byte-level BPE trained here with `tokenizers` to 151,936 tokens on the Python
              installation's own text (.py, .txt, .rst, .html; cached under
              ~/.cache/folovllm/stage10-bpe), so its tokens share prefixes as a real BPE's do
              (each merge extends a token); left out with --no-bpe (training takes minutes)

Measured:

    compile     per spec, the backend's compile (ours: regex -> DFA; xgrammar: compile_grammar
                with its cache cleared), and for ours the masks of every DFA state computed
                at once (the cost our lazy cache spreads over the first steps), by the trie
                walk (`TokenIndex.allowed`) and by the per-token walk it replaced
                (`allowed_per_token`), side by side: the per-new-state cost is their mean
    trie        building the vocabulary's byte trie (once per engine) and its node count
    per step    `StructuredOutputManager.apply_grammar_bitmask` on float32 logits [R, V] for R
                = 1, 8, 32 structured rows (grammars advanced a few tokens along random allowed
                paths, so ours reads cached masks), the median over steps; 8 rows verifying
                3 drafts each (stage 09: 32 mask rows, the grammar advanced through the drafts
                and rolled back); and the same call with 32 rows *without* a grammar (the
                price a free batch pays)

Times are CPU time of this process (`time.process_time`, one thread), medians: the machine these
numbers come from is shared, and CPU time does not count the waits for a core that wall time
would.

Writes `benchmarks/results/stage10_structured_cpu.json` and `.md`.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

from benchmarks.bench_model import bench_model_path
from benchmarks.cli import bench_main
from benchmarks.harness import peak_loadavg
from benchmarks.results import machine_short, shared_machine_note
from folovllm.structured_output import StructuredOutputManager
from folovllm.structured_output.backend_folovllm import FolovllmBackend, FolovllmGrammar
from folovllm.structured_output.backend_types import StructuredOutputOptions as Options
from folovllm.structured_output.backend_xgrammar import XgrammarBackend, xgrammar_available
from folovllm.structured_output.backend_folovllm import spec_to_regex
from folovllm.structured_output.regex_dfa import regex_to_dfa
from folovllm.structured_output.request import StructuredOutputRequest
from folovllm.structured_output.token_index import TokenIndex, Vocabulary, pack_bits, unpack_bits

SPECS = {
    "regex phone": (Options.REGEX, r"\(\d{3}\) \d{3}-\d{4}"),
    "choice 4": (Options.CHOICE, '["positive", "negative", "neutral", "mixed"]'),
    "schema person": (Options.JSON, '{"type": "object", "properties": {"name": {"type": "string"}, '
                                     '"age": {"type": "integer"}}, "required": ["name", "age"]}'),
    "schema order": (Options.JSON, '{"type": "object", "properties": {"id": {"type": "integer"}, '
                                    '"items": {"type": "array", "items": {"type": "object", "properties": '
                                    '{"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer"}, '
                                    '"price": {"type": "number"}}, "required": ["sku", "qty", "price"]}}, '
                                    '"status": {"enum": ["open", "paid", "shipped"]}, "gift": {"type": "boolean"}}, '
                                    '"required": ["id", "items", "status", "gift"]}'),
    "json_object": (Options.JSON_OBJECT, ""),
}
STEP_SPEC = "schema person"
EOS = 2


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """256 single bytes, 3 special slots (None), then distinct fragments of 2..12 bytes."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?-_\"'(){}[]"
    extra = ["é", "ü", "中", "文", "—", "€", "ß", "あ"]
    vocab: list[Any] = [None, None, None] + [bytes([b]) for b in range(256)]
    seen = set(vocab[3:])
    while len(vocab) < size:
        n = min(12, max(2, int(rng.expovariate(1 / 5)) + 2))
        word = "".join(rng.choice(letters) if rng.random() > 0.04 else rng.choice(extra) for _ in range(n))
        data = ((" " if rng.random() < 0.33 else "") + word).encode()[:14]
        if data not in seen:
            seen.add(data)
            vocab.append(data)
    return vocab


def trained_bpe_vocab(size: int) -> list[Optional[bytes]]:
    """A byte-level BPE of `size` tokens trained on this Python installation's text files
    (cached: the first run trains it, minutes on 2 cores) -> each id's bytes, with EOS (id 2,
    as the other vocabularies) and two more specials (None) in front. Fewer tokens when the
    text has fewer merges to give."""
    import sysconfig
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from folovllm.structured_output.token_index import bytes_to_unicode
    from folovllm.testing.tiny_model import default_cache_dir

    path = default_cache_dir() / "stage10-bpe" / f"bpe-{size}.json"
    if not path.exists():
        lib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for ext in ("py", "txt", "rst", "html") for p in lib.rglob(f"*.{ext}"))
        print(f"  training a {size:,}-token BPE on {len(files):,} files under {lib} (cached in {path})", flush=True)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((p.read_text(encoding="utf-8", errors="replace") for p in files), trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    tok = Tokenizer.from_file(str(path))
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    # its <|endoftext|> (id 0) out, three specials in: the last two merges are dropped
    return [None, None, None] + [bytes(decoder[c] for c in piece) for piece, _ in pieces[1 : size - 2]]


class SyntheticTokenizerBackends:
    """Both backends on a list of token bytes instead of an HF tokenizer."""

    def __init__(self, token_bytes: list[Optional[bytes]]) -> None:
        self.ours = FolovllmBackend.__new__(FolovllmBackend)
        self.ours.vocab = Vocabulary(token_bytes, [EOS])
        self.xgr = None
        if xgrammar_available():
            import xgrammar as xgr

            encoded = [b if b is not None else b"<|special%d|>" % i for i, b in enumerate(token_bytes)]
            info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=len(token_bytes),
                                     stop_token_ids=[EOS])
            self.xgr = XgrammarBackend.__new__(XgrammarBackend)
            self.xgr.xgr = xgr
            self.xgr.compiler = xgr.GrammarCompiler(info, max_threads=1)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def advance(grammar: Any, backend_vocab: int, rng: random.Random, steps: int) -> None:
    """Accept `steps` random allowed tokens (never EOS), so rows sit in varied states."""
    mask = torch.zeros(1, (backend_vocab + 31) // 32, dtype=torch.int32)
    for _ in range(steps):
        grammar.fill_bitmask(mask, 0)
        allowed = [t for t in unpack_bits(mask[0], backend_vocab).nonzero().flatten().tolist() if t != EOS]
        if not allowed:
            return
        grammar.accept_tokens([rng.choice(allowed)])


def measure_vocab(name: str, backends: SyntheticTokenizerBackends, vocab_size: int, quick: bool) -> dict[str, Any]:
    repeats = 3 if quick else 7
    result: dict[str, Any] = {"vocab": name, "vocab_size": vocab_size, "compile_ms": {}, "step_ms": {}}
    vocab = backends.ours.vocab
    start = time.process_time()
    trie = vocab.trie
    result["trie_build_ms"] = (time.process_time() - start) * 1e3
    vocab.padded  # noqa: B018 (the reference's layout, built before it is timed too)
    result["trie_nodes"] = trie.num_nodes
    result["token_bytes"] = sum(len(b) for b in vocab.token_bytes if b)
    for spec_name, (kind, spec) in SPECS.items():
        row: dict[str, Any] = {}
        ours = backends.ours
        pattern = spec_to_regex(kind, spec)
        row["folovllm_dfa"] = median_ms(lambda: regex_to_dfa(pattern), 1 if spec_name == "json_object" else repeats)
        index = TokenIndex(regex_to_dfa(pattern), ours.vocab)
        row["dfa_states"] = states = index.dfa.num_states
        for column, allowed in (("folovllm_all_masks", index.allowed),
                                ("folovllm_all_masks_per_token", index.allowed_per_token)):
            start = time.process_time()
            masks = [pack_bits(allowed(state)) for state in range(states)]
            row[column] = (time.process_time() - start) * 1e3
            if column == "folovllm_all_masks":
                trie_masks = masks
            else:  # the two walks give the same bits
                assert all(torch.equal(a, b) for a, b in zip(trie_masks, masks)), spec_name
        row["per_state_trie"] = row["folovllm_all_masks"] / states
        row["per_state_per_token"] = row["folovllm_all_masks_per_token"] / states
        if backends.xgr is not None:
            xgr = backends.xgr

            def compile_xgr() -> None:
                xgr.compiler.clear_cache()
                xgr.compile(kind, spec)

            row["xgrammar"] = median_ms(compile_xgr, repeats)
        result["compile_ms"][spec_name] = row
        print(f"  {name} compile {spec_name}: {row}", flush=True)

    kind, spec = SPECS[STEP_SPEC]
    config = SimpleNamespace(structured_outputs_backend="auto")
    for backend_name in ("folovllm", "xgrammar"):
        backend = backends.ours if backend_name == "folovllm" else backends.xgr
        if backend is None:
            continue
        compiled = backend.compile(kind, spec)
        done: Any = SimpleNamespace(done=lambda: True, result=lambda: compiled)
        manager = StructuredOutputManager(config, None, vocab_size, [EOS])
        rng = random.Random(0)
        for rows in (1, 8, 32):
            requests = []
            for _ in range(rows):
                request = SimpleNamespace(structured_output_request=StructuredOutputRequest((kind, spec), backend, done))
                advance(request.structured_output_request.grammar, vocab_size, rng, rng.randrange(1, 12))
                requests.append(request)
            logits = torch.randn(rows, vocab_size)
            manager.apply_grammar_bitmask(logits, requests)  # warm: ours caches the masks it reads
            result["step_ms"][f"{backend_name} {rows}"] = median_ms(
                lambda: manager.apply_grammar_bitmask(logits, requests), repeats * 3)
        # stage 09: 8 rows verifying 3 drafts each (valid ones: a random allowed path)
        requests, drafts = requests[:8], []
        for request in requests:
            grammar = request.structured_output_request.grammar
            before = len(getattr(grammar, "history", [])) if backend_name == "folovllm" else None
            path = []
            mask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
            for _ in range(3):
                grammar.fill_bitmask(mask, 0)
                allowed = [t for t in unpack_bits(mask[0], vocab_size).nonzero().flatten().tolist() if t != EOS]
                if not allowed:
                    break
                path.append(rng.choice(allowed))
                grammar.accept_tokens(path[-1:])
            grammar.rollback(len(path))
            assert before is None or len(grammar.history) == before
            drafts.append(path)
        logits = torch.randn(sum(1 + len(d) for d in drafts), vocab_size)
        manager.apply_grammar_bitmask(logits, requests, drafts)
        result["step_ms"][f"{backend_name} 8 k=3"] = median_ms(
            lambda: manager.apply_grammar_bitmask(logits, requests, drafts), repeats * 3)
    free = [SimpleNamespace(structured_output_request=None) for _ in range(32)]
    logits = torch.randn(32, vocab_size)
    manager = StructuredOutputManager(config, None, vocab_size, [EOS])
    result["step_ms"]["no grammar 32"] = median_ms(lambda: manager.apply_grammar_bitmask(logits, free), 50)
    result["step_ms"]["argmax 32 (for scale)"] = median_ms(lambda: logits.argmax(dim=-1), 20)
    print(f"  {name} per step: {result['step_ms']}", flush=True)
    return result


def run(args: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from folovllm.structured_output.token_index import token_bytes

    tokenizer = AutoTokenizer.from_pretrained(bench_model_path())
    bench_bytes = token_bytes(tokenizer, len(tokenizer))
    results = [measure_vocab("bench (512)", SyntheticTokenizerBackends(bench_bytes), len(bench_bytes), args.quick)]
    size = 20_000 if args.quick else 151_936
    results.append(measure_vocab(f"synthetic ({size:,})", SyntheticTokenizerBackends(synthetic_vocab(size)),
                                 size, args.quick))
    if not args.no_bpe:
        bpe = trained_bpe_vocab(size)
        results.append(measure_vocab(f"BPE ({len(bpe):,})", SyntheticTokenizerBackends(bpe), len(bpe), args.quick))
    return dict(vocabularies=results, specs={k: v[1] for k, v in SPECS.items()}, step_spec=STEP_SPEC,
                xgrammar=xgrammar_available(), peak_loadavg_1m=peak_loadavg([os.getloadavg()[0]]))


def render(result: dict[str, Any]) -> str:
    lines = [f"# Stage 10: structured outputs, cost on CPU ({machine_short(result['machine'])})", "",
             f"`{result['command']}` (commit {result.get('git_commit')}), one thread; medians of "
             "CPU time (`time.process_time`: the machine was shared, CPU time leaves out the waits "
             "for a core).",
             "", "## Compile time (ms)", "",
             "Ours: the DFA, then every DFA state's mask (what the lazy cache spreads over the "
             "first steps that reach each state) by the trie walk and by the per-token walk it "
             "replaced, and the cost per new state of each.", "",
             "| vocabulary | spec | DFA states | folovllm: DFA | every state's mask: trie | per-token walk "
             "| per new state: trie | per-token | xgrammar |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    fmt = lambda v: "-" if v is None else (f"{v:,.1f}" if v >= 10 else f"{v:.3f}")  # noqa: E731
    for vocab in result["vocabularies"]:
        for spec, row in vocab["compile_ms"].items():
            lines.append(f"| {vocab['vocab']} | {spec} | {row['dfa_states']} | {fmt(row['folovllm_dfa'])} | "
                         f"{fmt(row['folovllm_all_masks'])} | {fmt(row.get('folovllm_all_masks_per_token'))} | "
                         f"{fmt(row.get('per_state_trie'))} | {fmt(row.get('per_state_per_token'))} | "
                         f"{fmt(row.get('xgrammar'))} |")
    lines += ["", "## The vocabulary's byte trie (built once per engine)", "",
              "| vocabulary | token bytes | trie nodes | build (ms) |", "|---|--:|--:|--:|"]
    for vocab in result["vocabularies"]:
        if "trie_nodes" in vocab:
            lines.append(f"| {vocab['vocab']} | {vocab['token_bytes']:,} | {vocab['trie_nodes']:,} | "
                         f"{fmt(vocab['trie_build_ms'])} |")
    lines += ["", f"## Per step: masking the logits of R structured rows (ms; spec `{result['step_spec']}`)", "",
              "| vocabulary | backend | R = 1 | R = 8 | R = 32 | R = 8, 3 drafts each (32 mask rows) |",
              "|---|---|--:|--:|--:|--:|"]
    for vocab in result["vocabularies"]:
        steps = vocab["step_ms"]
        for backend in ("folovllm", "xgrammar"):
            if f"{backend} 1" in steps:
                lines.append(f"| {vocab['vocab']} | {backend} | " + " | ".join(
                    fmt(steps.get(f"{backend} {r}")) for r in (1, 8, 32, "8 k=3")) + " |")
        lines.append(f"| {vocab['vocab']} | 32 rows, no grammar | | | {steps['no grammar 32']:.4f} |")
        lines.append(f"| {vocab['vocab']} | (argmax of 32 rows, for scale) | | | {fmt(steps['argmax 32 (for scale)'])} |")
    note = shared_machine_note(result, cpu_ratios=False)
    return "\n".join(lines) + "\n" + (f"\n{note.strip()}\n" if note else "")


def add_options(p: Any) -> None:
    p.add_argument("--no-bpe", action="store_true", help="leave out the trained 151,936-token BPE")


def main(argv: Optional[list[str]] = None) -> None:
    bench_main("benchmarks.stage10_structured", __doc__, argv, run, render, name="stage10_structured_cpu",
               repeats=1, options=add_options)


if __name__ == "__main__":
    main()
