"""From a chat request's ``response_format``, ``tools`` and ``tool_choice`` to what the engine enforces.

The gateway decides *what* must hold (a JSON schema for the answer, a forced call in the model's tool
format, how to read calls out of free text); the engine only sees a ``Constraint`` to compile and a
tool format to parse. Every mistake in these fields is a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.engine import ServedModel
from engines.grammar import ANY_OBJECT, Constraint
from engines.toolcalls import ToolFormat, call_grammar, detect_format
from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, ResponseFormat
from gateway.settings import Settings

#: The format assumed for a template that shows none: Hermes/Qwen blocks are the most common.
DEFAULT_TOOL_FORMAT: ToolFormat = "hermes"


@dataclass(frozen=True)
class ToolPlan:
    """How to read tool calls out of this request's output."""

    fmt: ToolFormat
    names: frozenset[str]
    max_calls: int | None


def function_specs(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, parameters schema)`` of each offered function; 400 for anything else."""
    specs = []
    for index, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(
                400,
                f"tools[{index}]: only tools of type 'function' with a 'function' object are supported.",
                param=f"tools[{index}]",
                code="invalid_value",
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"tools[{index}].function needs a 'name'.", param=f"tools[{index}]")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise APIError(
                400,
                f"tools[{index}].function.parameters must be a JSON schema object.",
                param=f"tools[{index}]",
            )
        specs.append((name, parameters))
    return specs


def tool_format(settings: Settings, loaded: ServedModel) -> ToolFormat:
    """The model's tool-call format: ``[models.X] tool_parser``, else read from its chat template."""
    model = settings.models.get(loaded.parent or loaded.name)
    configured = model.tool_parser if model is not None else "auto"
    if configured != "auto":
        return configured
    return detect_format(getattr(loaded.tokenizer, "chat_template", None)) or DEFAULT_TOOL_FORMAT


def forced_function(body: ChatCompletionRequest, names: list[str]) -> list[str] | None:
    """The functions a call is forced to (``required``: any offered, named: that one), or None."""
    choice = body.tool_choice
    if choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return names
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(
                400,
                "tool_choice must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
                code="invalid_value",
            )
        if name not in names:
            raise APIError(
                400, f"tool_choice names '{name}', which is not among the tools.", param="tool_choice"
            )
        return [name]
    raise APIError(
        400, f"tool_choice '{choice}' is not one of 'none', 'auto', 'required'.", param="tool_choice"
    )


def plan(
    body: ChatCompletionRequest, settings: Settings, loaded: ServedModel
) -> tuple[Constraint | None, ToolPlan | None]:
    """The grammar this request's output must follow (if any) and how to read tool calls (if any)."""
    tools = body.tools if body.tool_choice != "none" else None
    if body.tool_choice not in (None, "none") and not body.tools:
        raise APIError(400, "tool_choice is set but no tools are given.", param="tool_choice")
    constraint = response_constraint(body.response_format)
    if not tools:
        return constraint, None
    specs = function_specs(tools)
    fmt = tool_format(settings, loaded)
    parallel = body.parallel_tool_calls is not False
    tool_plan = ToolPlan(fmt=fmt, names=frozenset(n for n, _ in specs), max_calls=None if parallel else 1)
    forced = forced_function(body, [name for name, _ in specs])
    if forced is not None:
        chosen = [spec for spec in specs if spec[0] in forced]
        named = isinstance(body.tool_choice, dict)  # OpenAI: a named function is called exactly once
        constraint = Constraint.lark(call_grammar(fmt, chosen, parallel and not named), param="tools")
    return constraint, tool_plan


def response_constraint(response_format: ResponseFormat | None) -> Constraint | None:
    """``json_object``: any JSON object; ``json_schema``: its schema (``strict`` or not, it is enforced)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint.json_schema(ANY_OBJECT)
    spec = response_format.json_schema
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(
            400,
            "response_format of type 'json_schema' needs a 'json_schema' object with a 'name' "
            "(and the 'schema').",
            param="response_format",
            code="invalid_value",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be an object.", param="response_format")
    return Constraint.json_schema(schema)
