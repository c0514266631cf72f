"""Pydantic validation failures become OpenAI errors: a clean message and ``param`` naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.errors import APIError, from_validation
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.responses.protocol import ResponsesRequest

HELLO = [{"role": "user", "content": "Hi"}]


def error_for(**patch: Any) -> APIError:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO, **patch})
    return from_validation(caught.value)


def test_stream_options_without_stream_names_the_field_in_plain_words() -> None:
    error = error_for(stream_options={"include_usage": True})
    assert error.status == 400
    assert error.param == "stream_options"
    assert error.message == (
        "Invalid value for 'stream_options': stream_options is only allowed when stream is true"
    )


def test_top_logprobs_without_logprobs_names_top_logprobs() -> None:
    error = error_for(top_logprobs=2)
    assert error.param == "top_logprobs"
    assert "Value error" not in error.message


def test_a_nested_model_validator_names_the_nested_field() -> None:
    error = error_for(messages=[{"role": "user"}])
    assert error.param == "messages[0].content"
    assert error.message == "Invalid value for 'messages[0].content': a user message needs 'content'"


def test_field_validator_messages_lose_pydantics_prefix() -> None:
    error = error_for(stop=["a", "b", "c", "d", "e"])
    assert error.param == "stop"
    assert error.message == "Invalid value for 'stop': at most 4 stop sequences are allowed"


def test_store_true_is_refused_as_unsupported() -> None:
    error = error_for(store=True)
    assert (error.status, error.param, error.code) == (400, "store", "unsupported_parameter")
    assert "does not store completions" in error.message


@pytest.mark.parametrize("store", [False, None])
def test_store_false_or_null_is_accepted(store: bool | None) -> None:
    assert (
        ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO, "store": store}).store
        is not True
    )


TOP_P_BODIES = [
    (ChatCompletionRequest, {"model": "m", "messages": HELLO}),
    (CompletionRequest, {"model": "m", "prompt": "Hi"}),
    (ResponsesRequest, {"model": "m", "input": "Hi"}),
]


@pytest.mark.parametrize(("schema", "body"), TOP_P_BODIES)
@pytest.mark.parametrize("top_p", [0, 0.0, 0.5, 1])
def test_top_p_from_zero_to_one_is_accepted(schema: Any, body: dict[str, Any], top_p: float) -> None:
    assert schema.model_validate({**body, "top_p": top_p}).top_p == top_p


@pytest.mark.parametrize(("schema", "body"), TOP_P_BODIES)
@pytest.mark.parametrize("top_p", [-0.01, -1, 1.01, 2])
def test_top_p_outside_zero_to_one_is_refused(schema: Any, body: dict[str, Any], top_p: float) -> None:
    with pytest.raises(ValidationError) as caught:
        schema.model_validate({**body, "top_p": top_p})
    error = from_validation(caught.value)
    assert (error.status, error.param) == (400, "top_p")
