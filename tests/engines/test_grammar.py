"""Compiled grammars: cached per tokenizer and constraint, a mask per row, 400 for what cannot be enforced."""

from __future__ import annotations

from typing import Any

import pytest

from engines.errors import InvalidGenerationRequest
from engines.grammar import Constraint, GrammarCache
from engines.sampling import Sampler, SamplingParams
from engines.testing.tiny import build_byte_tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_byte_tokenizer()


def eos(tokenizer: Any) -> frozenset[int]:
    return frozenset({tokenizer.eos_token_id})


def test_compiled_grammars_are_cached_per_constraint_and_bounded(tokenizer: Any) -> None:
    cache = GrammarCache(max_entries=2)
    first = cache.compile(tokenizer, Constraint.json_schema(SCHEMA), eos(tokenizer))
    assert cache.compile(tokenizer, Constraint.json_schema(dict(SCHEMA)), eos(tokenizer)) is first
    assert (cache.hits, cache.misses) == (1, 1)
    for extra in ({"type": "array"}, {"type": "string"}):
        cache.compile(tokenizer, Constraint.json_schema(extra), eos(tokenizer))
    assert len(cache) == 2
    assert cache.compile(tokenizer, Constraint.json_schema(SCHEMA), eos(tokenizer)) is not first  # evicted


def test_each_row_gets_its_own_parser_state(tokenizer: Any) -> None:
    compiled = GrammarCache().compile(tokenizer, Constraint.json_schema(SCHEMA), eos(tokenizer))
    one, two = compiled.matcher(), compiled.matcher()
    vocab = len(tokenizer)
    for token in tokenizer.encode('{"ok": true}', add_special_tokens=False):
        assert one.allowed(vocab)[token]
        one.consume(token)
    assert one.finished
    assert two.allowed(vocab)[tokenizer.encode("{", add_special_tokens=False)[0]]
    assert not two.allowed(vocab)[tokenizer.encode("x", add_special_tokens=False)[0]]


def test_the_mask_decides_the_token_and_logprobs_stay_the_models(tokenizer: Any) -> None:
    import torch

    compiled = GrammarCache().compile(tokenizer, Constraint.json_schema(SCHEMA), eos(tokenizer))
    matcher = compiled.matcher()
    vocab = len(tokenizer)
    logits = torch.zeros(vocab)
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    logits[brace + 1] = 50.0  # the model wants something else
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=True)).choose(logits, matcher.allowed(vocab))
    assert choice.token_id == brace
    assert choice.logprob < -40


def test_a_mask_covers_a_model_vocabulary_larger_than_the_tokenizer(tokenizer: Any) -> None:
    compiled = GrammarCache().compile(tokenizer, Constraint.json_schema(SCHEMA), eos(tokenizer))
    allowed = compiled.matcher().allowed(len(tokenizer) + 100)
    assert allowed.shape[0] == len(tokenizer) + 100 and not allowed[len(tokenizer) :].any()


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objec"},
        {"type": "string", "pattern": "(?<=a)b"},
        {"not": {"type": "string"}},
        {"$ref": "https://example.com/schema.json"},
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_naming_the_param(tokenizer: Any, schema: Any) -> None:
    with pytest.raises(InvalidGenerationRequest) as caught:
        GrammarCache().compile(tokenizer, Constraint.json_schema(schema), eos(tokenizer))
    assert caught.value.param == "response_format"


def test_a_bad_tool_grammar_names_its_own_param(tokenizer: Any) -> None:
    with pytest.raises(InvalidGenerationRequest) as caught:
        GrammarCache().compile(
            tokenizer, Constraint.lark('start: %json {"not": {}}', param="tools"), eos(tokenizer)
        )
    assert caught.value.param == "tools"


def test_objects_that_declare_properties_are_closed_unless_the_schema_says_otherwise() -> None:
    from engines.grammar import closed_objects

    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "anyOf": [{"properties": {"y": {}}, "additionalProperties": True}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is True
    assert closed_objects({"type": "object"}) == {"type": "object"}


def test_grammars_compile_off_the_event_loop_thread(tokenizer: Any) -> None:
    import asyncio
    import threading
    from types import SimpleNamespace

    from engines.engine import Engine

    threads: list[threading.Thread] = []

    class Recording(GrammarCache):
        def compile(self, *args: Any) -> Any:
            threads.append(threading.current_thread())
            return super().compile(*args)

    engine = SimpleNamespace(grammars=Recording())
    lease = SimpleNamespace(loaded=SimpleNamespace(tokenizer=tokenizer, eos_token_ids=eos(tokenizer)))
    compiled = asyncio.run(Engine.compile_grammar(engine, lease, Constraint.json_schema(SCHEMA)))  # type: ignore[arg-type]
    assert compiled.matcher().allowed(len(tokenizer)).any()
    assert threads and threads[0] is not threading.main_thread()


def test_a_parser_that_failed_raises_instead_of_sampling_from_an_empty_mask(tokenizer: Any) -> None:
    from engines.errors import EngineError

    matcher = GrammarCache().compile(tokenizer, Constraint.json_schema(SCHEMA), eos(tokenizer)).matcher()
    with pytest.raises(InvalidGenerationRequest):
        matcher.consume(tokenizer.encode("x", add_special_tokens=False)[0])  # not JSON: the parser fails
    with pytest.raises(EngineError, match="Constrained decoding failed"):
        matcher.allowed(len(tokenizer))
