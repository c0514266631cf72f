"""Tool-call parsing for the Hermes, Llama 3 JSON and Mistral formats, whole and streamed."""

from __future__ import annotations

import json

import pytest

from engines.toolcalls import (
    ContentDelta,
    ToolCallDelta,
    ToolCallStream,
    ToolEvent,
    call_grammar,
    detect_format,
    split_tool_calls,
)

NAMES = {"get_weather", "get_time"}
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def streamed(
    fmt: str, text: str, step: int = 1, max_calls: int | None = None, cut: bool = False
) -> list[ToolEvent]:
    stream = ToolCallStream(fmt, NAMES, max_calls)  # type: ignore[arg-type]
    events: list[ToolEvent] = []
    for start in range(0, len(text), step):
        events += stream.feed(text[start : start + step])
    return events + stream.finish(cut=cut)


def content(events: list[ToolEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ContentDelta))


def test_hermes_blocks_after_text_become_calls_and_the_text_stays_content() -> None:
    text, calls = split_tool_calls("hermes", NAMES, "Let me check. " + PARIS + "\n" + ROME)
    assert text == "Let me check. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_streaming_never_leaks_markup_and_gives_id_and_name_before_arguments(step: int) -> None:
    events = streamed("hermes", "Hi " + PARIS + "\n" + ROME + "\n", step)
    assert content(events) == "Hi "
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(c.index, c.name is not None, c.arguments) for c in calls] == [
        (0, True, ""),
        (0, False, '{"city": "Paris"}'),
        (1, True, ""),
        (1, False, '{"city": "Rome"}'),
    ]


def test_text_that_only_looks_like_the_start_of_markup_is_released() -> None:
    events = streamed("hermes", "a <tool b < c")
    assert content(events) == "a <tool b < c" and not any(isinstance(e, ToolCallDelta) for e in events)


def test_unknown_function_names_stay_text_content() -> None:
    block = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'
    assert split_tool_calls("hermes", NAMES, block) == (block, [])


def test_malformed_or_unclosed_json_stays_text_content_when_the_model_stopped() -> None:
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert split_tool_calls("hermes", NAMES, broken) == (broken, [])
    assert split_tool_calls("hermes", NAMES, broken, cut=True) == (broken, [])  # closed by the model
    unclosed = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    assert split_tool_calls("hermes", NAMES, unclosed) == (unclosed, [])


CUT_CALLS = {
    "hermes": (
        "",
        '<tool_call>\n{"name": "get_weather", "arguments": {"ci',
        PARIS + "\n" + '<tool_call>\n{"name": "get_time", "argu',
    ),
    "llama3_json": (
        "<|python_tag|>",
        '{"name": "get_weather", "parameters": {"ci',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "para',
    ),
    "mistral": (
        "[TOOL_CALLS]",
        '[{"name": "get_weather", "arguments": {"ci',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_ti',
    ),
}


@pytest.mark.parametrize("step", [1, 5, 1000])
@pytest.mark.parametrize("fmt", CUT_CALLS)
def test_a_call_cut_by_the_token_limit_is_neither_content_nor_a_call(fmt: str, step: int) -> None:
    marker, cut, _ = CUT_CALLS[fmt]
    for text in (cut, marker + cut, "  " + marker + cut):
        assert split_tool_calls(fmt, NAMES, text, cut=True) == ("", [])  # type: ignore[arg-type]
        events = streamed(fmt, text, step, cut=True)
        assert events == [], (fmt, text)


@pytest.mark.parametrize("step", [1, 5, 1000])
@pytest.mark.parametrize("fmt", CUT_CALLS)
def test_a_complete_call_before_a_cut_one_stays_a_call_and_no_markup_is_content(fmt: str, step: int) -> None:
    _, _, text = CUT_CALLS[fmt]
    body, calls = split_tool_calls(fmt, NAMES, text, cut=True)  # type: ignore[arg-type]
    assert body == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    events = streamed(fmt, text, step, cut=True)
    assert content(events) == "" and [e.name for e in events if isinstance(e, ToolCallDelta) and e.name] == [
        "get_weather"
    ]


def test_text_before_a_cut_hermes_call_stays_content() -> None:
    text = "Let me check. " + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    assert split_tool_calls("hermes", NAMES, text, cut=True) == ("Let me check. ", [])


def test_a_hermes_call_cut_in_its_closing_tag_is_a_call() -> None:
    _, calls = split_tool_calls("hermes", NAMES, PARIS[: -len("_call>")], cut=True)
    assert [c.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize(
    ("fmt", "fragment"), [("hermes", "<tool_c"), ("mistral", "[TOOL_CA"), ("llama3_json", "<|python")]
)
def test_a_held_marker_fragment_at_the_cut_is_dropped(fmt: str, fragment: str) -> None:
    assert split_tool_calls(fmt, NAMES, "Sure. " + fragment, cut=True) == ("Sure. ", [])  # type: ignore[arg-type]
    assert content(streamed(fmt, "Sure. " + fragment, cut=True)) == "Sure. "
    assert split_tool_calls(fmt, NAMES, "Sure. " + fragment) == ("Sure. " + fragment, [])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("llama3_json", '{"answer": "Paris is the capi'),
        ("llama3_json", "{sunny, then rai"),
        ("mistral", "[1, 2, 3, 4"),
        ("mistral", '[{"city": "Par'),
    ],
)
def test_a_cut_answer_that_only_starts_like_a_bare_call_stays_content(fmt: str, text: str) -> None:
    assert split_tool_calls(fmt, NAMES, text, cut=True) == (text, [])  # type: ignore[arg-type]
    assert content(streamed(fmt, text, 3, cut=True)) == text


@pytest.mark.parametrize(
    ("fmt", "text"), [("llama3_json", " {\n  "), ("mistral", "[ {"), ("llama3_json", '{"na')]
)
def test_a_cut_bare_block_that_is_the_beginning_of_a_call_is_dropped(fmt: str, text: str) -> None:
    assert split_tool_calls(fmt, NAMES, text, cut=True) == ("", [])  # type: ignore[arg-type]


def test_an_unclosed_but_complete_hermes_block_is_a_call() -> None:
    _, calls = split_tool_calls("hermes", NAMES, '<tool_call>\n{"name": "get_time", "arguments": {}}')
    assert [c.name for c in calls] == ["get_time"]


def test_max_calls_keeps_the_first_call_only() -> None:
    _, calls = split_tool_calls("hermes", NAMES, PARIS + ROME, max_calls=1)
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]


def test_llama3_json_calls_with_tag_or_plain_and_several_separated_by_semicolons() -> None:
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    two = one + '; {"name": "get_time", "parameters": {"zone": "UTC"}}'
    for text, names in (
        (one, ["get_weather"]),
        ("<|python_tag|>" + one, ["get_weather"]),
        (two, ["get_weather", "get_time"]),
    ):
        body, calls = split_tool_calls("llama3_json", NAMES, text)
        assert body == "" and [c.name for c in calls] == names
    assert split_tool_calls("llama3_json", NAMES, "Paris is {sunny}") == ("Paris is {sunny}", [])


def test_llama3_json_streaming_plain_text_is_not_held_back() -> None:
    stream = ToolCallStream("llama3_json", NAMES)
    assert content(stream.feed("Hello")) == "Hello"


def test_mistral_calls_with_or_without_the_marker() -> None:
    array = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    for text in ("[TOOL_CALLS]" + array, array, "[TOOL_CALLS] " + array):
        body, calls = split_tool_calls("mistral", NAMES, text)
        assert body == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert split_tool_calls("mistral", NAMES, "[1, 2]") == ("[1, 2]", [])


def test_arguments_given_as_a_json_string_are_normalised() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}\n</tool_call>'
    _, calls = split_tool_calls("hermes", NAMES, text)
    assert json.loads(calls[0].arguments) == {"zone": "UTC"}


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{{ '<tool_call>' }}", "hermes"),
        ("[TOOL_CALLS]", "mistral"),
        ("<|python_tag|>", "llama3_json"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        ({"default": "x", "tool_use": "<tool_call>"}, "hermes"),
    ],
)
def test_the_format_is_read_from_the_chat_template(template: object, fmt: str | None) -> None:
    assert detect_format(template) == fmt


def test_call_grammars_accept_exactly_calls_to_the_offered_functions() -> None:
    import llguidance
    import llguidance.hf

    from engines.testing.tiny import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    functions = [
        ("get_weather", {"type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"]})
    ]
    cases = {
        "hermes": (PARIS, ROME),
        "llama3_json": (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            '{"name": "x", "parameters": {}}',
        ),
        "mistral": (
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
            "[TOOL_CALLS][]",
        ),
    }
    for fmt, (good, bad) in cases.items():
        grammar = llguidance.LLMatcher.grammar_from_lark(call_grammar(fmt, functions, parallel=False))  # type: ignore[arg-type]
        for text, accepted in ((good, True), (bad, False)):
            matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
            ok = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
            assert (ok and matcher.is_accepting()) == accepted, (fmt, text)
