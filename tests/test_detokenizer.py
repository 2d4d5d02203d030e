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
from folovllm.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

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
