"""Incremental detokenization with stop strings.

Tokens do not map to text one by one: a byte-level token can hold half a UTF-8 character,
and SentencePiece-style decoders drop or add a leading space depending on what comes before.
So each step decodes a short window of recent tokens twice, with and without the new ones,
and takes the difference as new text, but only once the decoded window no longer ends in
an incomplete character (U+FFFD). The window starts a few prompt tokens back for context.

Stop strings: the output is cut right before the first stop string, which is never
emitted; text that could still turn into a stop string (a suffix of the text that is a
prefix of some stop string) is held back until it can't, or until the request finishes.
"""
from __future__ import annotations

CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0                # window start
        self.read = len(self.ids)      # tokens before this are already text
        self.stop = list(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""                 # output text so far (cut at a stop string)
        self.sent = 0                  # characters of `text` already emitted
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
            self.text += after[len(before):]
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def _window(self) -> tuple[str, str]:
        dec = self.tokenizer.decode
        return (dec(self.ids[self.prefix:self.read], skip_special_tokens=self.skip_special),
                dec(self.ids[self.prefix:], skip_special_tokens=self.skip_special))

    def _extend(self, new: str) -> str:
        search_from = max(0, len(self.text) - self.max_stop + 1)
        self.text += new
        if not self.stop:
            delta, self.sent = self.text[self.sent:], len(self.text)
            return delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.flush()
        hold = 0
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                hold = k
                break
        end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta
