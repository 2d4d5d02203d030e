"""Incremental detokenization (`folovllm/engine/detokenizer.py`) and prompts tokenized once.

The output text used to be one decode of the whole output every step (O(n) per token); now each
step decodes a short window. It must still give exactly the text of one decode of the whole
output, including multi-byte characters split over tokens and special tokens skipped or kept.
"""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from folovllm import LLM, SamplingParams
from folovllm.engine.detokenizer import (
    REPLACEMENT_CHAR, FastIncrementalDetokenizer, IncrementalDetokenizer, make_detokenizer)

PIECES = ["héllo ", "长城 ", "😀", " the engine", "ñ", "data.", "日本語", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def sequences(tokenizer, count: int = 100):
    rng = random.Random(0)
    for i in range(count):
        if i % 2:  # any ids at all: bytes that form no character, special tokens
            yield [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]
        else:  # text with characters of 2-4 UTF-8 bytes, which the tiny BPE splits over tokens
            yield tokenizer.encode("".join(rng.choice(PIECES) for _ in range(12)), add_special_tokens=False)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_token_by_token_text_equals_one_decode_of_everything(tokenizer, skip_special_tokens):
    split_characters = 0
    for ids in sequences(tokenizer):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        for i, token in enumerate(ids):
            new = detok.add_tokens([token])
            assert not detok.text.endswith(REPLACEMENT_CHAR)  # never half a character
            split_characters += new == "" and tokenizer.decode(ids[: i + 1]).endswith(REPLACEMENT_CHAR)
        whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert detok.text + detok.pending_text() == whole
        assert whole.startswith(detok.text)
    assert split_characters > 10  # the case the windows exist for did happen


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_the_rust_detokenizer_gives_the_plain_ones_text_at_every_step(tokenizer, skip_special_tokens):
    """`FastIncrementalDetokenizer` (DecodeStream) against the plain windows: the same text
    emitted after every token, the same offsets, the same pending text at the end; ids past the
    tokenizer's vocabulary too (a model's vocabulary can be larger: Qwen3-0.6B's shapes here)."""
    assert isinstance(make_detokenizer(tokenizer, skip_special_tokens), FastIncrementalDetokenizer)
    rng = random.Random(1)
    for ids in sequences(tokenizer, 60):
        ids = ids + [len(tokenizer) + rng.randrange(100)] + ids[:5]
        fast = make_detokenizer(tokenizer, skip_special_tokens)
        plain = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        for token in ids:
            assert fast.add_tokens([token]) == plain.add_tokens([token])
            assert (fast.text, fast.prefix_offset, fast.read_offset) == (plain.text, plain.prefix_offset, plain.read_offset)
        assert fast.stream is not None  # never fell back
        assert fast.pending_text() == plain.pending_text()


def test_the_rust_detokenizer_falls_back_to_the_plain_windows(tokenizer):
    """A stream that refuses a window (its text does not start with the text before it) hands
    the request to the plain path, which goes on from the same offsets."""
    ids = tokenizer.encode("héllo 长城 data. the engine 日本語" * 3, add_special_tokens=False)
    detok = make_detokenizer(tokenizer, True)
    steps = 0

    class Refusing:
        def step(self, backend, token):
            nonlocal steps
            steps += 1
            if steps > len(ids) // 2:
                raise Exception("Invalid prefix encountered")
            return stream.step(backend, token)

    stream, detok.stream = detok.stream, Refusing()
    detok.add_tokens(ids[:10])
    for token in ids[10:]:
        detok.add_tokens([token])
    assert detok.stream is None
    assert detok.text + detok.pending_text() == tokenizer.decode(ids)


def test_the_plain_detokenizer_where_the_stream_would_differ(tokenizer):
    """No Rust backend, or a tokenizer that cleans up spaces after decoding (DecodeStream
    does not): the plain windows."""
    class NoBackend:
        def decode(self, token_ids, skip_special_tokens):
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    assert type(make_detokenizer(NoBackend(), True)) is IncrementalDetokenizer
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert type(make_detokenizer(tokenizer, True)) is IncrementalDetokenizer
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def test_each_step_decodes_a_window_not_the_whole_output(tokenizer):
    """A deterministic proxy of the cost: tokens handed to `decode` over a 300-token output. One
    decode of everything per step would hand it 300 * 301 / 2 = 45,150."""
    ids = tokenizer.encode(" the engine schedules 长城 data." * 40, add_special_tokens=False)[:300]
    decoded = []

    class Counting:
        def decode(self, token_ids, skip_special_tokens):
            decoded.append(len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), skip_special_tokens=True)
    for token in ids:
        detok.add_tokens([token])
    assert detok.text == tokenizer.decode(ids)
    assert sum(decoded) < 8 * len(ids) and max(decoded) <= 8


def test_generate_tokenizes_each_prompt_once_and_streams_the_same_text(tiny_qwen3, monkeypatch):
    llm = LLM(str(tiny_qwen3), dtype="float32", custom_ops="none")
    tokenizer = llm.get_tokenizer()
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    prompts = ["The engine", "长城 data", "Schedules"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(calls) == len(prompts)
    for out in outputs:
        completion = out.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    # a stop string found in incrementally decoded text cuts it as in the whole text
    text = outputs[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert stop.strip() and cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
