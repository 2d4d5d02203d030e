"""Stage 10 on CPU: what structured outputs cost, for both backends, on one thread.

    python -m benchmarks.stage10_structured            # full run, about a minute
    python -m benchmarks.stage10_structured --quick    # smoke run (printed, not written)

Two vocabularies:

    bench     the bench model's tokenizer (`benchmarks.bench_model`: a byte-level BPE of 512
              tokens, ids 0..2 special, EOS 2)
    151,936   a synthetic byte-level vocabulary of Qwen3's size: the 256 single bytes, then
              words and fragments of 2..12 bytes (ASCII letters, digits, punctuation, a space
              in front of a third of them, some multi-byte UTF-8), so the walk over tokens does
              the work it does on a real 152k vocabulary

Measured:

    compile     per spec, the backend's compile (ours: regex -> DFA; xgrammar: compile_grammar
                with its cache cleared), and for ours the masks of every DFA state computed
                at once (the cost our lazy cache spreads over the first steps)
    per step    `StructuredOutputManager.apply_grammar_bitmask` on float32 logits [R, V] for R
                = 1, 8, 32 structured rows (grammars advanced a few tokens along random allowed
                paths, so ours reads cached masks), the median over steps; and the same call
                with 32 rows *without* a grammar (the price a free batch pays)

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
from folovllm.structured_output.regex_dfa import regex_to_dfa
from folovllm.structured_output.request import StructuredOutputRequest
from folovllm.structured_output.token_index import TokenIndex, Vocabulary, unpack_bits

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
    for spec_name, (kind, spec) in SPECS.items():
        row: dict[str, Any] = {}
        ours = backends.ours
        row["folovllm_dfa"] = median_ms(lambda: ours.compile(kind, spec), repeats)
        index = ours.compile(kind, spec)
        row["dfa_states"] = index.dfa.num_states
        start = time.process_time()
        for state in range(index.dfa.num_states):
            index.mask(state)
        row["folovllm_all_masks"] = (time.process_time() - start) * 1e3
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
    return dict(vocabularies=results, specs={k: v[1] for k, v in SPECS.items()}, step_spec=STEP_SPEC,
                xgrammar=xgrammar_available(), peak_loadavg_1m=peak_loadavg([os.getloadavg()[0]]))


def render(result: dict[str, Any]) -> str:
    lines = [f"# Stage 10: structured outputs, cost on CPU ({machine_short(result['machine'])})", "",
             f"`{result['command']}` (commit {result.get('git_commit')}), one thread; medians of "
             "CPU time (`time.process_time`: the machine was shared, CPU time leaves out the waits "
             "for a core).",
             "", "## Compile time (ms)", "",
             "| vocabulary | spec | DFA states | folovllm: DFA | folovllm: every state's mask | xgrammar |",
             "|---|---|--:|--:|--:|--:|"]
    fmt = lambda v: "-" if v is None else (f"{v:,.1f}" if v >= 10 else f"{v:.3f}")  # noqa: E731
    for vocab in result["vocabularies"]:
        for spec, row in vocab["compile_ms"].items():
            lines.append(f"| {vocab['vocab']} | {spec} | {row['dfa_states']} | {fmt(row['folovllm_dfa'])} | "
                         f"{fmt(row['folovllm_all_masks'])} | {fmt(row.get('xgrammar'))} |")
    lines += ["", f"## Per step: masking the logits of R structured rows (ms; spec `{result['step_spec']}`)", "",
              "| vocabulary | backend | R = 1 | R = 8 | R = 32 |", "|---|---|--:|--:|--:|"]
    for vocab in result["vocabularies"]:
        steps = vocab["step_ms"]
        for backend in ("folovllm", "xgrammar"):
            if f"{backend} 1" in steps:
                lines.append(f"| {vocab['vocab']} | {backend} | " + " | ".join(
                    fmt(steps[f"{backend} {r}"]) for r in (1, 8, 32)) + " |")
        lines.append(f"| {vocab['vocab']} | 32 rows, no grammar | | | {steps['no grammar 32']:.4f} |")
        lines.append(f"| {vocab['vocab']} | (argmax of 32 rows, for scale) | | | {fmt(steps['argmax 32 (for scale)'])} |")
    note = shared_machine_note(result, cpu_ratios=False)
    return "\n".join(lines) + "\n" + (f"\n{note.strip()}\n" if note else "")


def main(argv: Optional[list[str]] = None) -> None:
    bench_main("benchmarks.stage10_structured", __doc__, argv, run, render, name="stage10_structured_cpu",
               repeats=1)


if __name__ == "__main__":
    main()
