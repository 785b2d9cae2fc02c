"""Incremental detokenization with stop strings.

Tokens do not map to text one by one: a byte-level token can hold half a UTF-8 character,
and SentencePiece-style decoders drop or add a leading space depending on what comes before.
So each step decodes a short window of recent tokens twice, with and without the new ones,
and takes the difference as new text, but only once the decoded window no longer ends in
an incomplete character (U+FFFD). The window starts a few prompt tokens back for context.

Stop strings: the output is cut right before the first stop string, which is never
emitted; text that could still turn into a stop string (a suffix of the text that is a
prefix of some stop string) is held back until it can't, or until the request finishes.
Of the stop strings that end in one step's new text, the one that starts first wins.

Matching is linear in the output: `StopMatcher` runs one Knuth-Morris-Pratt automaton per
stop string over the new characters only, so each character costs O(number of stop
strings) amortized, whatever their length; its states are also the longest held-back
suffix. Only the held-back text is kept, never the whole output.
"""
from __future__ import annotations

CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class StopMatcher:
    """Finds stop strings in text fed piece by piece. `feed(piece)` returns the offset (in
    all text fed so far) where the earliest-starting stop string that ends inside `piece`
    begins, or None; `hold` is then the length of the longest suffix of the text that is a
    proper prefix of some stop string (text that may still become one)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_prefix_function(s) for s in self.stops]
        self.state = [0] * len(self.stops)   # per stop: its longest prefix ending the text
        self.fed = 0                          # characters fed so far

    @property
    def hold(self) -> int:
        return max(self.state, default=0)

    def feed(self, piece: str) -> int | None:
        best = None
        for j, stop in enumerate(self.stops):
            fail, st, n = self.fail[j], self.state[j], len(stop)
            for i, c in enumerate(piece):
                while st and stop[st] != c:
                    st = fail[st - 1]
                if stop[st] == c:
                    st += 1
                if st == n:
                    start = self.fed + i + 1 - n
                    best = start if best is None else min(best, start)
                    break          # later matches of this stop start later
            self.state[j] = st
        self.fed += len(piece)
        return best


def _prefix_function(s: str) -> list[int]:
    """KMP: pi[i] is the length of the longest proper prefix of s[:i+1] that is also its suffix."""
    pi = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = pi[k - 1]
        if s[i] == s[k]:
            k += 1
        pi[i] = k
    return pi


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0                # window start
        self.read = len(self.ids)      # tokens before this are already text
        self.stop = list(stop)
        self.matcher = StopMatcher(self.stop) if self.stop else None
        self.pending = ""              # text decoded but not emitted yet (held back)
        self.stopped = False           # a stop string was found

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text now safe to emit (maybe "")."""
        assert not self.stopped
        self.ids.append(token_id)
        before, after = self._window()
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return self._extend(after[len(before):])
        return ""

    def flush(self) -> str:
        """At the end: emit what was held back, including an incomplete character."""
        if not self.stopped and self.read < len(self.ids):
            before, after = self._window()
            self.read = len(self.ids)
            self.pending += after[len(before):]
        delta, self.pending = self.pending, ""
        return delta

    def _window(self) -> tuple[str, str]:
        dec = self.tokenizer.decode
        return (dec(self.ids[self.prefix:self.read], skip_special_tokens=self.skip_special),
                dec(self.ids[self.prefix:], skip_special_tokens=self.skip_special))

    def _extend(self, new: str) -> str:
        if self.matcher is None:
            return new
        base = self.matcher.fed - len(self.pending)   # offset of pending[0] in the output
        start = self.matcher.feed(new)
        self.pending += new
        if start is not None:    # the stop string began in the held-back text or in `new`
            self.pending = self.pending[:start - base]
            self.stopped = True
            return self.flush()
        keep = min(self.matcher.hold, len(self.pending))
        delta, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return delta
