"""A sequence's text as its tokens arrive: incremental detokenisation and stop strings.

Incremental detokenisation as in TGI and vLLM: decode a short window of the newest tokens, so
multi-byte characters split over tokens and word-boundary spaces come out right, and release
text only once it is stable (it does not end in U+FFFD, the mark of an incomplete character).

Stop strings: a stop found in the text cuts it there; while no stop matched, the tail that could
be the start of a stop string is held back (so a stream never shows part of a stop).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one matched)
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string matched
        self._prefix = self._read = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became releasable (maybe empty). Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        new = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)
        hold = 0
        if self.stop:
            start = max(0, self.sent - self.longest_stop)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self.rest()
            hold = self.longest_stop - 1
        upto = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def rest(self) -> str:
        """Everything not yet released, when the sequence ends (an incomplete last character dropped)."""
        if self.text.endswith("\ufffd"):
            self.text = self.text[:-1]
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
