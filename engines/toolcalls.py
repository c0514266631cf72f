"""Tool calls in a model's text: the formats of the major chat templates, parsed whole or while streaming.

A model trained for tools writes its calls as text in its template's format; OpenAI clients expect them
as ``message.tool_calls``. Three formats cover the common templates:

- ``hermes`` (Hermes, Qwen2.5/3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one
  block per call, maybe after some text;
- ``llama3_json`` (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}`` (maybe
  after ``<|python_tag|>``, several separated by ``;``);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (the marker is a special token
  that decoding drops, so an answer that *starts* with ``[`` is read the same way).

Markup that does not parse, or names a function the request did not offer, stays text content: the
client sees exactly what the model wrote rather than a call it cannot dispatch. The exception is a call
cut by the token limit (``finish(cut=True)``): the model did not write bad markup, it was stopped inside a
call, and OpenAI never shows such markup as text. The calls finished before the cut stay calls, the cut
one is dropped (as is a trailing fragment that may begin a marker); a cut answer that only starts like the
bare formats' calls (``{``, ``[``) but does not look like one stays content.
The same ``ToolCallStream`` serves streaming and whole responses, so both always agree.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from engines.grammar import JSON_OPTIONS, closed_objects

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
FORMATS: tuple[ToolFormat, ...] = ("hermes", "llama3_json", "mistral")

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
MISTRAL_MARKER = "[TOOL_CALLS]"
LLAMA_TAG = "<|python_tag|>"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def detect_format(chat_template: Any) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, or None when it shows none."""
    text = json.dumps(chat_template) if isinstance(chat_template, dict) else str(chat_template or "")
    if HERMES_OPEN in text:
        return "hermes"
    if MISTRAL_MARKER in text:
        return "mistral"
    if LLAMA_TAG in text or ('"parameters"' in text and "ipython" in text):
        return "llama3_json"
    return None


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: ``arguments`` is JSON text, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed piece of call ``index``: first id and name (arguments ""), then argument fragments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


ToolEvent = ContentDelta | ToolCallDelta


class ToolCallStream:
    """Splits streamed text into content and tool calls for one format and one set of offered functions.

    Content streams as soon as it cannot be the start of a call's markup; markup is held until the call
    is complete, then emitted as a call (or, if it is not a valid call, as the text it was; or not at all
    when the token limit cut it, see ``finish``).
    """

    def __init__(self, fmt: ToolFormat, names: set[str], max_calls: int | None = None) -> None:
        self.fmt = fmt
        self.names = names
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._in_call = False
        self._started = False  # any non-whitespace seen (llama3/mistral calls must come first)
        self._after_call = False

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self, cut: bool = False) -> list[ToolEvent]:
        """Everything still held: a trailing call that parses, or the text it was.

        ``cut``: the generation ended at the token limit (finish reason "length"), so open markup is a
        call the model could not finish rather than text it chose to write: it is dropped, not released.
        """
        return self._drain(final=True, cut=cut)

    def _drain(self, *, final: bool, cut: bool = False) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while True:
            if self._in_call:
                taken = self._take_block(final)
                if taken is None:
                    return events
                block, closed = taken
                events.extend(self._emit_block(block, cut=cut and not closed))
                continue
            start = self._call_start()
            if start is None:
                held = self._held_suffix() if cut or not final else 0
                self._content(events, self._buffer[: len(self._buffer) - held], final)
                if final:
                    self._buffer = ""  # cut: what was held may begin a marker, and is not shown as text
                return events
            self._content(events, self._buffer[:start], final=True)
            self._in_call = True

    def _content(self, events: list[ToolEvent], text: str, final: bool) -> None:
        """Emit ``text`` (the front of the buffer) as content, except whitespace right after a call."""
        if (self._after_call or not self._started) and not text.strip():
            if final:  # whitespace before, between or after calls is not content
                self._buffer = self._buffer[len(text) :]
            return  # otherwise held: it is content only if more text follows
        self._buffer = self._buffer[len(text) :]
        if not text:
            return
        self._after_call = False
        self._started = self._started or bool(text.strip())
        events.append(ContentDelta(text))

    def _call_start(self) -> int | None:
        """Where call markup begins in the buffer, if it does."""
        buffer = self._buffer
        if self.fmt == "hermes":
            index = buffer.find(HERMES_OPEN)
            return index if index >= 0 else None
        marker = MISTRAL_MARKER if self.fmt == "mistral" else LLAMA_TAG
        index = buffer.find(marker)
        if index >= 0:
            return index
        if not self._started:
            stripped = buffer.lstrip()
            lead = "[" if self.fmt == "mistral" else "{"
            if stripped.startswith(lead):
                return len(buffer) - len(stripped)
        return None

    def _held_suffix(self) -> int:
        """How many trailing characters might begin call markup and must wait for more text."""
        buffer = self._buffer
        if not self._started and not buffer.strip():
            return len(buffer)  # leading whitespace: the answer may still open with a call
        marker = {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARKER, "llama3_json": LLAMA_TAG}[self.fmt]
        for size in range(min(len(marker) - 1, len(buffer)), 0, -1):
            if marker.startswith(buffer[-size:]):
                return size
        return 0

    def _take_block(self, final: bool) -> tuple[str, bool] | None:
        """The next whole piece of markup and whether the model closed it, or None while it may grow."""
        if self.fmt == "hermes":
            end = self._buffer.find(HERMES_CLOSE)
            if end >= 0:
                block, self._buffer = (
                    self._buffer[: end + len(HERMES_CLOSE)],
                    self._buffer[end + len(HERMES_CLOSE) :],
                )
                return block, True
        if not final:
            return None
        block, self._buffer = self._buffer, ""
        return block, False

    def _emit_block(self, block: str, *, cut: bool = False) -> list[ToolEvent]:
        self._in_call = False
        self._started = True
        parsed = parse_block(self.fmt, block)
        if parsed is None and cut and looks_like_call(self.fmt, block):
            # Stopped inside a call: the calls finished before the cut are kept (all offered, as for a
            # whole block), the rest is markup the model never finished and is not content either.
            finished = finished_calls(self.fmt, block)
            offered = all(name in self.names for name, _ in finished)
            return self._emit_calls(finished if offered else [])
        if parsed is None or not parsed or any(name not in self.names for name, _ in parsed):
            self._after_call = False
            return [ContentDelta(block)] if block else []
        return self._emit_calls(parsed)

    def _emit_calls(self, parsed: list[tuple[str, str]]) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        for name, arguments in parsed:
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                break  # parallel_tool_calls=false: the first call only
            call = ToolCall(name=name, arguments=arguments)
            index = len(self.calls)
            self.calls.append(call)
            events.append(ToolCallDelta(index=index, arguments="", id=call.id, name=name))
            events.append(ToolCallDelta(index=index, arguments=arguments))
        self._after_call = True
        return events


def parse_block(fmt: ToolFormat, block: str) -> list[tuple[str, str]] | None:
    """``(name, arguments JSON)`` for each call in one piece of markup, or None if it is not calls."""
    text = block.strip()
    if fmt == "hermes":
        if not text.startswith(HERMES_OPEN):
            return None
        inner = text[len(HERMES_OPEN) :]
        inner = inner[: -len(HERMES_CLOSE)] if inner.endswith(HERMES_CLOSE) else inner
        objects = _json_values(inner)
        key = "arguments"
    elif fmt == "mistral":
        text = text[len(MISTRAL_MARKER) :] if text.startswith(MISTRAL_MARKER) else text
        values = _json_values(text)
        objects = None
        if values is not None and len(values) == 1:
            objects = values[0] if isinstance(values[0], list) else values
        key = "arguments"
    else:
        text = text[len(LLAMA_TAG) :] if text.startswith(LLAMA_TAG) else text
        objects = _json_values(text, separators=";")
        key = "parameters"
    return _calls_in(objects, key)


def _calls_in(objects: list[Any] | None, key: str) -> list[tuple[str, str]] | None:
    """``(name, arguments JSON)`` for decoded call objects, or None if any of them is not a call."""
    if not objects:
        return None
    calls = []
    for item in objects:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get(key, item.get("arguments", item.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string already
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def looks_like_call(fmt: ToolFormat, block: str) -> bool:
    """Whether markup cut short was a call: a marker says so; a bare ``{`` or ``[`` only with a ``"name"``.

    An answer may well start with ``{`` or ``[`` as ordinary text; only one whose first object opens
    with a ``"name"`` key (or that was cut before it could) is taken for a call.
    """
    text = block.lstrip()
    marker = {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARKER, "llama3_json": LLAMA_TAG}[fmt]
    if text.startswith(marker):
        return True
    if fmt == "hermes":
        return False
    opening = '[{"name"' if fmt == "mistral" else '{"name"'
    compact = ""
    for char in text:
        if not char.isspace():
            compact += char
            if len(compact) == len(opening):
                break
    return compact.startswith(opening) or opening.startswith(compact)


def finished_calls(fmt: ToolFormat, block: str) -> list[tuple[str, str]]:
    """The calls written out whole in markup that was cut short (the last, unfinished one left out)."""
    text = block.strip()
    if fmt == "hermes":
        # One block per call: it is finished if its JSON is, even when the cut fell in the closing tag.
        for size in range(min(len(HERMES_CLOSE), len(text)), 0, -1):
            if HERMES_CLOSE.startswith(text[-size:]):
                text = text[:-size]
                break
        return parse_block(fmt, text) or []
    if fmt == "mistral":
        text = text[len(MISTRAL_MARKER) :].lstrip() if text.startswith(MISTRAL_MARKER) else text
        if not text.startswith("["):
            return []
        objects = _json_values(text[1:], separators=",", partial=True)
        return _calls_in(objects, "arguments") or []
    text = text[len(LLAMA_TAG) :] if text.startswith(LLAMA_TAG) else text
    return _calls_in(_json_values(text, separators=";", partial=True), "parameters") or []


def _json_values(text: str, separators: str = "", *, partial: bool = False) -> list[Any] | None:
    """All JSON values in ``text``, one after another (whitespace or ``separators`` between), or None.

    ``partial``: the values before the first that does not decode (text cut short), instead of None.
    """
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    skip = " \t\r\n" + separators
    while True:
        while position < len(text) and text[position] in skip:
            position += 1
        if position >= len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return values if partial else None
        values.append(value)


def split_tool_calls(
    fmt: ToolFormat, names: set[str], text: str, max_calls: int | None = None, cut: bool = False
) -> tuple[str, list[ToolCall]]:
    """A whole answer as (content, calls): the non-streaming twin of ``ToolCallStream``.

    ``cut``: the answer ended at the token limit (see ``ToolCallStream.finish``).
    """
    stream = ToolCallStream(fmt, names, max_calls)
    events = stream.feed(text) + stream.finish(cut=cut)
    content = "".join(event.text for event in events if isinstance(event, ContentDelta))
    return content, stream.calls


def call_grammar(fmt: ToolFormat, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> str:
    """A Lark grammar (llguidance) for one or more calls in ``fmt`` to one of ``functions``.

    Each call's arguments must validate against that function's parameters schema, so a forced call
    (``tool_choice`` ``required`` or a named function) always parses and can be dispatched.
    """
    key = "parameters" if fmt == "llama3_json" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, key: closed_objects(parameters or {"type": "object"})},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for name, parameters in functions
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if fmt == "mistral":
        array: dict[str, Any] = {"type": "array", "items": schema, "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        schema = array
    embedded = json.dumps({"x-guidance": JSON_OPTIONS, **schema})
    if fmt == "hermes":
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "{HERMES_OPEN}\\n" %json {embedded} "\\n{HERMES_CLOSE}"\n'
    if fmt == "mistral":
        return f'start: "{_lark_escape(MISTRAL_MARKER)}" %json {embedded}\n'
    return f"start: %json {embedded}\n"


def _lark_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
