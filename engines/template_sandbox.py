"""Chat templates rendered so that a hostile one cannot hold a thread or fill memory.

A chat template is code shipped by whoever published a base or adapter. transformers renders it in
jinja2's ``ImmutableSandboxedEnvironment``, which stops attribute tricks but not a template that loops for
ever or builds a string of gigabytes. A Python thread cannot be killed from outside, so the render stops
itself: while it runs, a trace function on its own thread sees every line the compiled template executes
and raises once the deadline passes or a value or the output grows past the size limit. Operations that
could build a huge value in a single step (``*``, ``**``, ``+``, ``%``, large integer literals, format
widths) are checked before they run, since no line event comes in the middle of one C call.

The environment mirrors transformers' (same filters, globals, ``{% generation %}`` tag, trim settings) so
that templates render to the same text.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engines.errors import InvalidGenerationRequest

#: The file name jinja gives code compiled from a string: how the tracer knows template frames.
TEMPLATE_FILENAME = "<template>"
_WIDE_FORMAT = re.compile(r"\d{7,}")


class TemplateLimitExceeded(InvalidGenerationRequest):
    """The chat template ran too long or built too much (400: the model's template, not the server)."""

    param = "messages"
    code = "chat_template_limit"


@dataclass(frozen=True)
class RenderLimits:
    """How long one render may take and how large anything it builds may be (characters or items)."""

    seconds: float = 10.0
    max_chars: int = 4_000_000


DEFAULT_RENDER_LIMITS = RenderLimits()


def _too_large(what: str, limits: RenderLimits) -> TemplateLimitExceeded:
    return TemplateLimitExceeded(
        f"The model's chat template {what} (limit {limits.max_chars} characters); it was stopped."
    )


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus size checks on the operations that can build a value in one step."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

    def __init__(self, limits: RenderLimits) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
        self.limits = limits
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def _check_size(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limits.max_chars:
            raise _too_large("computed a number too large", self.limits)
        if isinstance(value, str | list | tuple) and len(value) > self.limits.max_chars:
            raise _too_large("built a value too large", self.limits)
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        limit = self.limits.max_chars
        if operator == "**" and (not isinstance(right, int | float) or right > 64):
            raise _too_large("raised a number to too high a power", self.limits)
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                repeated = isinstance(sized, str | list | tuple) and isinstance(count, int)
                if repeated and len(sized) * max(count, 0) > limit:
                    raise _too_large("repeated a value too many times", self.limits)
        sequences = isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple)
        if operator == "+" and sequences and len(left) + len(right) > limit:
            raise _too_large("built a value too large", self.limits)
        if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise _too_large("used too wide a format", self.limits)
        return self._check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            __self._check_size(value)
        owner = getattr(__obj, "__self__", None)
        formatting = getattr(__obj, "__name__", None) in ("format", "format_map")
        if formatting and isinstance(owner, str) and _WIDE_FORMAT.search(owner):
            raise _too_large("used too wide a format", __self.limits)
        return __self._check_size(super().call(__context, __obj, *args, **kwargs))


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Not jinja's own tojson, which escapes HTML characters (transformers overrides it the same way).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(source: str, limits: RenderLimits) -> jinja2.Template:
    """Compile once per template: after a static check for number literals beyond the size limit."""
    env = _BoundedSandbox(limits)
    tree = env.parse(source)
    for const in tree.find_all(nodes.Const):
        number = isinstance(const.value, int) and not isinstance(const.value, bool)
        if number and abs(const.value) > limits.max_chars:
            raise _too_large(f"holds the number {const.value}, too large", limits)
        if isinstance(const.value, str) and _WIDE_FORMAT.search(const.value) and "{" in const.value:
            raise _too_large("holds too wide a format", limits)
    return env.from_string(source)


class _Guard:
    """The trace function of one render: deadline and value sizes, checked at every template line."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename == TEMPLATE_FILENAME:
            return self.line
        return None

    def line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(
                f"The model's chat template did not finish within {self.limits.seconds:g} seconds; it was "
                "stopped."
            )
        if event == "line":
            for value in frame.f_locals.values():
                self._check(value)
        elif event == "return":
            self._check(arg)
        return self.line

    def _check(self, value: Any) -> None:
        if isinstance(value, str | list | tuple) and len(value) > self.limits.max_chars:
            raise _too_large("built a value too large", self.limits)
        if isinstance(value, jinja2.utils.Namespace):
            for item in value._Namespace__attrs.values():
                self._check(item)


@contextmanager
def _traced(guard: _Guard) -> Iterator[None]:
    previous = sys.gettrace()
    sys.settrace(guard)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_template(source: str, limits: RenderLimits, **context: Any) -> str:
    """Render ``source`` with ``context`` under ``limits``; ``TemplateLimitExceeded`` when it runs away.

    Runs on the calling thread (which it traces while rendering): call it from a worker thread, never
    from the event loop.
    """
    guard = _Guard(limits)
    with _traced(guard):
        template = _compile(source, limits)
        out: list[str] = []
        size = 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > limits.max_chars:
                raise _too_large("produced too long a prompt", limits)
            out.append(piece)
    return "".join(out)
