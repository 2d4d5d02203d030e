"""A regular expression -> a DFA over *bytes*: parse, Thompson's NFA, subset construction.

Why bytes and not characters: a byte-level BPE token is a run of bytes, and one token can end in
the middle of a multi-byte UTF-8 character (Qwen3 has tokens for single bytes 0x80..0xFF). A DFA
over bytes walks any token, whole or split characters alike (`token_index.py`)::

    regex  "é+"           é = C3 A9 in UTF-8
    DFA    0 --C3--> 1 --A9--> 2 (accepting) --C3--> 1
    token  b"\\xc3"        0 -> 1        alive: allowed
    token  b"\\xa9\\xc3"    1 -> 2 -> 1   alive: allowed (ends in the middle of the next é)

The subset (documented, and tested against Python's `re.fullmatch(pattern, s, re.ASCII)` on
random strings):

    literals        any character; non-ASCII ones become their UTF-8 bytes
    escapes         \\. \\* \\\\ ... (any punctuation), \\n \\t \\r \\f \\v, \\xHH, \\uHHHH
    classes         [abc] [a-z] [^"\\\\] and \\d \\w \\s \\D \\W \\S (ASCII meanings, as re.ASCII:
                    \\d = [0-9], \\w = [A-Za-z0-9_], \\s = [ \\t\\n\\r\\f\\v]); ranges are ASCII; a
                    negated class is every character, multi-byte ones included, but those listed
    .               any character but \\n
    quantifiers     * + ? {m} {m,} {m,n}   (greedy; lazy or possessive ones are refused)
    alternation     a|b, groups (...) and (?:...)
    anchors         ^ at the very start and $ at the very end are accepted and change nothing:
                    the whole output must match (fullmatch) anyway

Left out (refused with `UnsupportedRegex`, which names xgrammar): backreferences, lookarounds,
non-ASCII ranges, Unicode classes, flags. A DFA has no memory, so nothing recursive (balanced
brackets of any depth) is expressible: that is what a grammar backend (xgrammar) is for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

MAX_NFA_STATES = 200_000  # a bounded repeat copies its body: {1,100000} would build forever
MAX_DFA_STATES = 20_000  # subset construction can blow up exponentially; say so instead


class UnsupportedRegex(ValueError):
    """The pattern is outside the subset this backend compiles (not necessarily invalid)."""


# -- character sets ---------------------------------------------------------------------------

ASCII_ALL = (1 << 128) - 1  # a set of ASCII bytes is an int: bit b = byte b is in it


def _ascii(chars: str) -> int:
    bits = 0
    for c in chars:
        bits |= 1 << ord(c)
    return bits


def _range(lo: int, hi: int) -> int:
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


DIGIT = _range(ord("0"), ord("9"))
WORD = DIGIT | _range(ord("a"), ord("z")) | _range(ord("A"), ord("Z")) | _ascii("_")
SPACE = _ascii(" \t\n\r\f\v")


@dataclass(frozen=True)
class CharSet:
    """A set of characters: `ascii` bits, the non-ASCII characters `extra`, and `non_ascii`
    = every non-ASCII character (a negated class or `.`) but those in `extra`."""

    ascii: int = 0
    extra: frozenset[str] = frozenset()
    non_ascii: bool = False

    def negate(self) -> "CharSet":
        if self.extra:
            raise UnsupportedRegex("a negated class with non-ASCII characters in it")
        return CharSet(ASCII_ALL & ~self.ascii, frozenset(), not self.non_ascii)

    def union(self, other: "CharSet") -> "CharSet":
        non_ascii = self.non_ascii or other.non_ascii
        extra = frozenset() if non_ascii else self.extra | other.extra
        return CharSet(self.ascii | other.ascii, extra, non_ascii)


DOT = CharSet(ASCII_ALL & ~_ascii("\n"), frozenset(), True)
CLASS_ESCAPES = {"d": CharSet(DIGIT), "w": CharSet(WORD), "s": CharSet(SPACE)}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


# -- the parsed pattern -----------------------------------------------------------------------

@dataclass(frozen=True)
class Chars:
    charset: CharSet


@dataclass(frozen=True)
class Concat:
    parts: tuple["Node", ...]


@dataclass(frozen=True)
class Alt:
    options: tuple["Node", ...]


@dataclass(frozen=True)
class Repeat:
    node: "Node"
    min: int
    max: Optional[int]  # None = unbounded


Node = Union[Chars, Concat, Alt, Repeat]


class _Parser:
    """Recursive descent: alt := concat ('|' concat)*; concat := repeat*; repeat := atom quant?"""

    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def error(self, message: str) -> ValueError:
        return ValueError(f"invalid regex {self.p!r} at position {self.i}: {message}")

    def unsupported(self, what: str) -> UnsupportedRegex:
        return UnsupportedRegex(f"regex {self.p!r}: {what} at position {self.i} is outside the "
                                "folovllm backend's subset")

    def peek(self) -> Optional[str]:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self) -> Node:
        if self.peek() == "^":
            self.i += 1
        node = self.alt()
        if self.peek() == "$" and self.i == len(self.p) - 1:
            self.i += 1
        if self.i != len(self.p):
            if self.peek() == ")":
                raise self.error("unbalanced ')'")
            raise self.unsupported(f"{self.peek()!r}")
        return node

    def alt(self) -> Node:
        options = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.concat())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def concat(self) -> Node:
        parts: list[Node] = []
        while self.peek() not in (None, "|", ")") and not (self.peek() == "$" and self.i == len(self.p) - 1):
            parts.append(self.repeat())
        return parts[0] if len(parts) == 1 else Concat(tuple(parts))

    def repeat(self) -> Node:
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            c = self.peek()
            if c == "{":
                bounds = self.braces()
                if bounds is None:
                    break  # a literal "{", read as an atom next time round
                lo, hi = bounds
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() in ("?", "+"):
                raise self.unsupported("a lazy or possessive quantifier")
            node = Repeat(node, lo, hi)
        return node

    def braces(self) -> Optional[tuple[int, Optional[int]]]:
        """{m} {m,} {m,n} -> (m, n); None when it is not a quantifier (re reads it literally)."""
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1 : end] if end != -1 else ""
        lo_text, comma, hi_text = body.partition(",")
        if comma and not lo_text and hi_text.isdigit():
            lo_text = "0"  # {,n} = {0,n}, as re reads it
        if end == -1 or not lo_text.isdigit() or (hi_text and not hi_text.isdigit()):
            return None
        lo = int(lo_text)
        hi = (int(hi_text) if hi_text else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.error(f"bad repeat {{{body}}}: max < min")
        self.i = end + 1
        return lo, hi

    def atom(self) -> Node:
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.unsupported("a group extension (?...)")
            node = self.alt()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return node
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        if c == "{" and self.braces_ahead():
            raise self.error("nothing to repeat before '{'")
        if c == "[":
            return Chars(self.char_class())
        if c == ".":
            return Chars(DOT)
        if c == "\\":
            escaped = self.escape()
            return Chars(escaped) if isinstance(escaped, CharSet) else Chars(_one(escaped))
        if c in "^$":
            raise self.unsupported(f"the anchor {c!r} inside the pattern")
        return Chars(_one(c))

    def braces_ahead(self) -> bool:
        self.i -= 1
        bounds = self.braces()
        if bounds is None:
            self.i += 1
        return bounds is not None

    def escape(self) -> Union[str, CharSet]:
        if self.peek() is None:
            raise self.error("a trailing backslash")
        c = self.take()
        if c.lower() in CLASS_ESCAPES:
            charset = CLASS_ESCAPES[c.lower()]
            return charset.negate() if c.isupper() else charset
        if c in CHAR_ESCAPES:
            return CHAR_ESCAPES[c]
        if c in "xu":
            width = 2 if c == "x" else 4
            digits = self.p[self.i : self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {width} hex digits")
            self.i += width
            return chr(int(digits, 16))
        if c.isalnum():
            raise self.unsupported(f"the escape \\{c}")
        return c  # an escaped punctuation character is itself

    def char_class(self) -> CharSet:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        charset = CharSet()
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_char()
            if isinstance(lo, CharSet):
                charset = charset.union(lo)
                continue
            if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_char()
                if isinstance(hi, CharSet) or ord(hi) < ord(lo):
                    raise self.error(f"bad range {lo}-{hi}")
                if ord(hi) >= 128:
                    raise self.unsupported("a range of non-ASCII characters")
                charset = charset.union(CharSet(_range(ord(lo), ord(hi))))
            else:
                charset = charset.union(_one(lo))
        return charset.negate() if negated else charset

    def class_char(self) -> Union[str, CharSet]:
        c = self.take()
        if c == "\\":
            return self.escape()
        if c == "[" and self.peek() == ":":
            raise self.unsupported("a POSIX class [:...:]")
        return c


def _one(c: str) -> CharSet:
    return CharSet(1 << ord(c)) if ord(c) < 128 else CharSet(0, frozenset([c]))


def parse_regex(pattern: str) -> Node:
    """Pattern -> syntax tree. ValueError names the position of what is wrong;
    `UnsupportedRegex` (a ValueError) what is valid but outside the subset."""
    if not isinstance(pattern, str):
        raise ValueError(f"a regex must be a string, got {type(pattern).__name__}")
    return _Parser(pattern).parse()


# -- Thompson's construction: syntax tree -> NFA over bytes -----------------------------------

# Every non-ASCII character as UTF-8 byte ranges (the Unicode standard's table 3-7), so the DFA
# accepts exactly the well-formed encodings: no overlong forms, no surrogates.
UTF8_SEQUENCES = [
    [(0xC2, 0xDF), (0x80, 0xBF)],
    [(0xE0, 0xE0), (0xA0, 0xBF), (0x80, 0xBF)],
    [(0xE1, 0xEC), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xED, 0xED), (0x80, 0x9F), (0x80, 0xBF)],
    [(0xEE, 0xEF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF0, 0xF0), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF1, 0xF3), (0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF4, 0xF4), (0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)],
]


@dataclass
class NFA:
    """States 0..n-1; `edges[s]` = [(set of bytes as an int bitmask, target)], `eps[s]` = the
    states reached without reading a byte. One start, one accepting state."""

    edges: list[list[tuple[int, int]]] = field(default_factory=list)
    eps: list[list[int]] = field(default_factory=list)
    start: int = 0
    accept: int = 0

    def new_state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise UnsupportedRegex(f"the pattern needs more than {MAX_NFA_STATES} NFA states "
                                   "(a large bounded repeat?)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node: Node) -> tuple[int, int]:
        """A fragment for `node`: (entry state, exit state)."""
        if isinstance(node, Chars):
            return self.chars(node.charset)
        if isinstance(node, Concat):
            entry = exit_ = self.new_state()
            for part in node.parts:
                s, e = self.build(part)
                self.eps[exit_].append(s)
                exit_ = e
            return entry, exit_
        if isinstance(node, Alt):
            entry, exit_ = self.new_state(), self.new_state()
            for option in node.options:
                s, e = self.build(option)
                self.eps[entry].append(s)
                self.eps[e].append(exit_)
            return entry, exit_
        return self.repeat(node)

    def repeat(self, node: Repeat) -> tuple[int, int]:
        """x{m,n} = m copies of x, then n - m optional ones; x{m,} = m copies then x*."""
        entry = exit_ = self.new_state()
        for _ in range(node.min):
            s, e = self.build(node.node)
            self.eps[exit_].append(s)
            exit_ = e
        if node.max is None:  # a loop: exit -> x -> exit, skippable
            s, e = self.build(node.node)
            self.eps[exit_].append(s)
            self.eps[e].append(exit_)
            return entry, exit_
        end = self.new_state()
        for _ in range(node.max - node.min):
            s, e = self.build(node.node)
            self.eps[exit_].append(s)
            self.eps[exit_].append(end)  # stop repeating here
            exit_ = e
        self.eps[exit_].append(end)
        return entry, end

    def chars(self, charset: CharSet) -> tuple[int, int]:
        entry, exit_ = self.new_state(), self.new_state()
        if charset.ascii:
            self.edges[entry].append((charset.ascii, exit_))
        for c in sorted(charset.extra):
            self.byte_path(entry, exit_, [(b, b) for b in c.encode("utf-8")])
        if charset.non_ascii:
            for ranges in UTF8_SEQUENCES:
                self.byte_path(entry, exit_, ranges)
        return entry, exit_

    def byte_path(self, entry: int, exit_: int, ranges: list[tuple[int, int]]) -> None:
        state = entry
        for k, (lo, hi) in enumerate(ranges):
            target = exit_ if k == len(ranges) - 1 else self.new_state()
            self.edges[state].append((_range(lo, hi), target))
            state = target


# -- subset construction: NFA -> DFA ----------------------------------------------------------

DEAD = -1


@dataclass
class DFA:
    """`transitions[s][b]` = the state after reading byte b in state s, or DEAD (-1): no string
    that starts this way matches. State 0 is the start. Every state can still reach an
    accepting one (the construction keeps only such states), so "not DEAD" means "can still
    become a match"."""

    transitions: list[list[int]]
    accepting: frozenset[int]

    @property
    def num_states(self) -> int:
        return len(self.transitions)

    def walk(self, state: int, data: bytes) -> int:
        for b in data:
            state = self.transitions[state][b]
            if state == DEAD:
                return DEAD
        return state

    def fullmatch(self, data: bytes) -> bool:
        return self.walk(0, data) in self.accepting


def _closure(nfa: NFA, states: set[int]) -> frozenset[int]:
    stack, seen = list(states), set(states)
    while stack:
        for t in nfa.eps[stack.pop()]:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return frozenset(seen)


def _byte_classes(nfa: NFA) -> list[int]:
    """Partition the 256 bytes into classes no edge tells apart (digits usually move together):
    the subset construction then computes one move per class, not per byte. -> one
    representative bitmask per class."""
    classes = [(1 << 256) - 1]
    for bits in {bits for edges in nfa.edges for bits, _ in edges}:
        refined = []
        for cls in classes:
            inside, outside = cls & bits, cls & ~bits
            refined += [part for part in (inside, outside) if part]
        classes = refined
    return classes


def nfa_to_dfa(nfa: NFA) -> DFA:
    """Subset construction: a DFA state is the set of NFA states the bytes so far can be in."""
    classes = _byte_classes(nfa)
    # which classes each edge's byte set covers (a byte set is a union of whole classes)
    covers = {bits: [k for k, cls in enumerate(classes) if cls & bits]
              for bits in {bits for edges in nfa.edges for bits, _ in edges}}
    start = _closure(nfa, {nfa.start})
    index = {start: 0}
    order = [start]
    moves: list[list[tuple[int, int]]] = []  # per DFA state: (class bits, target)
    while len(moves) < len(order):
        current = order[len(moves)]
        row = []
        targets_by_class: dict[int, set[int]] = {}
        for s in current:
            for edge_bits, t in nfa.edges[s]:
                for k in covers[edge_bits]:
                    targets_by_class.setdefault(k, set()).add(t)
        for k, targets in sorted(targets_by_class.items()):
            bits = classes[k]
            target = _closure(nfa, targets)
            if target not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise UnsupportedRegex(f"the pattern's DFA has more than {MAX_DFA_STATES} states")
                index[target] = len(order)
                order.append(target)
            row.append((bits, index[target]))
        moves.append(row)
    accepting = {i for i, states in enumerate(order) if nfa.accept in states}
    return _prune(moves, accepting)


def _prune(moves: list[list[tuple[int, int]]], accepting: set[int]) -> DFA:
    """Drop states from which no accepting state is reachable (they are dead ends: a token
    leading there must be masked), renumbering the rest; expand class moves to 256 bytes."""
    reverse: list[set[int]] = [set() for _ in moves]
    for s, row in enumerate(moves):
        for _, t in row:
            reverse[t].add(s)
    live, stack = set(accepting), list(accepting)
    while stack:
        for s in reverse[stack.pop()]:
            if s not in live:
                live.add(s)
                stack.append(s)
    if 0 not in live:
        raise ValueError("the pattern matches no string at all")
    renumber = {s: i for i, s in enumerate(sorted(live))}  # 0 stays 0
    byte_lists: dict[int, list[int]] = {}  # class bits -> its bytes, computed once per class
    transitions = []
    for s in sorted(live):
        row = [DEAD] * 256
        for bits, t in moves[s]:
            if t in live:
                if bits not in byte_lists:
                    byte_lists[bits] = [b for b in range(256) if bits >> b & 1]
                for b in byte_lists[bits]:
                    row[b] = renumber[t]
        transitions.append(row)
    return DFA(transitions, frozenset(renumber[s] for s in accepting))


def minimize(dfa: DFA) -> DFA:
    """Moore's partition refinement: merge states no byte string tells apart (the subset
    construction leaves many: `.*` gives 20 states, minimal 5). Fewer states, fewer token masks
    to compute and cache. Start from {accepting, other} and split a block while two of its
    states go, on some byte, to different blocks; renumber so the start stays 0."""
    # bytes whose columns are equal in every state move together: one representative each
    columns: dict[tuple[int, ...], int] = {}
    for b in range(256):
        columns.setdefault(tuple(row[b] for row in dfa.transitions), b)
    reps = list(columns.values())
    successors = [[row[b] for b in reps] for row in dfa.transitions]
    block = [int(s in dfa.accepting) for s in range(dfa.num_states)]
    while True:
        lookup = block + [DEAD]  # DEAD is -1: lookup[-1] keeps it DEAD
        signature = [(block[s], tuple(map(lookup.__getitem__, successors[s])))
                     for s in range(dfa.num_states)]
        ids: dict[tuple, int] = {}
        for sig in [signature[0], *signature]:  # the start's block is numbered 0
            ids.setdefault(sig, len(ids))
        refined = [ids[sig] for sig in signature]
        if len(ids) == len(set(block)):
            break
        block = refined
    block = refined
    transitions: list[list[int]] = [[] for _ in range(len(set(block)))]
    for s in range(dfa.num_states):
        if not transitions[block[s]]:
            transitions[block[s]] = [DEAD if t == DEAD else block[t] for t in dfa.transitions[s]]
    return DFA(transitions, frozenset(block[s] for s in dfa.accepting))


# --8<-- [start:regex_to_dfa]
def regex_to_dfa(pattern: str) -> DFA:
    """The pattern's DFA over UTF-8 bytes (fullmatch semantics)."""
    nfa = NFA()
    nfa.start, nfa.accept = nfa.build(parse_regex(pattern))
    return minimize(nfa_to_dfa(nfa))
# --8<-- [end:regex_to_dfa]


_SPECIAL = set("\\.^$|?*+()[]{}")


def escape(text: str) -> str:
    """A regex that matches `text` literally (our subset reads any escaped punctuation as itself)."""
    return "".join("\\" + c if c in _SPECIAL else c for c in text)
