"""Assistant tool calls and tool results reach the chat template in the form templates expect."""

from __future__ import annotations

from engines.generation import ChatMessage
from engines.prompts import render_chat
from engines.testing.tiny import build_byte_tokenizer
from tests.e2e.test_structured import HERMES_TEMPLATE, WEATHER


def test_assistant_calls_are_rendered_with_arguments_as_an_object_and_tool_results_follow() -> None:
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    ]
    text = tokenizer.decode(render_chat(tokenizer, messages, [WEATHER]))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
