"""Stage 10: structured outputs. `pytest stages/10` reproduces the stage.

Oracles: Python's `re.fullmatch` for the DFA (random strings, hypothesis), a per-token brute-force
walk for the token masks, the tokenizer's own encoding for the bytes of each token, xgrammar's
masks for ours on shared regexes, `json.loads` and a small validator for the JSON-schema subset
(written here from the schema, not from our regex), HF transformers for greedy tokens under a
grammar that allows everything. The model is the tiny random-weight one: without a grammar it
writes gibberish, so every output that matches is the grammar's doing.
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from folovllm import LLM, SamplingParams, StructuredOutputsParams
from folovllm.core.request import RequestStatus
from folovllm.structured_output import StructuredOutputManager
from folovllm.structured_output.backend_folovllm import FolovllmBackend, FolovllmGrammar, cached_dfa
from folovllm.structured_output.backend_types import StructuredOutputOptions as Options
from folovllm.structured_output.backend_xgrammar import xgrammar_available
from folovllm.structured_output.json_schema import JSON_OBJECT_MAX_DEPTH, json_object_regex, schema_to_regex
from folovllm.structured_output.regex_dfa import DEAD, regex_to_dfa
from folovllm.structured_output.token_index import (
    TokenIndex, Vocabulary, pack_bits, token_bytes, unpack_bits)
from tests.helpers import hf_greedy

needs_xgrammar = pytest.mark.skipif(not xgrammar_available(), reason="xgrammar is not installed")

# bounded, so a random model reaches the end (only EOS allowed) well within max_tokens
REGEXES = [r"\d{1,3}-[a-z]{2,5}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6} [0-9]{1,4}\.", r'"[^"\n]{0,6}"',
           r"(ab|cd){0,4}e?", r"\w{1,5}@\w{1,5}\.(com|org)", r"x[0-9a-f]{2}(,x[0-9a-f]{2}){0,3}", r"é{1,3}ü?"]
CHOICES = ["red", "green", "blue sky", "4 2"]
# The first three are bounded (every path reaches a point where only EOS is allowed); the last has
# a number and an unbounded string, which a random model may write until max_tokens.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "score": {"enum": [1.5, -2, 0]}, "tags": {
            "type": "array", "items": {"enum": ["a", "b", 3, None]}, "maxItems": 3},
        "pos": {"type": "object", "properties": {"x": {"type": ["integer", "null"]}}, "required": ["x"]}},
     "required": ["ok", "score", "tags", "pos"]},
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"n": {"type": "number"}, "s": {"type": "string", "minLength": 1}},
     "required": ["n", "s"]},
]


def llm(path, stage: int = 6, **kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    return LLM(str(path), stage=stage, dtype="float32", **kw)


def structured(max_tokens: int = 40, temperature: float = 1.0, **spec) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=spec.pop("seed", None),
                          n=spec.pop("n", 1), structured_outputs=StructuredOutputsParams(**spec))


# -- a validator for the schema subset, written from the schema -------------------------------

def validates(value, schema) -> bool:
    if "enum" in schema:
        return any(value == v and type(value) is type(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(validates(value, {**schema, "type": k}) for k in kind)
    if kind == "object":
        return (isinstance(value, dict) and set(schema["required"]) <= set(value)
                and all(validates(value[k], schema["properties"][k]) for k in value))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9)
                and all(validates(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return kind == "null" and value is None


# -- the DFA against re.fullmatch ------------------------------------------------------------

ALPHABET = "ab019 -.\n\"é€"
ATOMS = ["a", "b", "0", r"\d", r"\w", r"\s", ".", "[a-c]", "[^a]", "[0-9 ]", r"\.", "é", r"[^\n\"]", "-"]


@st.composite
def regexes(draw, depth: int = 0) -> str:
    if depth > 2 or draw(st.booleans()):
        return draw(st.sampled_from(ATOMS))
    kind = draw(st.sampled_from(["concat", "alt", "star", "plus", "opt", "rep", "group"]))
    a = draw(regexes(depth + 1))
    if kind == "concat":
        return a + draw(regexes(depth + 1))
    if kind == "alt":
        return f"({a}|{draw(regexes(depth + 1))})"
    if kind == "rep":
        lo = draw(st.integers(0, 2))
        return f"(?:{a}){{{lo},{lo + draw(st.integers(0, 2))}}}"
    return f"({a})" + {"star": "*", "plus": "+", "opt": "?", "group": ""}[kind]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(regexes(), st.lists(st.text(alphabet=ALPHABET, max_size=6), min_size=8, max_size=8))
def test_dfa_matches_python_re(pattern, strings):
    dfa = regex_to_dfa(pattern)
    for s in strings:
        assert dfa.fullmatch(s.encode()) == bool(re.fullmatch(pattern, s, re.ASCII)), (pattern, s)
    # and strings the regex does match (found by re) are accepted too
    for s in [x + y for x in strings for y in strings][:40]:
        assert dfa.fullmatch(s.encode()) == bool(re.fullmatch(pattern, s, re.ASCII)), (pattern, s)


@pytest.mark.parametrize("pattern", REGEXES + [schema_to_regex(s) for s in SCHEMAS])
def test_dfa_accepts_what_re_accepts(pattern):
    """Strings built to match (random walks of the DFA) are matched by re, and re's verdict
    agrees on their one-byte edits."""
    import random

    dfa = regex_to_dfa(pattern)
    rng = random.Random(0)
    for _ in range(50):
        state, out = 0, b""
        for _ in range(rng.randrange(30)):
            options = [b for b in range(256) if dfa.transitions[state][b] != DEAD]
            if not options or (state in dfa.accepting and rng.random() < 0.2):
                break
            out += bytes([rng.choice(options)])
            state = dfa.transitions[state][out[-1]]
        text = out.decode("utf-8", errors="replace")
        if state in dfa.accepting:
            assert re.fullmatch(pattern, text, re.ASCII), (pattern, text)
        edited = text[:-1] + "Z"
        assert dfa.fullmatch(edited.encode()) == bool(re.fullmatch(pattern, edited, re.ASCII))


def test_schema_regex_matches_json_dumps():
    value = {"ok": True, "score": -2, "tags": ["a", 3, None], "pos": {"x": None}}
    dfa = regex_to_dfa(schema_to_regex(SCHEMAS[1]))
    assert dfa.fullmatch(json.dumps(value).encode())
    assert dfa.fullmatch(json.dumps(value, separators=(",", ":")).encode())
    assert not dfa.fullmatch(json.dumps({**value, "ok": 1}).encode())


# -- tokens to bytes, and masks over the vocabulary ------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def vocab(tokenizer) -> Vocabulary:
    return Vocabulary(token_bytes(tokenizer, len(tokenizer)), [tokenizer.eos_token_id])


@pytest.mark.parametrize("text", ["the engine schedules 42 requests", "héllo wörld, 你好 € 🙂", "a\n\tb  c"])
def test_token_bytes_concatenate_to_the_text(tokenizer, text):
    """Byte-level BPE: the bytes of a text's tokens, joined, are the text's UTF-8 (multi-byte
    characters split across tokens included)."""
    table = token_bytes(tokenizer, len(tokenizer))
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    assert all(table[i] is None for i in tokenizer.all_special_ids)


def brute_force_mask(dfa, vocab: Vocabulary, state: int) -> torch.Tensor:
    allowed = torch.zeros(vocab.vocab_size, dtype=torch.bool)
    for token_id, data in enumerate(vocab.token_bytes):
        if data:
            allowed[token_id] = dfa.walk(state, data) != DEAD
    if state in dfa.accepting:
        allowed[vocab.eos_token_ids] = True
    return allowed


@pytest.mark.parametrize("pattern", REGEXES[:5] + [schema_to_regex(SCHEMAS[0])])
def test_token_masks_match_brute_force(vocab, pattern):
    dfa = regex_to_dfa(pattern)
    index = TokenIndex(dfa, vocab)
    for state in range(dfa.num_states):
        expected = brute_force_mask(dfa, vocab, state)
        assert torch.equal(unpack_bits(index.mask(state), vocab.vocab_size), expected), (pattern, state)


# random vocabularies: short tokens over a few bytes (so prefixes are shared and the trie has
# depth), duplicates, special tokens (None), multi-byte UTF-8, and long tokens
TOKEN_BYTES = st.one_of(
    st.binary(min_size=1, max_size=5).map(lambda b: bytes(c % 4 + ord("a") for c in b)),
    st.sampled_from([b"0", b"a0", b"-", b".", b" ", b"\xc3", b"\xa9", "é".encode(), b"\n", b"\"", b"aa-"]),
    st.integers(12, 40).map(lambda n: b"ab" * (n // 2) + b"a" * (n % 2)),
    st.none())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(regexes(), st.lists(TOKEN_BYTES, min_size=1, max_size=60))
def test_trie_walk_equals_the_per_token_walk(pattern, tokens):
    """The trie walk (`allowed`) against its plain reference (`allowed_per_token`), bit for
    bit, in every DFA state of random regexes over random vocabularies."""
    vocab = Vocabulary(tokens, eos_token_ids=[0])
    index = TokenIndex(regex_to_dfa(pattern), vocab)
    for state in range(index.dfa.num_states):
        assert torch.equal(index.allowed(state), index.allowed_per_token(state)), (pattern, tokens, state)


def test_trie_shares_prefixes_and_prunes(vocab):
    """On the tiny BPE the trie has fewer nodes than the vocabulary has bytes (shared prefixes
    are walked once), and in a digit state the walk marks only nodes under a digit."""
    trie = vocab.trie
    assert trie.num_nodes < sum(len(b) for b in vocab.token_bytes if b)
    index = TokenIndex(regex_to_dfa("[0-9]+"), vocab)
    alive = trie.walk(index.table, 0, index.dfa.num_states)
    assert 0 < int(alive.sum()) <= sum(1 for b in vocab.token_bytes if b and b[:1].isdigit())
    assert torch.equal(index.allowed(0), index.allowed_per_token(0))


def test_pack_bits_by_hand():
    """The worked five-token example of the stage page: bits 0, 1, 4 -> 0b10011 = 19."""
    assert pack_bits(torch.tensor([True, True, False, False, True])).tolist() == [19]
    allowed = torch.rand(3, 77) > 0.5
    allowed[:, 31] = True  # the sign bit of word 0
    assert torch.equal(unpack_bits(pack_bits(allowed), 77), allowed)
    assert pack_bits(torch.tensor([False] * 31 + [True])).tolist() == [-2**31]


def test_the_five_token_vocabulary_by_hand():
    """The stage page's table: `[0-9]+`, tokens "4" "42" "4a" "a" and EOS (id 4): state 0
    allows tokens 0 and 1 (mask 3), state 1 also EOS (mask 19)."""
    vocab = Vocabulary([b"4", b"42", b"4a", b"a", None], eos_token_ids=[4])
    index = TokenIndex(regex_to_dfa("[0-9]+"), vocab)
    assert index.dfa.accepting == {1}
    assert [index.mask(state).tolist() for state in (0, 1)] == [[3], [19]]


def test_grammar_accept_validate_rollback(vocab, tokenizer):
    grammar = FolovllmGrammar(TokenIndex(regex_to_dfa("(yes|no)"), vocab))
    ids = tokenizer.encode("yes", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    bad = tokenizer.encode("x", add_special_tokens=False)
    assert grammar.validate_tokens(ids + bad) == ids and grammar.state == 0  # no advance
    assert not grammar.accept_tokens([eos])  # EOS before an accepting state
    assert grammar.accept_tokens(ids + [eos]) and grammar.is_terminated()
    grammar.rollback(1)
    assert not grammar.is_terminated() and grammar.state in grammar.index.dfa.accepting
    grammar.rollback(len(ids))
    assert grammar.state == 0 and not grammar.accept_tokens(bad)


@needs_xgrammar
@pytest.mark.parametrize("pattern", [r"\d{1,3}-[a-z]{2,5}", r"(yes|no|maybe)", r"[A-Z][a-z]+ [0-9]+\.",
                                     r"(ab|cd)*e?", r"x[0-9a-f]{2}(,x[0-9a-f]{2}){0,3}", r'"[^"\n]{0,6}"',
                                     r"é{1,3}ü?"])
def test_masks_agree_with_xgrammar(tokenizer, pattern):
    """Along random walks of allowed tokens, our mask and xgrammar's are equal bit for bit."""
    import random

    from folovllm.structured_output.backend_xgrammar import XgrammarBackend

    vocab_size = len(tokenizer)
    ours_backend = FolovllmBackend(tokenizer, vocab_size, [tokenizer.eos_token_id])
    xgr_backend = XgrammarBackend(tokenizer, vocab_size, [tokenizer.eos_token_id])
    rng = random.Random(0)
    for _ in range(5):
        ours = ours_backend.new_grammar(ours_backend.compile(Options.REGEX, pattern))
        theirs = xgr_backend.new_grammar(xgr_backend.compile(Options.REGEX, pattern))
        for _ in range(12):
            masks = torch.zeros(2, (vocab_size + 31) // 32, dtype=torch.int32)
            ours.fill_bitmask(masks, 0)
            theirs.fill_bitmask(masks, 1)
            assert torch.equal(masks[0], masks[1]), pattern
            allowed = unpack_bits(masks[0], vocab_size).nonzero().flatten().tolist()
            assert allowed, pattern
            token = rng.choice(allowed)
            assert ours.accept_tokens([token]) and theirs.accept_tokens([token])
            assert ours.is_terminated() == theirs.is_terminated()
            if ours.is_terminated():
                break


# -- errors ----------------------------------------------------------------------------------

def test_params_need_exactly_one_field():
    with pytest.raises(ValueError, match=r"exactly one of json, regex, choice, grammar, json_object, got \['regex', 'choice'\]"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['pattern'\]"):
        SamplingParams(structured_outputs={"pattern": "a"})


@pytest.fixture(scope="module")
def engine6(tiny_qwen3) -> LLM:
    return llm(tiny_qwen3, max_num_seqs=16)


@pytest.mark.parametrize("spec, message", [
    (dict(regex="(ab"), r"structured_outputs.regex: invalid regex '\(ab' at position 3: missing '\)'"),
    (dict(regex="a(?=b)"), "structured_outputs.regex: .*(group extension|Lookahead is not supported)"),
    (dict(json="{not json"), "structured_outputs.json: the schema is not valid JSON"),
    (dict(json={"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1}),
     r"structured_outputs.json: maxItems \(1\) < minItems \(3\)"),
    (dict(choice=["a", ""]), "choice must be a non-empty list of non-empty strings"),
])
def test_compile_errors_are_clear(engine6, spec, message):
    with pytest.raises(ValueError, match=message):
        engine6.generate("the", structured(**spec), use_tqdm=False)
    assert not engine6.llm_engine.has_unfinished_requests()


def test_folovllm_backend_names_xgrammar_for_what_it_cannot_do(tiny_qwen3):
    only_ours = llm(tiny_qwen3, structured_outputs_backend="folovllm")
    for spec in (dict(grammar='root ::= "a"'),
                 dict(json={"type": "string", "format": "date"}),
                 dict(json={"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]})):
        with pytest.raises(ValueError, match="xgrammar"):
            only_ours.generate("the", structured(**spec), use_tqdm=False)
    with pytest.raises(ValueError, match="structured_outputs_backend must be"):
        llm(tiny_qwen3, structured_outputs_backend="outlines")


# -- with speculative decoding (stage 09) ----------------------------------------------------

SPEC_SPECS = [dict(regex=r"[a-z ]{1,40}"), dict(regex=r"(ab|cd|the ){1,12}"), dict(choice=CHOICES),
              dict(json={"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                          "tags": {"type": "array", "maxItems": 4, "items": {
                                                              "type": "string", "maxLength": 6}}},
                         "required": ["name", "tags"]})]
# repeated text, so the n-gram proposer finds matches; punctuation and digits the grammars refuse
SPEC_PROMPTS = ["the engine the engine the engine 12, 34, 12, 34, 12", "ab cd ab cd ab! cd! ab",
                "a model predicts a model predicts", '{"name": "x", "name": "x", 1 2 3']
PROPOSERS = {"ngram": lambda path: ngram_config(3),
             "draft_model": lambda path: {"method": "draft_model", "model": str(path), "num_speculative_tokens": 3}}


def ngram_config(k: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def spec_decoding_run(path, backend: str, speculative_config=None):
    """The structured requests greedy and sampled (seeded), two free ones between them."""
    engine = llm(path, structured_outputs_backend=backend, speculative_config=speculative_config)
    greedy = [structured(max_tokens=40, temperature=0, **s) for s in SPEC_SPECS]
    sampled = [structured(max_tokens=40, seed=i, **s) for i, s in enumerate(SPEC_SPECS)]
    free = [SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=20, seed=7)]
    prompts = SPEC_PROMPTS * 2 + ["the engine the engine", "a model predicts a model"]
    outputs = engine.generate(prompts, greedy + sampled + free, use_tqdm=False)
    return engine, outputs


@pytest.fixture(scope="module")
def without_speculation(tiny_qwen3):
    cache = {}

    def run(backend):
        if backend not in cache:
            cache[backend] = [list(o.outputs[0].token_ids) for o in spec_decoding_run(tiny_qwen3, backend)[1]]
        return cache[backend]
    return run


@pytest.mark.parametrize("backend", ["folovllm", pytest.param("xgrammar", marks=needs_xgrammar)])
@pytest.mark.parametrize("proposer", list(PROPOSERS))
def test_structured_outputs_with_speculative_decoding(tiny_qwen3, without_speculation, proposer, backend):
    """Structured requests (regexes, a choice, a schema; greedy and sampled) beside free ones,
    with n-gram drafts and with a draft model (the target itself: its drafts are its own
    unmasked greedy tokens, which the grammar often refuses). Every output is valid, the greedy
    and free ones are token for token the run without speculation, drafts were verified and
    accepted, the grammar cut some of them, and no KV block is left."""
    engine, outputs = spec_decoding_run(tiny_qwen3, backend, PROPOSERS[proposer](tiny_qwen3))
    n = len(SPEC_SPECS)
    check_outputs(outputs[: 2 * n], SPEC_SPECS * 2, strict_json=backend == "folovllm")
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    reference = without_speculation(backend)
    assert tokens[:n] == reference[:n]  # greedy: speculation changes no token
    assert tokens[2 * n] == reference[2 * n]  # the free greedy request beside them
    stats, manager = engine.stats.spec_decoding, engine.llm_engine.structured_output_manager
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert 0 < manager.num_draft_tokens_refused < manager.num_draft_tokens_validated
    assert engine.llm_engine.kv_cache_manager.num_used_blocks == 0


def test_one_mask_row_per_verified_position(vocab, tokenizer):
    """`fill_bitmask_with_drafts` writes the grammar's mask after each draft prefix, and leaves
    the grammar where it was (the drafts were only tentatively accepted)."""
    from folovllm.structured_output import fill_bitmask_with_drafts

    index = TokenIndex(regex_to_dfa(r"[0-9]{2}-[a-z]+"), vocab)
    grammar = FolovllmGrammar(index)
    ids = tokenizer.encode("12-ab", add_special_tokens=False)
    grammar.accept_tokens(ids[:1])
    drafts = grammar.validate_tokens(ids[1:] + ids[:1])  # the trailing digit is refused
    assert drafts == ids[1:]
    bitmask = torch.zeros(len(drafts) + 1, vocab.num_words, dtype=torch.int32)
    fill_bitmask_with_drafts(grammar, bitmask, 0, drafts)
    state = grammar.state
    for j in range(len(drafts) + 1):
        assert torch.equal(bitmask[j], index.mask(state))
        if j < len(drafts):
            state = index.next_state(state, drafts[j])
    assert grammar.state == index.next_state(0, ids[0]) and len(grammar.history) == 1


# -- the engine ------------------------------------------------------------------------------

def check_outputs(outputs, specs, strict_json: bool = True):
    """Every completion of every output obeys its spec (100%). `strict_json=False` for
    xgrammar, whose JSON strings admit raw control characters (all but CR and LF), which
    `json.loads` refuses by default."""
    for output, spec in zip(outputs, specs):
        for completion in output.outputs:
            text = completion.text
            assert completion.finish_reason == "stop", (spec, text, completion.finish_reason)
            if "regex" in spec:
                assert re.fullmatch(spec["regex"], text, re.ASCII), (spec, text)
            elif "choice" in spec:
                assert text in spec["choice"], (spec, text)
            else:
                assert validates(json.loads(text, strict=strict_json), spec["json"]), (spec, text)


def all_specs():
    return ([dict(regex=r) for r in REGEXES] + [dict(choice=CHOICES)]
            + [dict(json=s) for s in SCHEMAS[:3]])


CONFIGS = {
    "stage 6": dict(),
    "chunked prefill, budget 13": dict(max_num_batched_tokens=13, max_num_seqs=13),
    "preemption (tiny KV)": dict(kv_cache_memory=9 * 16 * 512, max_model_len=128, max_num_seqs=8),
    "stage 2 (no paged KV)": dict(stage=2),
    "stage 1 (static batch)": dict(stage=1, max_num_seqs=8),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_output_obeys_its_spec(tiny_qwen3, config):
    """All specs at once, sampled (temperature 1, seeded, n=2), mixed with free requests, and
    the free ones unchanged by their structured neighbours; under chunked prefill, preemption,
    the static batch. The prompts share a prefix (prefix caching hits)."""
    kw = dict(CONFIGS[config])
    engine = llm(tiny_qwen3, **kw)
    specs = all_specs()
    prompts = [f"the engine schedules requests {i}" for i in range(len(specs))]
    params = [structured(max_tokens=80, seed=i, n=2, **spec) for i, spec in enumerate(specs)]
    free = SamplingParams(max_tokens=12, temperature=0)
    outputs = engine.generate(prompts + ["a model predicts"] * 2, params + [free] * 2, use_tqdm=False)
    check_outputs(outputs[: len(specs)], specs)
    alone = engine.generate(["a model predicts"], free, use_tqdm=False)[0]
    assert outputs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    if config == "preemption (tiny KV)":
        assert engine.llm_engine.scheduler.num_preemptions > 0
    # seeded sampling is batch-independent: one spec alone gives the same tokens
    again = engine.generate(prompts[1], params[1], use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in outputs[1].outputs]
    assert engine.llm_engine.kv_cache_manager.num_used_blocks == 0


def test_greedy_unchanged_when_the_grammar_allows_everything(greedy_reference, tiny_qwen3):
    """`(.|\\n)*` allows every token that keeps the output valid UTF-8, and EOS after a whole
    character. HF's greedy tokens, up to the first that would make the bytes invalid UTF-8
    (judged by Python's incremental UTF-8 decoder), are ours under that grammar."""
    import codecs

    ref = greedy_reference("qwen3")
    engine = llm(tiny_qwen3, max_model_len=512)
    table = token_bytes(engine.llm_engine.tokenizer, engine.llm_engine.vocab_size)
    eos = engine.llm_engine.eos_token_ids

    def valid_prefix(ids: list[int]) -> int:
        decoder, data = codecs.getincrementaldecoder("utf-8")(), b""
        for k, t in enumerate(ids):
            if t in eos:
                try:
                    data.decode("utf-8")
                    return k + 1
                except UnicodeDecodeError:
                    return k
            if table[t] is None:
                return k
            try:
                decoder.decode(table[t], final=False)
            except UnicodeDecodeError:
                return k
            data += table[t]
        return len(ids)

    cases = [(p, valid_prefix(o), o) for p, o in zip(ref.prompts, ref.outputs)]
    cases = [(p, k, o[:k]) for p, k, o in cases if k > 0]
    assert sum(k for _, k, _ in cases) >= 20, "too few HF tokens are valid UTF-8 to compare"
    params = [structured(max_tokens=k, temperature=0, regex=r"(.|\n)*") for _, k, _ in cases]
    outputs = engine.generate([{"prompt_token_ids": p} for p, _, _ in cases], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o for _, _, o in cases]


def test_unbounded_schema_never_breaks_its_grammar(engine6, vocab):
    """A number and an unbounded string: each output stops as valid JSON, or runs out of
    max_tokens as a prefix the grammar can still complete (no token it does not allow)."""
    spec = SCHEMAS[3]
    dfa = regex_to_dfa(schema_to_regex(spec))
    outs = engine6.generate(["the"] * 8, [structured(max_tokens=30, seed=i, json=spec) for i in range(8)],
                            use_tqdm=False)
    reasons = []
    for out in outs:
        c = out.outputs[0]
        reasons.append(c.finish_reason)
        if c.finish_reason == "stop":
            assert validates(json.loads(c.text), spec), c.text
        else:
            assert c.finish_reason == "length"
            data = b"".join(vocab.token_bytes[t] for t in c.token_ids)
            assert dfa.walk(0, data) != DEAD, c.text
    assert "stop" in reasons


def test_impossible_grammar_ends_with_length(engine6):
    """50 x's cannot fit in 5 tokens: finish_reason "length", and every token is an x."""
    out = engine6.generate("the", structured(max_tokens=5, regex="x{50}"), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert set(out.text) == {"x"} and len(out.text) >= 5


def test_greedy_choice_is_one_of_them_and_ends_with_eos(engine6):
    out = engine6.generate("the", structured(temperature=0, choice=CHOICES), use_tqdm=False)[0].outputs[0]
    assert out.text in CHOICES and out.finish_reason == "stop"
    assert out.token_ids[-1] in engine6.llm_engine.eos_token_ids


def test_waiting_for_grammar_does_not_block_others(tiny_qwen3):
    """While a grammar compiles, its request waits (WAITING_FOR_GRAMMAR) and the free request
    behind it runs; once compiled it runs too. Compiled once for two requests with one spec."""
    engine = llm(tiny_qwen3).llm_engine
    manager = engine.structured_output_manager
    backend = manager.backend("folovllm")
    release, calls = threading.Event(), []
    compile_ = backend.compile

    def slow_compile(kind, spec):
        calls.append(spec)
        release.wait(30)
        return compile_(kind, spec)

    backend.compile = slow_compile
    engine.add_request("s1", "the engine", structured(max_tokens=8, choice=["yes", "no"]))
    engine.add_request("s2", "the engine", structured(max_tokens=8, choice=["yes", "no"]))
    engine.add_request("free", "a model", SamplingParams(max_tokens=3, temperature=0))
    finished = {}
    for _ in range(3):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "free" in finished
    waiting = list(engine.scheduler.waiting)
    assert [r.request_id for r in waiting] == ["s1", "s2"]
    assert all(r.status == RequestStatus.WAITING_FOR_GRAMMAR for r in waiting)
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["s1"].outputs[0].text in ("yes", "no") and finished["s2"].outputs[0].text in ("yes", "no")
    assert len(calls) == 1


def test_a_compile_that_fails_in_the_thread_fails_only_its_request(tiny_qwen3):
    """The spec passed the check, the compile raised anyway: that request finishes with
    finish_reason "error" and the reason, the free one beside it finishes normally, no KV is left."""
    engine = llm(tiny_qwen3).llm_engine
    backend = engine.structured_output_manager.backend("folovllm")

    def broken(kind, spec):
        raise RuntimeError("the DFA exploded")

    backend.compile = broken
    engine.add_request("bad", "the engine", structured(max_tokens=8, regex="a+"))
    engine.add_request("free", "a model", SamplingParams(max_tokens=3, temperature=0))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert finished["bad"].finish_reason == "error" and "the DFA exploded" in finished["bad"].error
    assert finished["free"].finish_reason == "length" and len(finished["free"].token_ids) == 3
    assert engine.kv_cache_manager.num_used_blocks == 0


def test_no_mask_for_free_batches(engine6, monkeypatch):
    """A batch without structured rows fills no bitmask (the manager's buffer stays unbuilt)."""
    manager = engine6.llm_engine.structured_output_manager
    fresh = StructuredOutputManager(engine6.llm_engine.config, engine6.llm_engine.tokenizer,
                                    engine6.llm_engine.vocab_size, engine6.llm_engine.eos_token_ids)
    monkeypatch.setattr(engine6.llm_engine, "structured_output_manager", fresh)
    engine6.generate(["the", "a model"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert fresh.bitmask is None and fresh.executor is None and not fresh.backends
    assert manager is not fresh


def json_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


def test_json_object_regex_bounds_the_depth():
    """Our json_object pattern takes any JSON object as json.dumps writes it, up to nesting
    depth 4, and nothing that is not one."""
    dfa = cached_dfa(json_object_regex())
    accepted = [{}, {"a": 1}, {"a": [1, 2.5e-3, "x\\y\"", None, True]}, {"a": {"b": {"c": [1]}}},
                {"k": [], "l": {}, "m": [[], {}]}, {"é": "中文 \u2028"}]
    for value in accepted:
        for separators in ((", ", ": "), (",", ":")):
            text = json.dumps(value, separators=separators, ensure_ascii=False)
            assert dfa.fullmatch(text.encode()), text
    refused = ['{"a": {"b": {"c": {"d": [1]}}}}', '[1]', '"x"', '{"a": 1,}', '{"a"}', '{a: 1}',
               '{"a": 01}', '{"a": [1}', '{"a": 1]', '{"a":  1}', ' {}', '{"a": "\x01"}']
    for text in refused:
        assert not dfa.fullmatch(text.encode()), text


def test_json_object_in_our_backend(tiny_qwen3, vocab):
    """json_object on the folovllm backend: every output that stops is a JSON object (nesting
    at most 4 deep); one that runs out of max_tokens is a prefix the grammar can complete."""
    engine = llm(tiny_qwen3, structured_outputs_backend="folovllm")
    tokenizer = engine.llm_engine.tokenizer
    # the random model writes long strings; a bias toward JSON's punctuation makes it nest and close
    bias = {tokenizer.convert_tokens_to_ids(c): 6.0 for c in "{[\"}]:,1"}
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, logit_bias=bias,
                             structured_outputs=StructuredOutputsParams(json_object=True)) for i in range(10)]
    outs = engine.generate(["the"] * 10, params, use_tqdm=False)
    dfa = cached_dfa(json_object_regex())
    stopped = 0
    for out in outs:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            assert isinstance(value, dict) and json_depth(value) <= JSON_OBJECT_MAX_DEPTH, c.text
            stopped += 1
        else:
            assert c.finish_reason == "length"
            assert dfa.walk(0, b"".join(vocab.token_bytes[t] for t in c.token_ids)) != DEAD, c.text
    assert stopped >= 3
    backend = engine.llm_engine.structured_output_manager.validate_request(structured(json_object=True))
    assert backend.name == "folovllm"


@needs_xgrammar
def test_xgrammar_backend_in_the_engine(tiny_qwen3):
    """json_object and a schema beyond our subset go to xgrammar under "auto"; "xgrammar"
    compiles everything, our regexes included."""
    engine = llm(tiny_qwen3)
    outs = engine.generate(["the"] * 2, [structured(max_tokens=60, seed=0, json_object=True),
                                        structured(max_tokens=60, seed=1, json={"type": "integer", "minimum": 5})],
                           use_tqdm=False)
    texts = [o.outputs[0] for o in outs]
    assert all(c.finish_reason == "stop" for c in texts), texts
    manager = engine.llm_engine.structured_output_manager
    assert manager.validate_request(structured(json_object=True)).name == "xgrammar"  # unbounded
    assert isinstance(json.loads(texts[0].text), dict)
    assert json.loads(texts[1].text) >= 5
    xgr = llm(tiny_qwen3, structured_outputs_backend="xgrammar")
    specs = [dict(regex=REGEXES[0]), dict(choice=CHOICES), dict(json=SCHEMAS[0])]
    check_outputs(xgr.generate(["the"] * 3, [structured(max_tokens=80, seed=i, **s) for i, s in enumerate(specs)],
                               use_tqdm=False), specs)
