"""``POST /v1/responses`` through a real server with the openai SDK's ``client.responses``."""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import ModelSettings, Settings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.test_errors import assert_openai_error
from tests.e2e.test_tools import TOOLS_TEMPLATE

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def post(server: RunningServer, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.v1}/responses", json={"model": "tiny", "input": "Hi", **body}, timeout=60)


def test_plain_create_returns_a_response_with_output_text(tiny_server: RunningServer) -> None:
    # Greedy: a sampled answer may be a lone end-of-text token, and then output_text is rightly empty.
    response = client(tiny_server).responses.create(
        model="tiny", input="Hello", max_output_tokens=6, temperature=0
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "tiny" and response.output_text
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.usage is not None and 0 < response.usage.output_tokens <= 6
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":  # the tiny model rarely stops by itself
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"


def test_instructions_and_input_messages_answer_what_chat_answers(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    response = api.responses.create(
        model="tiny+tiny-lora",
        instructions="Be brief.",
        input=[
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}],
            },
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again?"},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    chat = api.chat.completions.create(
        model="tiny+tiny-lora",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again?"},
        ],
        max_completion_tokens=8,
        temperature=0,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_streaming_events_are_ordered_and_add_up(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    whole = api.responses.create(model="tiny", input="Stream me", max_output_tokens=8, temperature=0)
    events = list(
        api.responses.create(model="tiny", input="Stream me", max_output_tokens=8, temperature=0, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in {"response.completed", "response.incomplete"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas and final.id == events[0].response.id  # type: ignore[union-attr]


def test_stream_has_event_names_and_no_done_marker(tiny_server: RunningServer) -> None:
    body = {"model": "tiny", "input": "x", "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{tiny_server.v1}/responses", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [payload["type"] for payload in payloads]


def test_function_call_items_round_trip_into_the_conversation(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    question: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    follow_up = [
        *question,
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    first = api.responses.create(model="tiny", input=question, max_output_tokens=2)
    second = api.responses.create(model="tiny", input=follow_up, max_output_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its result are in the prompt


@pytest.fixture(scope="module")
def tools_server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    folder = tmp_path_factory.mktemp("responses-tools") / "tiny-tools"
    shutil.copytree(tiny_models.base, folder)
    (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    server: RunningServer = start_server(
        Settings(models={"with-tools": ModelSettings(source=str(folder), dtype="float32")})
    )
    return server


def test_flat_function_tools_reach_the_chat_template(tools_server: RunningServer) -> None:
    api = client(tools_server)
    without = api.responses.create(model="with-tools", input="Weather?", max_output_tokens=2)
    with_tools = api.responses.create(
        model="with-tools", input="Weather?", max_output_tokens=2, tools=[WEATHER]
    )  # type: ignore[list-item]
    assert without.usage is not None and with_tools.usage is not None
    assert with_tools.usage.input_tokens > without.usage.input_tokens
    assert with_tools.tools[0].type == "function" and with_tools.tools[0].name == "get_weather"


# Forced tool calls and schema formats reach the chat path's constrained decoding under the Responses
# names: a forced call comes back as a function_call item, a json_schema format as JSON text.
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "name": "get_weather"}], ids=["required", "named"]
)
def test_a_forced_tool_choice_yields_a_function_call_item(
    tools_server: RunningServer, tool_choice: Any
) -> None:
    response = post(
        tools_server, model="with-tools", max_output_tokens=200, tools=[WEATHER], tool_choice=tool_choice
    )
    assert response.status_code == 200, response.text
    calls = [item for item in response.json()["output"] if item["type"] == "function_call"]
    assert calls and all(call["name"] == "get_weather" for call in calls)
    assert all(isinstance(json.loads(call["arguments"]), dict) for call in calls)
    if isinstance(tool_choice, dict):  # a named function is called exactly once
        assert len(calls) == 1


def test_a_json_schema_text_format_yields_json_that_validates(tools_server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
    }
    text = {"format": {"type": "json_schema", "name": "w", "schema": schema, "strict": True}}
    response = post(tools_server, model="with-tools", max_output_tokens=64, text=text)
    assert response.status_code == 200, response.text
    message = next(item for item in response.json()["output"] if item["type"] == "message")
    assert isinstance(json.loads(message["content"][0]["text"])["city"], str)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"temperatur": 1}, "temperatur"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a", "extra": 1}]}]},
            "input[0].content[0].extra",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"include": ["file_search_call.results"]}, "include[0]"),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_bad_requests_name_the_responses_field(
    tiny_server: RunningServer, fields: dict[str, Any], param: str
) -> None:
    response = post(tiny_server, **fields)
    error = assert_openai_error(response, 404 if param == "model" else 400, param)
    assert "valid string" not in error["message"]


def test_prompt_too_long_names_input(tiny_server: RunningServer) -> None:
    response = post(tiny_server, input="word " * 400, max_output_tokens=2)
    error = assert_openai_error(response, 400, "input")
    assert error["code"] == "context_length_exceeded"


def test_store_false_and_hints_are_accepted(tiny_server: RunningServer) -> None:
    response = post(
        tiny_server,
        store=False,
        metadata={"k": "v"},
        user="u",
        truncation="disabled",
        max_output_tokens=2,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["metadata"] == {"k": "v"} and body["store"] is False
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert logprobs and all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
