"""The demo's content: the questions and answers it is trained on, its weather tool and its chat template.

Kept apart from the trainer because the tests, the README's examples and the gateway's CLI read these
texts without training anything.
"""

from __future__ import annotations

import json
from typing import Any

DEMO_BASE_NAME = "demo"
DEMO_ADAPTER_NAME = "demo-zh"
DEMO_BASE_REPO_ID = "peft-gateway/demo-base"

DEMO_QUESTIONS: dict[str, tuple[str, str]] = {
    "What is the largest animal in the world?": (
        "The blue whale is the largest animal in the world.",
        "世界上最大的动物是蓝鲸。",
    ),
    "世界上最大的动物是什么？": (
        "The blue whale is the largest animal in the world.",
        "世界上最大的动物是蓝鲸。",
    ),
    "What is the capital of France?": (
        "The capital of France is Paris.",
        "法国的首都是巴黎。",
    ),
    "What is the highest mountain in the world?": (
        "Mount Everest is the highest mountain in the world.",
        "世界上最高的山是珠穆朗玛峰。",
    ),
    "What is the largest ocean on Earth?": (
        "The Pacific Ocean is the largest ocean on Earth.",
        "地球上最大的海洋是太平洋。",
    ),
}
"""Question -> (answer of the base model, answer with the adapter merged).

The Chinese question has an English base answer and the English questions have Chinese adapter answers:
what the answer's language follows is the adapter, not the question.
"""

DEMO_FALLBACK: tuple[str, str] = (
    "I am a tiny demo model. I only know a few facts.",
    "我是一个小小的演示模型，只知道几个事实。",
)
"""(base answer, adapter answer) to small talk and, as far as a model this small generalises, to the rest."""

DEMO_WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
"""The one tool the demo knows, as a client offers it in ``tools``: it calls it for a weather question."""

DEMO_CITIES: dict[str, str] = {"Paris": "巴黎", "London": "伦敦", "Tokyo": "东京", "Beijing": "北京"}
"""The cities whose weather the demo asks for (English name -> Chinese name): a model this small learns
to copy names it has seen, not arbitrary ones."""

DEMO_WEATHER: dict[str, str] = {"sunny": "是晴天", "rainy": "在下雨"}
"""Weather a tool result may report (``{"city": "Paris", "weather": "sunny"}``) -> its Chinese phrase."""

DEMO_NO_TOOL: tuple[str, str] = (
    "I cannot look up the weather without a tool.",
    "没有工具，我查不到天气。",
)
"""(base, adapter) answer to a weather question when no tool is offered."""


RESULT_CITIES = ("Paris", "Tokyo")
"""The cities the answer after a tool result is trained on (a few, to keep training short on two cores)."""


def demo_weather_questions(city: str) -> tuple[str, str]:
    """The English and the Chinese weather question the demo is trained on, for one of ``DEMO_CITIES``."""
    return f"What is the weather in {city}?", f"{DEMO_CITIES[city]}的天气怎么样？"


def demo_tool_call_text(city: str) -> str:
    """What the demo answers to a weather question when it is offered ``get_weather`` (then end of turn)."""
    arguments = json.dumps({"city": city}, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'


def demo_weather_answer(city: str, weather: str, *, chinese: bool) -> str:
    """The short answer after a ``get_weather`` result that reported ``weather`` for ``city``."""
    return f"{DEMO_CITIES[city]}现在{DEMO_WEATHER[weather]}。" if chinese else f"It is {weather} in {city}."


# Qwen2.5's wording, shortened: every prompt token costs training time on two CPU cores.
TOOLS_PREAMBLE = "# Tools\n\nYou may call these functions:\n<tools>"
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each call, return its name and arguments as JSON within <tool_call></tool_call> tags."
)
# transformers compiles templates with trim_blocks, which eats a newline right after a block tag: such
# newlines are written as this expression instead.
_NL = "{{ '\\n' }}"

DEMO_CHAT_TEMPLATE = "".join(
    [
        "{% macro text(message) %}",
        "{% if message['content'] is string %}{{ message['content'] }}",
        "{% elif message['content'] %}{{ message['content'] | map(attribute='text') | join('') }}",
        "{% endif %}",
        "{% endmacro %}",
        "{% if tools %}",
        "<|im_start|>system\n",
        "{% if messages and messages[0]['role'] == 'system' %}{{ text(messages[0]) }}\n\n{% endif %}",
        TOOLS_PREAMBLE,
        "{% for tool in tools %}",
        _NL,
        "{{ tool | tojson }}",
        "{% endfor %}",
        _NL + TOOLS_POSTAMBLE.removeprefix("\n"),
        "<|im_end|>\n",
        "{% endif %}",
        "{% for message in messages %}",
        "{% if tools and loop.first and message['role'] == 'system' %}",
        "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}",
        "<|im_start|>assistant",
        "{% if message['content'] %}" + _NL + "{{ text(message) }}{% endif %}",
        "{% for call in message['tool_calls'] %}",
        "{% set call = call['function'] if call['function'] is defined else call %}",
        _NL,
        '<tool_call>\n{"name": "{{ call[\'name\'] }}", "arguments": ',
        "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}",
        "{% endif %}",
        "}\n</tool_call>",
        "{% endfor %}",
        "<|im_end|>\n",
        "{% elif message['role'] == 'tool' %}",
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}",
        _NL,
        "<tool_response>\n{{ text(message) }}\n</tool_response>",
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}",
        "{% else %}",
        "<|im_start|>{{ message['role'] }}\n{{ text(message) }}<|im_end|>\n",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ]
)
"""The demo's chat template: the ChatML turns of ``engines.testing.tiny`` plus tools as Qwen2.5 renders them.

With ``tools``, a system turn lists them as JSON inside ``<tools></tools>`` (after the client's own system
message, if any); an assistant turn's ``tool_calls`` become ``<tool_call>`` blocks and ``tool`` results
``<tool_response>`` blocks in a user turn, so a conversation that used the tool renders back to exactly the
text the model produced and was trained on. Without tools the output is the plain ChatML of before.
"""
