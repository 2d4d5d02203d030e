"""Lab 10: structured outputs: the DFA walked over the vocabulary, and the mask packed as bits.

Fill in `pack_bits` and `allowed` below; `FOLOVLLM_LAB=starter pytest stages/10` grades them
(they replace `pack_bits` of `folovllm/structured_output/token_index.py`, in every module that
imported it, and `TokenIndex.allowed` of the same file while stage 10's tests run). Read
labs/10/README.md first.

    regex [0-9]+          DFA: 0 --digit--> 1 (accepting) --digit--> 1
    token  bytes          from 0          from 1
    0 "4"  34             -> 1  yes       -> 1  yes
    1 "42" 34 32          -> 1  yes       -> 1  yes
    2 "4a" 34 61          dead  no        dead  no
    3 "a"  61             dead  no        dead  no
    4 EOS  -              no (0 rejects)  yes (1 accepts)
    mask                  0b00011 = 3     0b10011 = 19
"""

from __future__ import annotations

import torch

# The engine functions these replace (module:function, module:Class.method).
REPLACES = {
    "pack_bits": "folovllm.structured_output.token_index:pack_bits",
    "allowed": "folovllm.structured_output.token_index:TokenIndex.allowed",
}


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """bool [..., V] -> int32 [..., ceil(V / 32)]: bit j of word w = token 32 w + j."""
    # TODO 1: pad the last dimension to a multiple of 32 (zeros: padding tokens are not allowed)
    #         and view it as [..., W, 32].
    # TODO 2: each word is the sum of bit_j * 2**j, computed in int64 (it can reach 2**32 - 1);
    #         then bring it into int32's range: a word >= 2**31 is that minus 2**32 (bit 31 is
    #         the sign bit of an int32).
    raise NotImplementedError("not implemented: see labs/10/README.md")


def allowed(self, state: int) -> torch.Tensor:
    """bool [vocab_size]: the tokens whose every byte keeps the DFA alive from `state`,
    plus EOS when `state` accepts."""
    # `self` is the engine's `TokenIndex`: `self.dfa` (its `transitions[s][b]`, DEAD = -1, and
    # `accepting`), `self.vocab` (a `Vocabulary`: `vocab_size`, `token_bytes[i]` the bytes of
    # token i or None for a special token, `eos_token_ids`). (`self.table`, `self.vocab.bytes`
    # and `self.vocab.longer_than` are the engine's vectorised layout: use them or not.)
    # TODO 1: for every token with bytes, walk its bytes from `state` through the DFA; it is
    #         allowed if it never reaches DEAD. A special token (None) never is.
    # TODO 2: EOS is allowed exactly when `state` is accepting.
    raise NotImplementedError("not implemented: see labs/10/README.md")
