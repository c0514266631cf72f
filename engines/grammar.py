"""Constrained decoding: compile a JSON schema or Lark grammar once, then mask each row's logits per token.

The grammar library is llguidance (see bench/README.md, "Grammar library", for why): it compiles a
schema against the tokenizer in milliseconds and computes a token mask in tens of microseconds on a
49k vocabulary, so a constrained row costs little more than a free one. A compiled grammar is an
``LLMatcher`` kept as a template in a bounded LRU per tokenizer; every sequence works on its own
``deep_copy`` of it, so rows of one batch each carry their own parser state (constrained and free rows,
and rows of different adapters, mix freely).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from engines.errors import EngineError, InvalidGenerationRequest

#: Compact JSON (no free whitespace): a weak model cannot pad its answer with endless blank lines.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Any JSON object, for ``response_format: {"type": "json_object"}``.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match: a JSON schema, or a Lark grammar (which may embed ``%json``).

    ``param`` names the request field that asked for it, so a grammar the library refuses is a 400 that
    points at the right field (``response_format`` or ``tool_choice``).
    """

    kind: Literal["json_schema", "lark"]
    source: str
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: dict[str, Any], param: str = "response_format") -> Constraint:
        # Key order kept: the grammar makes the model write properties in the schema's order.
        return cls("json_schema", json.dumps(closed_objects(schema), separators=(",", ":")), param)

    @classmethod
    def lark(cls, grammar: str, param: str = "tool_choice") -> Constraint:
        return cls("lark", grammar, param)

    def grammar(self) -> str:
        import llguidance

        if self.kind == "json_schema":
            try:
                options: Any = JSON_OPTIONS
                return str(llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=options))
            except ValueError as exc:
                raise InvalidGenerationRequest(f"Invalid JSON schema: {exc}", param=self.param) from exc
        return str(llguidance.LLMatcher.grammar_from_lark(self.source))


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists properties and is silent.

    The output still validates against the original schema (it is a subset), but the model cannot
    invent keys nobody declared: a small model given an open object writes extra free-text keys until
    the token limit, where the schema's own properties would have completed it.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed_objects(value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        result["additionalProperties"] = False
    return result


class CompiledGrammar:
    """A compiled constraint for one tokenizer; ``matcher()`` gives a fresh parser for one sequence."""

    def __init__(self, constraint: Constraint, template: Any, vocab_size: int) -> None:
        self.constraint = constraint
        self._template = template
        self.vocab_size = vocab_size

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.vocab_size)

    def __reduce__(self) -> tuple[Any, tuple[Constraint]]:
        """Sent to another process (a Ray replica) as its constraint; the replica compiles it for its own
        tokenizer (the compiled form is the library's, not picklable)."""
        return (DeferredGrammar, (self.constraint,))


@dataclass(frozen=True)
class DeferredGrammar:
    """A constraint that arrived from another process, still to be compiled where it will run."""

    constraint: Constraint


class GrammarMatcher:
    """One sequence's parser state: the mask of allowed tokens now, and the tokens taken so far."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import torch

        self._matcher = matcher
        self._words = (vocab_size + 31) // 32
        self._bitmask = torch.zeros((1, self._words), dtype=torch.int32)

    def allowed(self, vocab: int) -> Any:
        """A bool tensor ``[vocab]``: True where the grammar allows the token next."""
        import numpy
        import torch

        row = self._bitmask[0]
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        # Bit i of word w is token 32*w + i (little-endian words): unpack the bytes least bit first.
        unpacked = numpy.unpackbits(row.numpy().view(numpy.uint8), bitorder="little")
        bits = torch.from_numpy(unpacked.view(numpy.bool_))
        # The parser failed (a limit, an internal error): never sample from what it would allow then.
        if self._matcher.is_error() or not bits.any():
            raise EngineError(
                f"Constrained decoding failed: {self._matcher.get_error() or 'no token allowed'}"
            )
        if bits.shape[0] >= vocab:
            return bits[:vocab]
        return torch.cat([bits, torch.zeros(vocab - bits.shape[0], dtype=torch.bool)])

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise InvalidGenerationRequest(f"Constrained decoding failed: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the row stops here)."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())


class GrammarCache:
    """Compiled grammars per tokenizer and constraint, least recently used first out.

    Thread-safe: the gateway compiles on a worker thread (never on the event loop) while the engine
    thread may look grammars up. Tokenizers are held weakly, so an evicted model takes its grammars'
    tokenizer with it.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._compiled: OrderedDict[tuple[int, Constraint], tuple[Any, CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._compiled)

    def compile(
        self, tokenizer: Any, constraint: Constraint, eos_token_ids: frozenset[int]
    ) -> CompiledGrammar:
        """The compiled grammar for ``constraint`` (cached); a 400 naming ``constraint.param`` if invalid."""
        lltok = self._lltokenizer(tokenizer, eos_token_ids)
        key = (id(lltok), constraint)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None and found[0] is lltok:
                self._compiled.move_to_end(key)
                self.hits += 1
                return found[1]
        compiled = self._build(lltok, constraint)
        with self._lock:
            self.misses += 1
            self._compiled[key] = (lltok, compiled)
            self._compiled.move_to_end(key)
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def _lltokenizer(self, tokenizer: Any, eos_token_ids: frozenset[int]) -> Any:
        with self._lock:
            found = self._tokenizers.get(tokenizer)
        if found is not None:
            return found
        import llguidance.hf

        eos = sorted(eos_token_ids) or None
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)
        with self._lock:
            return self._tokenizers.setdefault(tokenizer, lltok)

    @staticmethod
    def _build(lltok: Any, constraint: Constraint) -> CompiledGrammar:
        import llguidance

        grammar = constraint.grammar()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error:
            raise InvalidGenerationRequest(
                f"This {_what(constraint)} cannot be enforced: {messages[0] if messages else 'invalid'}",
                param=constraint.param,
            )
        if messages:  # a keyword the library would ignore: refuse rather than promise what is not enforced
            raise InvalidGenerationRequest(
                f"This {_what(constraint)} uses features that cannot be enforced: {'; '.join(messages)}",
                param=constraint.param,
            )
        template = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if template.is_error():
            raise InvalidGenerationRequest(
                f"This {_what(constraint)} cannot be enforced: {template.get_error()}", param=constraint.param
            )
        return CompiledGrammar(constraint, template, lltok.vocab_size)


def _what(constraint: Constraint) -> str:
    return "JSON schema" if constraint.kind == "json_schema" else "tool-call grammar"
