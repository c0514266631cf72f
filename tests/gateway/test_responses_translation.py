"""The Responses <-> chat translation on its own: requests to chat bodies, chat chunks to events."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.errors import APIError
from gateway.responses.input import to_chat
from gateway.responses.output import ResponseTranslator, completion_as_chunk
from gateway.responses.protocol import ResponsesRequest
from gateway.responses.route import skeleton

EVENT = TypeAdapter(ResponseStreamEvent)


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def call_delta(index: int, **function: Any) -> dict[str, Any]:
    first = {"id": f"call_{index}", "type": "function"} if "name" in function else {}
    return {"tool_calls": [{"index": index, **first, "function": function}]}


# What a chat stream with text and then two parallel calls looks like (OpenAI's documented shape).
CHUNKS = [
    chunk({"role": "assistant"}),
    chunk({"content": "Let me "}),
    chunk({"content": "check."}),
    chunk(call_delta(0, name="get_weather", arguments="")),
    chunk(call_delta(0, arguments='{"city": ')),
    chunk(call_delta(0, arguments='"Paris"}')),
    chunk(call_delta(1, name="get_time", arguments='{"tz": "CET"}')),
    chunk({}, finish="tool_calls"),
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}},
]


def run(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    translator = ResponseTranslator(skeleton(request()))
    events = translator.start()
    for item in chunks:
        events += translator.feed(item)
    return events + translator.finish()


def test_stream_events_follow_openais_order_for_text_then_calls() -> None:
    events = run(CHUNKS)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:  # every event parses as the SDK's own type, not as an unknown one
        assert type(EVENT.validate_python(event)).__name__.startswith("Response")


def test_call_arguments_accumulate_into_function_call_items() -> None:
    events = run(CHUNKS)
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"city": "Paris"}', '{"tz": "CET"}']
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed" and final.output_text == "Let me check."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_0", "get_weather", '{"city": "Paris"}'),
        ("call_1", "get_time", '{"tz": "CET"}'),
    ]
    assert [item.id for item in final.output] == [
        e["item"]["id"] for e in events if e["type"] == "response.output_item.added"
    ]
    assert final.usage is not None and final.usage.input_tokens == 7 and final.usage.total_tokens == 16


def test_a_whole_completion_gives_the_streams_final_response() -> None:
    completion = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "call_0",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
    }
    whole = run([completion_as_chunk(completion)])[-1]["response"]
    streamed = run(CHUNKS)[-1]["response"]

    def shape(response: dict[str, Any]) -> list[Any]:
        return [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]

    assert shape(whole) == shape(streamed)


def test_length_cut_is_incomplete_and_an_error_fails_the_response() -> None:
    events = run([chunk({"content": "abc"}), chunk({}, finish="length")])
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.incomplete"
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    translator = ResponseTranslator(skeleton(request()))
    failed = translator.start() + translator.fail({"message": "boom", "code": "overloaded", "param": None})
    assert [e["type"] for e in failed][-2:] == ["error", "response.failed"]
    assert failed[-1]["response"]["error"]["code"] == "overloaded"


def test_input_items_become_chat_messages() -> None:
    body = request(
        instructions="Be brief.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Weather "},
                    {"type": "input_text", "text": "and time?"},
                ],
            },
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "noon"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Sunny at noon.", "annotations": []}],
            },
        ],
        max_output_tokens=5,
        tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
    )
    translation = to_chat(body)
    chat = translation.body
    assert [m["role"] for m in chat["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]
    assert chat["messages"][1]["content"] == "Weather and time?"
    assert [c["id"] for c in chat["messages"][2]["tool_calls"]] == ["c1", "c2"]  # one turn, two calls
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert chat["max_completion_tokens"] == 5
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    assert translation.origins == ["instructions", "input[0]", "input[1]", "input[3]", "input[4]", "input[5]"]


@pytest.mark.parametrize(
    ("chat_param", "expected"),
    [
        ("messages[1].content", "input[0].content"),
        ("messages[0]", "instructions"),
        ("messages", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("tools[0].function.parameters", "tools[0].parameters"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("tool_choice", "tool_choice"),
        ("model", "model"),
    ],
)
def test_chat_errors_name_the_responses_field(chat_param: str, expected: str) -> None:
    translation = to_chat(request(instructions="x", input=[{"role": "user", "content": "hi"}]))
    error = translation.remap(APIError(400, f"Invalid value for '{chat_param}': bad", param=chat_param))
    assert error.param == expected and f"'{expected}'" in error.message
