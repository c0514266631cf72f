"""Chat templates render like transformers renders them, and hostile ones are stopped, not waited out."""

from __future__ import annotations

import time

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from engines.template_sandbox import RenderLimits, TemplateLimitExceeded, render_template
from engines.testing.tiny import CHAT_TEMPLATE

LIMITS = RenderLimits(seconds=1.0, max_chars=100_000)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

TOOL_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif -%}"
    "<|{{ m.role }}|>{{ m.content | trim }}{% generation %}{% endgeneration %}\n"
    "{%- endfor -%}"
    "{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif -%}"
    "[{{ ns.system }}]{{ bos_token }}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    "{{ '=' * 3 }}{{ dict(a=1) | tojson }}"
)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, TOOL_TEMPLATE])
def test_templates_render_exactly_as_transformers_renders_them(template: str) -> None:
    context = {"bos_token": "<s>", "eos_token": "</s>"}
    expected, _ = render_jinja_template(
        [MESSAGES], tools=TOOLS, chat_template=template, add_generation_prompt=True, **context
    )
    ours = render_template(
        template,
        LIMITS,
        messages=MESSAGES,
        tools=TOOLS,
        documents=None,
        add_generation_prompt=True,
        **context,
    )
    assert ours == expected[0]


HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursion by macro": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "huge literal repeat": "{{ 'x' * 1000000000 }}",
    "computed repeat": "{% set n = 1000 %}{{ messages[0].content * (n * n * n) }}",
    "power": "{{ 'x' * 10 ** 9 }}",
    "doubling": (
        "{% set ns = namespace(s=messages[0].content) %}"
        "{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
    ),
    "list doubling": (
        "{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
    ),
    "wide filter": "{{ 'x' | center(999999999) }}",
    "wide format": "{{ '{:>999999999}'.format('x') }}",
    "wide percent": "{{ '%999999999s' % 'x' }}",
    "output flood": "{% for i in range(100000) %}{{ messages[1].content * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_are_stopped_within_the_deadline(name: str) -> None:
    started = time.monotonic()
    with pytest.raises((TemplateLimitExceeded, RecursionError)):
        render_template(HOSTILE[name], LIMITS, messages=MESSAGES, tools=None, add_generation_prompt=True)
    assert time.monotonic() - started < LIMITS.seconds + 1.0


def test_a_stopped_render_leaves_no_tracer_behind() -> None:
    import sys

    with pytest.raises(TemplateLimitExceeded):
        render_template(HOSTILE["nested loops"], LIMITS, messages=MESSAGES)
    assert sys.gettrace() is None or "Guard" not in type(sys.gettrace()).__name__
