"""The DFA walked over the token vocabulary: for each DFA state, which tokens keep it alive.

A token is allowed in state s when walking all its bytes from s never reaches DEAD; EOS is
allowed exactly in accepting states; every other special token never (its text is not output).
Worked by hand for the regex `[0-9]+` (DFA: 0 --digit--> 1 (accepting) --digit--> 1) and five
tokens::

    token     bytes   from state 0      from state 1
    0 "4"     34      -> 1  allowed     -> 1  allowed
    1 "42"    34 32   -> 1  allowed     -> 1  allowed
    2 "4a"    34 61   -> 1 -> DEAD  no  -> DEAD   no
    3 "a"     61      DEAD          no  DEAD      no
    4 <eos>   -       not accepting no  accepting allowed
    mask      state 0: 0b00011 = 3      state 1: 0b10011 = 19      (bit i = token i)

Masks are stored as vLLM and xgrammar do, `ceil(vocab / 32)` int32 words per row, bit i % 32 of
word i // 32 for token i (int32 and not bool: 32x less to copy for a 151,936-token vocabulary,
19 KB a row). They are computed lazily, the first time the DFA is in a state, and cached.

How the walk is vectorised: the token bytes sit in one [V, L] tensor, padded with the value
256, and the DFA in one [S + 1, 257] table whose row S is DEAD (it stays DEAD) and whose
column 256 maps each state to itself (padding changes nothing). Then L gathers walk every token
at once; tokens are sorted longest first, so step i only touches the tokens longer than i::

    state = [s, s, ..., s]                       # [V]
    for i in range(L):  state[:n_i] = table[state[:n_i], bytes[:n_i, i]]
    allowed = state != DEAD

Tokens to bytes: a byte-level BPE (GPT-2, Qwen, Llama 3, our tiny tokenizers) writes each byte
as one printable character (`bytes_to_unicode`: the 188 printable bytes as themselves, the
other 68 - space, control characters, 0x7F-0xA0, 0xAD - as chr(256 + k)), so "Ġthe" is
b" the"; a SentencePiece vocabulary writes a space as "▁" and a raw byte as "<0xAB>". Added
tokens are their text.
"""

from __future__ import annotations

import sys
import threading
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch

from folovllm.structured_output.regex_dfa import DEAD, DFA


# --8<-- [start:bytes_to_unicode]
@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table (HF tokenizers' ByteLevel): printable bytes map to
    themselves, the rest to chr(256), chr(257), ... in byte order, so every byte is a visible
    character and a token is a string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
# --8<-- [end:bytes_to_unicode]


def token_bytes(tokenizer: Any, vocab_size: int) -> list[Optional[bytes]]:
    """Each token id's bytes, None for special tokens and ids the tokenizer does not have
    (Qwen3's model has 151,936 rows, its tokenizer 151,669 tokens). ValueError when the
    vocabulary is neither byte-level nor SentencePiece-style."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    result: list[Optional[bytes]] = [None] * vocab_size
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        if i in added:
            result[i] = str(added[i]).encode("utf-8")
        elif all(c in byte_decoder for c in piece):
            result[i] = bytes(byte_decoder[c] for c in piece)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            result[i] = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        elif "▁" in piece or piece.isprintable():
            result[i] = piece.replace("▁", " ").encode("utf-8")
        else:
            raise ValueError(f"token {i} ({piece!r}) is neither byte-level BPE nor SentencePiece; "
                             "the folovllm structured-output backend cannot read this vocabulary "
                             "(use structured_outputs_backend='xgrammar')")
    return result


class Vocabulary:
    """The tokenizer's bytes as tensors, built once per engine and shared by every grammar:
    `bytes` [V', L] (256 = padding), longest first, `ids` [V'] their token ids, `lengths`."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]], eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = len(token_bytes)
        self.eos_token_ids = [t for t in eos_token_ids if t < self.vocab_size]
        # empty tokens are left out: allowing one would let a model loop without progress
        kept = sorted((i for i, b in enumerate(token_bytes) if b), key=lambda i: -len(token_bytes[i]))
        self.token_bytes = token_bytes
        self.ids = torch.tensor(kept, dtype=torch.long)
        self.lengths = [len(token_bytes[i]) for i in kept]
        width = self.lengths[0] if kept else 0
        # one flat byte string scattered into the padded table in one write (row-major order
        # of the "real byte" positions is the concatenation order)
        flat = torch.frombuffer(bytearray(b"".join(token_bytes[i] for i in kept)), dtype=torch.uint8)
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        table = torch.full((len(kept), width), 256, dtype=torch.long)
        table[torch.arange(width)[None, :] < lengths[:, None]] = flat.long()
        self.bytes = table  # [V', L]
        # longer_than[i] = how many tokens are longer than i (they come first)
        self.longer_than = [int((lengths > i).sum()) for i in range(width)]
        self.num_words = (self.vocab_size + 31) // 32


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """bool [..., V] -> int32 [..., ceil(V / 32)]: bit j of word w = token 32 w + j."""
    *lead, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = torch.zeros(*lead, words * 32, dtype=torch.int64)
    padded[..., :vocab] = allowed
    weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)
    packed = (padded.view(*lead, words, 32) * weights).sum(-1)  # [..., W] in [0, 2**32)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [..., W] -> bool [..., vocab_size]: the inverse of `pack_bits`. On a little-endian
    machine token 32 w + j is bit j % 8 of byte 4 w + j // 8, so the words are read as bytes:
    8 shifts of uint8 instead of 32 of int32 (3x less CPU time for [32, 151936])."""
    if sys.byteorder == "little":
        data = bitmask.contiguous().view(torch.uint8)  # [..., 4 W]
        shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    else:
        data, shifts = bitmask, torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (data[..., None] >> shifts) & 1  # [..., 4 W, 8] or [..., W, 32]
    return bits.flatten(-2)[..., :vocab_size].bool()


class TokenIndex:
    """One DFA over one vocabulary: `mask(state)` -> int32 [W], computed once per state.
    Shared by every request with the same spec (the compile cache holds it), read from the
    engine's thread and filled from the compile thread: a lock guards the cache."""

    def __init__(self, dfa: DFA, vocab: Vocabulary) -> None:
        self.dfa = dfa
        self.vocab = vocab
        num_states = dfa.num_states
        table = torch.tensor(dfa.transitions, dtype=torch.long) if num_states else torch.empty(0, 256)
        table[table == DEAD] = num_states  # the DEAD row
        table = torch.cat([table, torch.full((1, 256), num_states, dtype=torch.long)])
        self.table = torch.cat([table, torch.arange(num_states + 1)[:, None]], dim=1)  # [S+1, 257]
        self._masks: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def allowed(self, state: int) -> torch.Tensor:
        """bool [vocab_size]: the tokens whose every byte keeps the DFA alive from `state`,
        plus EOS when `state` accepts."""
        vocab = self.vocab
        states = torch.full((len(vocab.lengths),), state, dtype=torch.long)
        for i, n in enumerate(vocab.longer_than):
            states[:n] = self.table[states[:n], vocab.bytes[:n, i]]
        allowed = torch.zeros(vocab.vocab_size, dtype=torch.bool)
        allowed[vocab.ids] = states != self.dfa.num_states
        if state in self.dfa.accepting:
            allowed[vocab.eos_token_ids] = True
        return allowed

    def mask(self, state: int) -> torch.Tensor:
        with self._lock:
            cached = self._masks.get(state)
        if cached is None:
            cached = pack_bits(self.allowed(state))
            with self._lock:
                self._masks[state] = cached
        return cached

    def next_state(self, state: int, token_id: int) -> int:
        """The state after `token_id`, DEAD if it is not allowed (EOS: the same state)."""
        data = self.vocab.token_bytes[token_id] if token_id < self.vocab.vocab_size else None
        if not data:
            return DEAD
        return self.dfa.walk(state, data)
