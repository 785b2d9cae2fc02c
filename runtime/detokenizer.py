"""Incremental detokenization with stop strings.

Tokens do not map to text one by one: a byte-level token can hold half a UTF-8 character,
and SentencePiece-style decoders drop or add a leading space depending on what comes before.
So each step decodes a short window of recent tokens with the new ones, and takes what it
adds to the text of the window's tokens already read as new text, but only once the decoded
window no longer ends in an incomplete character (U+FFFD). The window starts a few prompt
tokens back for context. The text of the tokens already read is decoded once per window,
and a window of one token (most are: the previous step's token) is looked up in a
per-decoder cache of single-token texts: one decode per step, not two.

Stop strings: the output is cut right before the first stop string, which is never
emitted; text that could still turn into a stop string (a suffix of the text that is a
prefix of some stop string) is held back until it can't, or until the request finishes.
Of the stop strings that end in one step's new text, the one that starts first wins.

Decoding goes straight to the Rust `tokenizers` object behind a fast tokenizer when that
gives the same text (`text_decoder`): transformers' `decode` wrapper costs several times
the decode itself, twice per token per sequence.

Matching is linear in the output: `StopMatcher` runs one Knuth-Morris-Pratt automaton per
stop string over the new characters only, so each character costs O(number of stop
strings) amortized, whatever their length; its states are also the longest held-back
suffix. Only the held-back text is kept, never the whole output.
"""
from __future__ import annotations

import weakref
from typing import Callable

CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"
PROBE_TOKENS = 512   # ids decoded both ways before the direct decoder is trusted

_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_token_texts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # decoder -> {id: text}


def text_decoder(tokenizer, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """ids -> text, as `tokenizer.decode(ids, skip_special_tokens=...)` gives it. Through the
    tokenizer's `backend_tokenizer` when it has one, does no clean-up of spaces, and decodes
    a probe (the first PROBE_TOKENS ids, special ones included, one by one and together) the
    same way; decided once per tokenizer."""
    try:
        known = _decoders.setdefault(tokenizer, {})
    except TypeError:   # not weakly referenceable: decide every time
        known = {}
    if skip_special_tokens not in known:
        known[skip_special_tokens] = _pick_decoder(tokenizer, skip_special_tokens)
    return known[skip_special_tokens]


def _pick_decoder(tokenizer, skip: bool) -> Callable[[list[int]], str]:
    def wrapped(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return wrapped

    def direct(ids: list[int]) -> str:
        return backend.decode(ids, skip_special_tokens=skip)
    try:
        probe = list(range(min(PROBE_TOKENS, backend.get_vocab_size())))
        same = direct(probe) == wrapped(probe) and all(direct([i]) == wrapped([i]) for i in probe)
    except Exception:   # noqa: BLE001 - any disagreement, even an error, keeps the wrapper
        same = False
    return direct if same else wrapped


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
        self.decode = text_decoder(tokenizer, skip_special_tokens)
        self.token_texts = _token_texts.setdefault(self.decode, {})   # at most one per id
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0                # window start
        self.read = len(self.ids)      # tokens before this are already text
        self.read_text: str | None = None   # the text of ids[prefix:read], once decoded
        self.stop = list(stop)
        self.matcher = StopMatcher(self.stop) if self.stop else None
        self.pending = ""              # text decoded but not emitted yet (held back)
        self.stopped = False           # a stop string was found

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text now safe to emit (maybe "")."""
        assert not self.stopped
        ids = self.ids
        ids.append(token_id)
        before = self.read_text if self.read_text is not None else self._read_text()
        after = self.decode(ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read, self.read_text = self.read, len(ids), None
            new = after[len(before):]
            return new if self.matcher is None else self._extend(new)
        return ""

    def flush(self) -> str:
        """At the end: emit what was held back, including an incomplete character."""
        if not self.stopped and self.read < len(self.ids):
            before, after = self._read_text(), self.decode(self.ids[self.prefix:])
            self.read, self.read_text = len(self.ids), None
            self.pending += after[len(before):]
        delta, self.pending = self.pending, ""
        return delta

    def _read_text(self) -> str:
        """The text of ids[prefix:read]: decoded once per window, a one-token window from the
        decoder's cache."""
        if self.read_text is None:
            window = self.ids[self.prefix:self.read]
            if len(window) != 1:
                self.read_text = self.decode(window)
            else:
                text = self.token_texts.get(window[0])
                if text is None:
                    text = self.token_texts[window[0]] = self.decode(window)
                self.read_text = text
        return self.read_text

    def _extend(self, new: str) -> str:
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
