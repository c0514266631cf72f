"""The size of a model's vocabulary, counted once per tokenizer.

Requests check their token ids (prompt ids, ``logit_bias`` keys) against it before they are queued,
and transformers answers ``len(tokenizer)`` by rebuilding the whole vocabulary: milliseconds a request
on a 49k-token tokenizer, all of it before the first token (figures in bench/README.md).
"""

from __future__ import annotations

from typing import Any


class CountsVocabulary:
    """For a class with a ``tokenizer`` attribute (a loaded model, or its stand-in on a cluster)."""

    tokenizer: Any
    _vocabulary: tuple[Any, int] | None = None

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``, recounted only when the tokenizer object is another one."""
        counted = self._vocabulary
        if counted is None or counted[0] is not self.tokenizer:
            counted = (self.tokenizer, len(self.tokenizer))
            object.__setattr__(self, "_vocabulary", counted)  # frozen dataclasses too
        return counted[1]
