"""Incremental detokenization and stop strings, so text can be streamed token by token.

Byte-level BPE tokens need not end on a character boundary: a token may hold half of a UTF-8 character. Decoding a
short window of recent tokens and emitting only what extends the previous window's text (and never a trailing
replacement character) streams exactly the text a full decode would give. Stop strings are searched in the text as
it grows; text that could still turn out to be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this have been turned into text

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        window = self.ids[self._prefix_offset:]
        prefix_text = self._tok.decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._tok.decode(window)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Text of tokens still held back (an unfinished character decodes as U+FFFD)."""
        if self._read_offset == len(self.ids):
            return ""
        prefix_text = self._tok.decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._tok.decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopStringMatcher:
    """Accumulates text, finds the earliest stop string and says how much text is safe to emit."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.stopped = False

    def append(self, delta: str) -> bool:
        """Add text; return True when a stop string appeared (the text is then cut just before it)."""
        if self.stopped or not delta:
            return self.stopped
        start = max(0, len(self.text) - self._longest + 1)  # a match may straddle the old end of the text
        self.text += delta
        if not self.stop:
            return False
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def safe_length(self, finished: bool) -> int:
        """How many characters of `text` can be emitted now: all when finished, else all but a possible stop prefix."""
        if finished or not self.stop:
            return len(self.text)
        for held in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-held:]
            if any(s.startswith(tail) for s in self.stop):
                return len(self.text) - held
        return len(self.text)
