"""A Responses request as the chat-completions body that ``/v1/chat/completions`` would take.

The Responses API is served by the chat pipeline itself, so tools, structured outputs and every sampling
rule behave the same on both endpoints. This module maps the request one way (input items to messages,
flat function tools to chat's nested ones, ``text.format`` to ``response_format``) and keeps, for each
chat message, the Responses field it came from, so that an error the chat path raises names the field
the client actually sent (``input[2]``, ``max_output_tokens``, ``text.format``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import APIError
from gateway.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponsesRequest,
    content_text,
)

#: Keys of a Responses function tool this gateway passes on; others are refused by name.
FUNCTION_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: Chat fields and the Responses field each comes from, for error messages.
PARAMS = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}
_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\](.*)")
#: Chat nests a function's fields under ``function``; Responses tools and tool_choice are flat.
_NESTED_FUNCTION = re.compile(r"(tools\[\d+\]|tool_choice)\.function(.*)")


@dataclass
class ChatTranslation:
    """The chat body, and the Responses ``param`` of each of its messages."""

    body: dict[str, Any]
    origins: list[str] = field(default_factory=list)

    def param(self, chat_param: str | None) -> str | None:
        """The Responses field a chat error's ``param`` is about."""
        if chat_param is None:
            return None
        match = _MESSAGE_PARAM.fullmatch(chat_param)
        if match:
            index, rest = int(match.group(1)), match.group(2)
            origin = self.origins[index] if index < len(self.origins) else "input"
            return origin + rest if origin.startswith("input[") else origin
        if chat_param == "messages":
            return "input"
        nested = _NESTED_FUNCTION.fullmatch(chat_param)
        if nested:
            return nested.group(1) + nested.group(2)
        for chat, responses in PARAMS.items():
            if chat_param == chat or chat_param.startswith((chat + ".", chat + "[")):
                return responses
        return chat_param

    def remap(self, error: APIError) -> APIError:
        param = self.param(error.param)
        message = error.message
        if error.param and param != error.param:
            message = message.replace(f"'{error.param}'", f"'{param}'")
        return APIError(
            error.status, message, param=param, code=error.code, type=error.type, headers=error.headers
        )


def refuse_unsupported(body: ResponsesRequest) -> None:
    """Stateful and hosted features are refused by name, never silently dropped."""
    if body.store:
        raise _unsupported(
            "store", "'store: true' is not supported: this gateway is stateless and keeps no responses."
        )
    stateful = {
        "previous_response_id": body.previous_response_id,
        "conversation": body.conversation,
        "prompt": body.prompt,
        "context_management": body.context_management,
    }
    for name, value in stateful.items():
        if value:
            raise _unsupported(
                name,
                f"'{name}' is not supported: this gateway is stateless; send the whole conversation as "
                "'input'.",
            )
    if body.background:
        raise _unsupported("background", "Background responses are not supported.")
    if body.reasoning:
        raise _unsupported("reasoning", "'reasoning' is not supported by this gateway's models.")
    if body.max_tool_calls is not None:
        raise _unsupported(
            "max_tool_calls", "'max_tool_calls' applies to built-in tools, which are not supported."
        )
    if body.truncation == "auto":
        raise _unsupported("truncation", "truncation 'auto' is not supported; input is never truncated.")
    if body.text is not None and body.text.verbosity is not None:
        raise _unsupported("text.verbosity", "'text.verbosity' is not supported by this gateway's models.")
    for index, item in enumerate(body.include or ()):
        if item != LOGPROBS_INCLUDE:
            raise _unsupported(
                f"include[{index}]", f"include '{item}' is not supported; only '{LOGPROBS_INCLUDE}'."
            )


def to_chat(body: ResponsesRequest) -> ChatTranslation:
    """The chat-completions body for ``body`` (already checked by ``refuse_unsupported``)."""
    translation = ChatTranslation(body={"model": body.model})
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        translation.origins.append("instructions")
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        translation.origins.append("input")
    else:
        for index, item in enumerate(body.input):
            _add_item(messages, translation.origins, item, f"input[{index}]")
    chat = translation.body
    chat["messages"] = messages
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    for name in (
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "user",
        "safety_identifier",
        "prompt_cache_key",
    ):
        value = getattr(body, name)
        if value is not None:
            chat[name] = value
    if body.tools:
        chat["tools"] = [_chat_tool(tool, index) for index, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _chat_tool_choice(body.tool_choice)
    if body.text is not None and body.text.format is not None:
        response_format = _chat_response_format(body.text.format)
        if response_format is not None:
            chat["response_format"] = response_format
    if LOGPROBS_INCLUDE in (body.include or ()) or body.top_logprobs:
        chat["logprobs"] = True
        if body.top_logprobs:
            chat["top_logprobs"] = body.top_logprobs
    if body.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return translation


def _add_item(
    messages: list[dict[str, Any]],
    origins: list[str],
    item: MessageItem | FunctionCallItem | FunctionCallOutputItem | Any,
    origin: str,
) -> None:
    if isinstance(item, MessageItem):
        messages.append({"role": item.role, "content": content_text(item.content)})
        origins.append(origin)
    elif isinstance(item, FunctionCallItem):
        call = {
            "id": item.call_id,
            "type": "function",
            "function": {"name": item.name, "arguments": item.arguments},
        }
        previous = messages[-1] if messages else None
        # Consecutive calls (parallel tool calls) are one assistant turn in chat, as the model made them.
        if previous is not None and previous["role"] == "assistant" and previous.get("tool_calls"):
            previous["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            origins.append(origin)
    elif isinstance(item, FunctionCallOutputItem):
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content_text(item.output)})
        origins.append(origin)


def _chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    """Responses' flat ``{type, name, parameters}`` as chat's ``{type, function: {name, parameters}}``."""
    kind = tool.get("type")
    if kind != "function":
        raise _unsupported(
            f"tools[{index}].type",
            f"Tools of type '{kind}' are not supported; only 'function' tools (the caller runs them).",
        )
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise APIError(
            400,
            f"Missing required parameter: 'tools[{index}].name'.",
            param=f"tools[{index}].name",
            code="missing_required_parameter",
        )
    for key, value in tool.items():
        if key not in FUNCTION_TOOL_KEYS and value is not None:
            raise APIError(
                400,
                f"Unrecognized request argument supplied: tools[{index}].{key}",
                param=f"tools[{index}].{key}",
                code="invalid_value",
            )
    function = {
        key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None
    }
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise APIError(
                400,
                f"Invalid value for 'tool_choice': '{choice}'; use 'auto', 'none', 'required' or "
                "{'type': 'function', 'name': ...}.",
                param="tool_choice",
                code="invalid_value",
            )
        return choice
    if (
        choice.get("type") == "function"
        and isinstance(choice.get("name"), str)
        and set(choice) <= {"type", "name"}
    ):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported(
        "tool_choice", "Only tool_choice {'type': 'function', 'name': ...} is supported as an object."
    )


def _chat_response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind == "text" and set(fmt) == {"type"}:
        return None
    if kind == "json_object" and set(fmt) == {"type"}:
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise APIError(
                400,
                "text.format of type 'json_schema' needs a 'name' and a 'schema' object.",
                param="text.format",
                code="invalid_value",
            )
        extra = set(fmt) - {"type", "name", "schema", "description", "strict"}
        if extra:
            raise APIError(
                400,
                f"Unrecognized request argument supplied: text.format.{sorted(extra)[0]}",
                param=f"text.format.{sorted(extra)[0]}",
                code="invalid_value",
            )
        schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(
        400,
        f"Invalid value for 'text.format': type '{kind}' with keys {sorted(fmt)}; use 'text', 'json_object' "
        "or 'json_schema'.",
        param="text.format",
        code="invalid_value",
    )


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")
