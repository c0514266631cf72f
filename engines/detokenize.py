"""Turning a growing list of token ids into text deltas that are always whole characters.

Byte-level tokenizers split a multi-byte UTF-8 character (a Chinese character is three bytes) across
tokens; decoding such a partial sequence yields U+FFFD. The decoder below holds text back until the
bytes complete, and decodes a short window of earlier tokens with each step so that tokenizers which
drop leading spaces at sequence starts (SentencePiece) still produce the right deltas.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; get back only complete new text."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end, up to the last whole character.

        Generation can stop (``max_tokens``, a stop token) between the bytes of one character; those
        bytes decode as U+FFFD, which a client would show as garbage (``蓝�``). They are dropped: the
        reply ends at the last character the model completed. A model never completes a character
        into U+FFFD on purpose, so stripping trailing ones loses nothing it meant to say.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        tail = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        return tail.rstrip(REPLACEMENT)


class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts output at the first stop.

    OpenAI does not include the stop string in the output, and a stop string can span several deltas,
    so a delta is only released once no suffix of it could still grow into a stop string.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what can be released now. After a stop, ``stopped`` is True."""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self._pending = self._pending[:cut], ""
            return released
        hold = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        released = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(released) :]
        return released

    def flush(self) -> str:
        """Everything held back, at the end of generation (it never became a stop string)."""
        released, self._pending = self._pending, ""
        return released
