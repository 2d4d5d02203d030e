"""`StopStringMatcher`: every stop string of a request in one automaton (Aho-Corasick), fed only
the characters that are new since the last step.

Searching the text for each stop string costs O(number of stop strings) per step, on the engine
thread, for every request in the batch: one request with 50,000 stop strings made the others
6x slower. A trie of the stop strings with *failure links* reads each new character once, in
O(1) amortized, whatever the number of strings::

    stops "he", "she", "hers"            text ...s h e r s
    trie  root ─h─ 1 ─e─ 2* ─r─ 3 ─s─ 4*         ^ ^ ^     node after each character:
          root ─s─ 5 ─h─ 6 ─e─ 7*                5 6 7*    7 = "she" (and "he", its suffix)
    failure link: the longest proper suffix of a node's path that is also a path from the root
          (6 "sh" -> 1 "h", 7 "she" -> 2 "he"); a character the node has no edge for follows
          them until one has (or the root is reached).

The node reached is the whole state of a partial match, so a request keeps (node, characters
read) between steps and never reads a character twice; a stop string split over two tokens (or
two steps) is still found. Each node knows the longest stop string ending there (its own, or
that of its failure link), so a match costs no extra walk.

Which stop wins when several match: the one that is complete first (the earliest end), and of
those ending at the same character, the longest. That is what a client reading the text one
character at a time would see, and it does not depend on how the tokens group characters.

Building costs O(total characters of the stop strings) and about 230 bytes per trie node (the
server's default cap of 16,384 characters: at most ~4 MB and ~100 ms of Python). So it is built
once per distinct stop list while a request uses it (`get_stop_matcher`), and the server builds
it in an input thread before the request reaches the engine (`AsyncLLM.add_request`).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Sequence


class StopStringMatcher:
    """Built once per request, shared by its `n` samples; each sample keeps its own node."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.max_len = max(map(len, stop_strings))  # the text a stream holds back is one less
        self.edges: list[dict[str, int]] = [{}]  # node -> {character: child node}; 0 is the root
        self.match_len = [0]  # node -> length of the longest stop string ending here (0: none)
        for stop in stop_strings:
            node = 0
            for char in stop:
                child = self.edges[node].get(char)
                if child is None:
                    child = self.edges[node][char] = len(self.edges)
                    self.edges.append({})
                    self.match_len.append(0)
                node = child
            self.match_len[node] = len(stop)
        # Failure links, breadth first: a node's link is shallower, so it is done before it.
        self.fail = [0] * len(self.edges)
        queue = deque(self.edges[0].values())
        while queue:
            node = queue.popleft()
            for char, child in self.edges[node].items():
                self.fail[child] = self._next(self.fail[node], char) if node else 0
                self.match_len[child] = self.match_len[child] or self.match_len[self.fail[child]]
                queue.append(child)

    def _next(self, node: int, char: str) -> int:
        while node and char not in self.edges[node]:
            node = self.fail[node]
        return self.edges[node].get(char, 0)

    def scan(self, text: str, start: int, node: int, report: bool = True) -> tuple[int, int]:
        """Read text[start:] from `node` -> (the node after it, the end of the first stop string
        completed in it, or -1). With `report=False` every match is passed over (min_tokens not
        reached yet): the node still follows the text. The stop string is text[end - n:end],
        n = match_len[node]."""
        for i in range(start, len(text)):
            node = self._next(node, text[i])
            if report and self.match_len[node]:
                return node, i + 1
        return node, -1


_matchers: "weakref.WeakValueDictionary[tuple[str, ...], StopStringMatcher]" = weakref.WeakValueDictionary()
_matchers_lock = threading.Lock()


def get_stop_matcher(stop_strings: Sequence[str]) -> StopStringMatcher:
    """The matcher of these stop strings: built once and shared while anything holds it (the
    requests that use it, or a caller that built it ahead of time), then freed with the last."""
    key = tuple(stop_strings)
    with _matchers_lock:
        matcher = _matchers.get(key)
    if matcher is None:
        matcher = StopStringMatcher(key)  # outside the lock: another thread may build one too
        with _matchers_lock:
            matcher = _matchers.setdefault(key, matcher)
    return matcher
