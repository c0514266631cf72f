"""A tool call cut by the token limit ends with "length" and never shows its markup as content (#23).

The demo is forced to call ``get_weather`` (``tool_choice: "required"``); the token limits that cut it are
read from an uncut answer first, so that the cut falls inside a call by construction. Decoding is greedy
and the call grammar allows the same tokens up to the end of a call, whether or not it may be followed by
more calls, so the uncut answer's first call is the cut one's too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.cli import with_demo
from gateway.settings import Settings
from tests.conftest import RunningServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]
#: Questions on which the demo with its adapter makes more than one call (one is enough).
SEVERAL_CALLS = ("What is the weather in Berlin?", "What is the weather in Tokyo?")


@pytest.fixture(scope="module")
def client(start_server: Any, demo_dir: Path) -> openai.OpenAI:
    server: RunningServer = start_server(with_demo(Settings(), demo_dir))
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def forced(client: openai.OpenAI, model: str, question: str, **options: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        **options,
    )


def first_call_tokens(client: openai.OpenAI, model: str, question: str) -> int:
    """The tokens of the answer's first call, uncut: the whole answer when only one call is allowed."""
    whole = forced(client, model, question, max_tokens=400, parallel_tool_calls=False)
    assert whole.choices[0].finish_reason == "tool_calls", whole
    return int(whole.usage.completion_tokens)


def streamed(client: openai.OpenAI, model: str, question: str, **options: Any) -> tuple[str, str, list[Any]]:
    """(content, finish reason, tool-call deltas) of a streamed answer, as the SDK delivers them."""
    content, reason, calls = "", "", list[Any]()
    for chunk in forced(client, model, question, stream=True, **options):
        if chunk.choices:
            delta = chunk.choices[0].delta
            assert "<tool_call" not in (delta.content or ""), chunk
            content += delta.content or ""
            calls += delta.tool_calls or []
            reason = chunk.choices[0].finish_reason or reason
    return content, reason, calls


def test_a_single_call_cut_by_max_tokens_ends_with_length_and_no_content(client: openai.OpenAI) -> None:
    question = "What is the weather in Paris?"
    limit = first_call_tokens(client, "demo", question) // 2
    reply = forced(client, "demo", question, max_tokens=limit)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == limit
    assert choice.message.content is None and not choice.message.tool_calls
    assert streamed(client, "demo", question, max_tokens=limit) == ("", "length", [])


# A call's fixed markup up to its "city" value is 22 demo tokens: 2 more than the first call stop in the
# second's opening tag (a held "<"), 12 inside its JSON (an open <tool_call> block).
@pytest.mark.parametrize("extra", [2, 12])
def test_a_second_call_cut_by_max_tokens_leaves_the_first_call_and_no_markup(
    client: openai.OpenAI, extra: int
) -> None:
    model = "demo+demo-zh"
    question = next(
        (
            q
            for q in SEVERAL_CALLS
            if len(forced(client, model, q, max_tokens=400).choices[0].message.tool_calls or []) > 1
        ),
        None,
    )
    assert question, "the demo makes a single call to each question: pick another"
    limit = first_call_tokens(client, model, question) + extra
    reply = forced(client, model, question, max_tokens=limit)
    choice = reply.choices[0]
    assert choice.finish_reason == "length", reply
    assert choice.message.content is None
    assert [call.function.name for call in choice.message.tool_calls or []] == ["get_weather"]
    content, reason, calls = streamed(client, model, question, max_tokens=limit)
    assert (content, reason) == ("", "length")
    assert [(call.index, call.function.name) for call in calls if call.id] == [(0, "get_weather")]


def test_a_responses_call_cut_by_max_output_tokens_is_incomplete_without_text(client: openai.OpenAI) -> None:
    question = "What is the weather in Paris?"
    limit = first_call_tokens(client, "demo", question) // 2
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": PARAMETERS}]
    options: Any = {"tools": tools, "tool_choice": "required", "temperature": 0, "max_output_tokens": limit}
    response = client.responses.create(model="demo", input=question, **options)
    assert response.status == "incomplete" and response.output_text == ""
    assert all(item.type != "function_call" for item in response.output)
    events = list(client.responses.create(model="demo", input=question, stream=True, **options))
    assert not [event for event in events if event.type == "response.output_text.delta"]
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == ""
