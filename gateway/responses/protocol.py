"""Request schema of ``POST /v1/responses`` (OpenAI's Responses API), stateless.

As in ``gateway.protocol``: unknown fields are refused by name, known fields are honoured or refused
with a precise 400. Input items are validated by their shape (a message, a function call, a function
call's output), so an error names the item and field at fault (``input[2].call_id``), and an image or
file part says what it is, not "Input should be a valid string".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from gateway.protocol import FieldError, StrictRequest, UnsupportedPart, content_tag, part_tag

#: Input item types this gateway maps onto chat messages; any other type is refused by name.
ITEM_TYPES = ("message", "function_call", "function_call_output")


class InputText(StrictRequest):
    """A text part: ``input_text`` in user turns, ``output_text`` in assistant turns sent back."""

    type: Literal["input_text", "output_text", "text"]
    text: str
    # What the SDK puts on an ``output_text`` part of a previous response, passed back as input.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None


InputPart = Annotated[
    Annotated[InputText, Tag("part:text")] | Annotated[UnsupportedPart, Tag("part:unsupported")],
    Discriminator(part_tag),
]
InputContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[InputPart], Tag("list[parts]")],
    Discriminator(content_tag),
]


def content_text(content: str | list[InputText | UnsupportedPart]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, InputText))


class MessageItem(StrictRequest):
    """``{"role", "content"}`` (an "easy" message), or a full ``message`` item sent back as input."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: InputContent
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(StrictRequest):
    """A call the model made in an earlier turn: an assistant message's ``tool_calls`` entry in chat."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(StrictRequest):
    """The caller's result for a call: a ``role: "tool"`` message in chat."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: InputContent
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class UnsupportedItem(BaseModel):
    """Reasoning, item references, built-in tool calls...: refused by their type."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(data, dict) and not isinstance(kind, str):
            # An object or list is no item type at all: the fault is the field, not an unsupported kind.
            raise FieldError(
                "type",
                "an input item's type must be a string: 'message', 'function_call' or 'function_call_output'",
            )
        raise PydanticCustomError(
            "unsupported_item",
            "input items of type '{kind}' are not supported; use messages, 'function_call' and "
            "'function_call_output' items",
            {"kind": kind},
        )


def _item_tag(value: Any) -> str:
    """The branch for an input item; a ``type`` that is not a string goes to ``UnsupportedItem``.

    Only strings are compared with the known types, so no client value is ever hashed or formatted
    into a tag, whatever its JSON type.
    """
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        kind = "message"
    return f"item:{kind}" if isinstance(kind, str) and kind in ITEM_TYPES else "item:unsupported"


InputItem = Annotated[
    Annotated[MessageItem, Tag("item:message")]
    | Annotated[FunctionCallItem, Tag("item:function_call")]
    | Annotated[FunctionCallOutputItem, Tag("item:function_call_output")]
    | Annotated[UnsupportedItem, Tag("item:unsupported")],
    Discriminator(_item_tag),
]
ResponseInput = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[InputItem], Tag("list[items]")],
    Discriminator(lambda value: "list[items]" if isinstance(value, list) else "str"),
]


class TextConfig(StrictRequest):
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(StrictRequest):
    model: str = Field(min_length=1)
    input: ResponseInput
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # 0 is allowed, as in OpenAI's API: only the most likely token (``SamplingParams.greedy``).
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Identifiers and hints that do not change what is generated: accepted.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    # Stateful or hosted features: part of the schema so that a client hears "not supported" by name.
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    context_management: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ResponsesRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self
