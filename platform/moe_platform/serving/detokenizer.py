"""Incremental detokenization and stop strings, so text can be streamed token by token.

Byte-level BPE tokens need not end on a character boundary: a token may hold half of a UTF-8 character. Decoding a
short window of recent tokens and emitting only what extends the previous window's text (and never a trailing
replacement character) streams exactly the text a full decode would give. Stop strings are searched in the text as
it grows; text that could still turn out to be the start of a stop string is held back until it cannot.

Stop matching is incremental: one Knuth-Morris-Pratt automaton per stop string reads each new character once, so a
token costs O(its characters x stop strings) however long the text and the stop strings are (a stop string is at
most `sampling.MAX_STOP_CHARS` characters), and an automaton's state, the longest end of the text that is a start of
its stop string, is also what must be held back while streaming.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


def max_prompt_chars(tokenizer: Tokenizer, max_tokens: int) -> int:
    """A bound on the characters of a text that encodes to at most `max_tokens` tokens: no token decodes to more
    characters than its vocabulary entry has (a byte-level entry has one per byte), times 4 when a normalizer may
    shorten the text first (composing characters). Longer prompts are refused before they are tokenized."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_tokens * max(longest, 1) * (4 if tokenizer.normalizer is not None else 1)


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
    """Accumulates text, finds the earliest stop string and says how much text is safe to emit (`take`)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self._fail = [_failure_table(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # per stop string: how much of it the text ends with
        self._taken: list[str] = []  # text handed out by `take`
        self._pending = ""  # text appended and not taken yet: what `take` may still hold back or cut
        self._length = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far (cut just before the stop string once one appeared)."""
        return "".join(self._taken) + self._pending

    def append(self, delta: str) -> bool:
        """Add text; return True when a stop string appeared (the text is then cut just before it)."""
        if self.stopped or not delta:
            return self.stopped
        cut = None  # where the earliest match starts, relative to the start of `delta` (< 0: in earlier text)
        for k, s in enumerate(self.stop):
            q, fail = self._state[k], self._fail[k]
            for j, c in enumerate(delta):
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                    if q == len(s):  # a stop string's first match is its earliest start too (one length)
                        cut = j + 1 - q if cut is None else min(cut, j + 1 - q)
                        break
            self._state[k] = q
        self._pending += delta
        self._length += len(delta)
        if cut is not None:
            # A match starts in the held-back text or later (take keeps every possible start), so it is pending.
            drop = min(len(delta) - cut, len(self._pending))
            self._pending = self._pending[:len(self._pending) - drop]
            self._length -= drop
            self.stopped = True
        return self.stopped

    def _held(self, finished: bool) -> int:
        """Characters at the end that may still become a stop string: none once finished or stopped."""
        return 0 if finished or self.stopped or not self.stop else max(self._state)

    def safe_length(self, finished: bool) -> int:
        """How many characters of `text` can be emitted now: all when finished, else all but a possible stop prefix."""
        return self._length - self._held(finished)

    def take(self, finished: bool) -> str:
        """The text that became safe to emit since the previous call (see `safe_length`)."""
        keep = min(self._held(finished), len(self._pending))
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        if out:
            self._taken.append(out)
        return out


def _failure_table(s: str) -> list[int]:
    """KMP: fail[i] = the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    q = 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = fail[q - 1]
        if s[i] == s[q]:
            q += 1
        fail[i] = q
    return fail
