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

How the walk is done: over a byte trie of the vocabulary (`ByteTrie`), built once per engine,
so tokens that share a prefix walk it once ("Ġthe", "Ġthere", "Ġtheir" walk " the" once) and a
prefix the DFA refuses is never extended ("Ġx..." dies at "Ġ" in a digit state, with every
token below it). The trie is walked one depth at a time, all live nodes of a depth at once::

    depth 1:  the root's children     state = table[s, byte]        keep the live ones
    depth d:  the children of the live nodes of depth d - 1, each with its parent's state

and a token is allowed when its last node is live. Its plain reference, `TokenIndex.allowed_per_token`
(the walk before the trie), walks every token's bytes on its own: the token bytes in one
[V, L] tensor padded with the value 256, the DFA in one [S + 1, 257] table whose row S is DEAD
(it stays DEAD) and whose column 256 maps each state to itself (padding changes nothing), L
gathers for every token at once; tests compare the two masks bit for bit. The trie walk's
loop runs once per depth, up to the longest token (192 bytes of indentation in a BPE trained
on Python code), but stops at the first depth where no node is live, and the per-token walk
runs as many steps without ever stopping early: on that BPE the trie is 4-16x faster per
state (measured on the stage 10 page).

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


def pad_bytes(token_bytes: Sequence[Optional[bytes]], ids: Sequence[int]) -> torch.Tensor:
    """The bytes of tokens `ids`, in that order, as long [N, L] padded with 256. One flat byte
    string scattered into the table in one write (row-major order of the real-byte positions
    is the concatenation order)."""
    lengths = torch.tensor([len(token_bytes[i]) for i in ids], dtype=torch.long)
    width = int(lengths.max()) if len(ids) else 0
    flat = torch.frombuffer(bytearray(b"".join(token_bytes[i] for i in ids) or b"\0"), dtype=torch.uint8)
    table = torch.full((len(ids), width), 256, dtype=torch.long)
    table[torch.arange(width)[None, :] < lengths[:, None]] = flat[: int(lengths.sum())].long()
    return table


class PaddedTokens:
    """Tokens as one [N, L] tensor for the per-token walk: `bytes` (256 = padding), longest
    first, `ids` [N] their token ids, `longer_than[i]` = how many are longer than i bytes (they
    come first, so step i of the walk touches only those)."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]], ids: Sequence[int]) -> None:
        kept = sorted(ids, key=lambda i: -len(token_bytes[i]))
        self.ids = torch.tensor(kept, dtype=torch.long)
        self.bytes = pad_bytes(token_bytes, kept)  # [N, L]
        lengths = (self.bytes != 256).sum(dim=1)
        self.longer_than = [int((lengths > i).sum()) for i in range(self.bytes.shape[1])]

    def walk(self, table: torch.Tensor, state: int) -> torch.Tensor:
        """The state each token reaches from `state` -> long [N] (table's DEAD row if it died).
        `table` is `TokenIndex.table`, [S + 1, 257]."""
        states = torch.full((len(self.ids),), state, dtype=torch.long)
        for i, n in enumerate(self.longer_than):
            states[:n] = table[states[:n], self.bytes[:n, i]]
        return states


# --8<-- [start:byte_trie]
class ByteTrie:
    """The vocabulary's bytes as a trie, stored by depth for a vectorised walk. The nodes of
    depth d are the distinct d-byte prefixes of the tokens, in sorted order, so the children
    of one node are contiguous::

        tokens  "a" "ab" "ac" "b"      depth 1: a b       (children of the root: 0..1)
                                       depth 2: ab ac     (children of "a": 0..1, of "b": none)

    levels[d - 1] = (byte [N_d], first_child [N_(d-1)], num_children [N_(d-1)]) with the root
    as depth 0's one node; `token_node[j]` is the node (numbered across depths) where token
    `ids[j]` ends. Built from the sorted tokens without a Python loop over bytes: token i
    starts new nodes at the depths beyond its common prefix with token i - 1."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]], ids: Sequence[int]) -> None:
        kept = sorted(ids, key=lambda i: token_bytes[i])
        self.ids = torch.tensor(kept, dtype=torch.long)
        self.levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.level_offset: list[int] = []  # the number of the first node of each depth
        self.num_nodes = 0
        self.token_node = torch.zeros(len(kept), dtype=torch.long)
        if not kept:
            return
        table = pad_bytes(token_bytes, kept)  # [V, L], rows in sorted order
        lengths = (table != 256).sum(dim=1)
        # common prefix with the token before (sorted order): the depths it shares nodes at
        same = (table[1:] == table[:-1]).long().cumprod(dim=1).sum(dim=1)
        shared = torch.cat([torch.zeros(1, dtype=torch.long), same])  # duplicates: all of L
        node_of = torch.zeros(len(kept), dtype=torch.long)  # each token's node at depth d - 1
        num_parents = 1
        for d in range(1, table.shape[1] + 1):
            new = (lengths >= d) & (shared < d)  # token i starts a node at depth d
            index = torch.cumsum(new.long(), 0) - 1  # its node at depth d (the last one started)
            nodes = new.nonzero().squeeze(1)
            parent = node_of[nodes]
            num_children = torch.bincount(parent, minlength=num_parents)
            first_child = torch.cumsum(num_children, 0) - num_children
            self.levels.append((table[nodes, d - 1], first_child, num_children))
            self.level_offset.append(self.num_nodes)
            ends = lengths == d
            self.token_node[ends] = self.num_nodes + index[ends]
            self.num_nodes += len(nodes)
            node_of, num_parents = index, len(nodes)

    # --8<-- [start:trie_walk]
    def walk(self, table: torch.Tensor, state: int, dead: int) -> torch.Tensor:
        """Which nodes the DFA survives from `state` -> bool [num_nodes]. `table` is
        `TokenIndex.table` [S + 1, 257], `dead` its DEAD row. Depth by depth, only the children
        of live nodes are looked at: a dead prefix prunes everything below it."""
        flat, width = table.flatten(), table.shape[1]
        alive = torch.zeros(self.num_nodes, dtype=torch.bool)
        live = torch.zeros(1, dtype=torch.long)  # the live nodes of the depth above (the root)
        states = torch.tensor([state], dtype=torch.long)  # and their DFA states
        for depth, (byte, first_child, num_children) in enumerate(self.levels):
            counts = num_children[live]
            total = int(counts.sum())
            if total == 0:
                break
            # the children of each live node, contiguous: first_child + 0, 1, ..., count - 1
            starts = first_child[live] - (torch.cumsum(counts, 0) - counts)
            children = torch.repeat_interleave(starts, counts, output_size=total) + torch.arange(total)
            parent_states = torch.repeat_interleave(states, counts, output_size=total)
            child_states = flat[parent_states * width + byte[children]]
            keep = child_states != dead
            live, states = children[keep], child_states[keep]
            alive[self.level_offset[depth] + live] = True
        return alive
    # --8<-- [end:trie_walk]
# --8<-- [end:byte_trie]


class Vocabulary:
    """The tokenizer's bytes, built once per engine and shared by every grammar: `token_bytes`
    (None for special tokens), and two layouts built on first use, `trie` (a `ByteTrie`, for
    the masks) and `padded` (`PaddedTokens`, for the per-token reference walk)."""

    def __init__(self, token_bytes: Sequence[Optional[bytes]], eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = len(token_bytes)
        self.eos_token_ids = [t for t in eos_token_ids if t < self.vocab_size]
        self.token_bytes = token_bytes
        # empty tokens are left out: allowing one would let a model loop without progress
        self.kept = [i for i, b in enumerate(token_bytes) if b]
        self.num_words = (self.vocab_size + 31) // 32
        self._lock = threading.Lock()  # the compile thread and the step may both build them

    @property
    def trie(self) -> ByteTrie:
        with self._lock:
            if "_trie" not in self.__dict__:
                self._trie = ByteTrie(self.token_bytes, self.kept)
            return self._trie

    @property
    def padded(self) -> PaddedTokens:
        with self._lock:
            if "_padded" not in self.__dict__:
                self._padded = PaddedTokens(self.token_bytes, self.kept)
            return self._padded

    # the per-token walk's layout under its old names (lab 10's starter mentions them)
    bytes = property(lambda self: self.padded.bytes)
    longer_than = property(lambda self: self.padded.longer_than)


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

    # --8<-- [start:allowed]
    def allowed(self, state: int) -> torch.Tensor:
        """bool [vocab_size]: the tokens whose every byte keeps the DFA alive from `state`,
        plus EOS when `state` accepts."""
        vocab, trie = self.vocab, self.vocab.trie  # the trie walk: a token ends at a live node
        allowed = torch.zeros(vocab.vocab_size, dtype=torch.bool)
        allowed[trie.ids] = trie.walk(self.table, state, self.dfa.num_states)[trie.token_node]
        if state in self.dfa.accepting:
            allowed[vocab.eos_token_ids] = True
        return allowed
    # --8<-- [end:allowed]

    def allowed_per_token(self, state: int) -> torch.Tensor:
        """The plain reference of `allowed`: every token's bytes walked on its own (all tokens
        at once, one gather per byte position), no prefix shared, nothing pruned."""
        vocab, padded = self.vocab, self.vocab.padded
        allowed = torch.zeros(vocab.vocab_size, dtype=torch.bool)
        allowed[padded.ids] = padded.walk(self.table, state) != self.dfa.num_states
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
