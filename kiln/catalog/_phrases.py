"""Cutting text into phrases for speech synthesis: a voice starts speaking once the first phrase
of the answer is written, not the whole answer.

A phrase ends at a sentence's end (. ! ? and the like, followed by a space), or at a comma, colon
or semicolon once it has `soft_chars` characters, or anywhere after `hard_chars` characters
(at the last space). The first phrase of a reply may be cut at a comma earlier than the rest
(`first_soft_chars`): it is what the listener waits for.
"""

from __future__ import annotations

__all__ = ["PhraseSplitter", "phrases"]

# Also the full-width marks of Chinese and Japanese text.
_ENDS = ".!?\u3002\uff01\uff1f\u2026\n"
_PAUSES = ",;:\uff0c\uff1b\uff1a"


class PhraseSplitter:
    """Text fed in pieces (a language model's deltas), phrases out as soon as each is whole."""

    def __init__(
        self, *, first_soft_chars: int = 12, soft_chars: int = 40, hard_chars: int = 160
    ) -> None:
        self.first_soft_chars = first_soft_chars
        self.soft_chars = soft_chars
        self.hard_chars = hard_chars
        self._text = ""
        self._first = True

    def feed(self, delta: str) -> list[str]:
        """The phrases `delta` completes (often none)."""
        self._text += delta
        out: list[str] = []
        while (cut := self._cut()) is not None:
            phrase, self._text = self._text[:cut].strip(), self._text[cut:]
            if phrase:
                out.append(phrase)
                self._first = False
        return out

    def flush(self) -> list[str]:
        """What is left at the end of the text."""
        rest, self._text = self._text.strip(), ""
        return [rest] if rest else []

    def _cut(self) -> int | None:
        text = self._text
        soft = self.first_soft_chars if self._first else self.soft_chars
        for i, char in enumerate(text[:-1]):
            follows = text[i + 1]
            if char in _ENDS and (follows.isspace() or char == "\n"):
                return i + 1
            if char in _PAUSES and follows.isspace() and i + 1 >= soft:
                return i + 1
        if len(text) > self.hard_chars:
            space = text.rfind(" ", 0, self.hard_chars)
            return space + 1 if space > 0 else self.hard_chars
        return None


def phrases(text: str) -> list[str]:
    """All of `text`, phrase by phrase."""
    splitter = PhraseSplitter()
    return splitter.feed(text) + splitter.flush()
