"""Every failure the gateway reports, as OpenAI's error JSON, mapped to HTTP in this one place.

``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI's clients expect: the openai
SDK turns 400/401/404/413/422/503 into its typed exceptions from these fields.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.errors import (
    AdapterAccessDenied,
    AdapterRejected,
    ContextLengthExceeded,
    EngineError,
    InvalidGenerationRequest,
    InvalidModelName,
    ModelLoadFailed,
    ModelNotFound,
    Overloaded,
    UpstreamIntegrityError,
    UpstreamUnavailable,
    UpstreamUnreachable,
)

log = logging.getLogger("peft_gateway.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error response: raise it anywhere in a route and the handler below renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_ENGINE_STATUS: tuple[tuple[type[EngineError], int], ...] = (
    (InvalidModelName, 400),
    (ModelNotFound, 404),
    (AdapterRejected, 400),
    (AdapterAccessDenied, 400),
    (ContextLengthExceeded, 400),
    (InvalidGenerationRequest, 400),
    (Overloaded, 503),
    (UpstreamUnreachable, 502),
    (UpstreamIntegrityError, 502),
    (UpstreamUnavailable, 503),
    (ModelLoadFailed, 500),
)


def from_engine(error: EngineError) -> APIError:
    """The HTTP rendering of an engine failure."""
    status = next((code for cls, code in _ENGINE_STATUS if isinstance(error, cls)), 500)
    headers: dict[str, str] = {}
    if isinstance(error, Overloaded) and error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    elif isinstance(error, Overloaded):
        headers["x-should-retry"] = "false"  # the openai SDK's own switch: a retry cannot help
    elif isinstance(error, UpstreamUnavailable) and error.retryable:
        headers["Retry-After"] = "5"
    elif isinstance(error, UpstreamUnavailable):
        # The openai SDK retries every 5xx unless told not to; a retry cannot fix these.
        headers["x-should-retry"] = "false"
    return APIError(status, error.message, param=error.param, code=error.code, headers=headers)


def param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    """Pydantic's error location as OpenAI's ``param``: ``messages[0].content``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-", "json-or-python", "str", "list[", "part:", "item:")) or part in {
            "constrained-str",
            "literal",
        }:
            continue
        else:
            text += f".{part}" if text else part
    return text or None


def from_validation(error: ValidationError) -> APIError:
    """The first validation problem, with the field it is about as ``param``.

    Pydantic words a validator's ``ValueError`` as "Value error, <text>"; the client gets just the text.
    A validator that raises an exception with a ``param`` attribute (``gateway.protocol.FieldError``)
    names the field itself, which matters for model validators: pydantic locates those at the model.
    """
    first = error.errors()[0]
    param = param_from_loc(tuple(first["loc"]))
    message = first["msg"]
    code = "invalid_value" if first["type"] != "missing" else "missing_required_parameter"
    raised = (first.get("ctx") or {}).get("error")
    if isinstance(raised, Exception):
        message = str(raised)
        field = getattr(raised, "param", None)
        if isinstance(field, str) and field:
            param = f"{param}.{field}" if param else field
        code = getattr(raised, "code", None) or code
    if first["type"] == "extra_forbidden":
        name = param if param else repr(str(first["loc"][-1]) if first["loc"] else "")
        message = f"Unrecognized request argument supplied: {name}"
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return APIError(400, message, param=param, code=code)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(payload: Any) -> str | None:
    """The ``param`` of the first string (or key) holding a lone UTF-16 surrogate, else ``None``.

    JSON's ``\\ud800`` escapes decode to such strings, which no tokenizer can encode (and which
    cannot even be written back in an error message as UTF-8).
    """
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return path or None
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    escaped = key.encode("utf-8", "backslashreplace").decode("utf-8")
                    return f"{path}.{escaped}" if path else escaped
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None


async def parse_json(request: Request) -> Any:
    """The request body as JSON, or a 400 that says why it is not.

    Strict JSON: ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused, and so are
    strings with lone surrogates, which are not Unicode text.
    """
    body = await request.body()
    if not body:
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, huge integers, NaN
        raise APIError(
            400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from exc
    except RecursionError as exc:
        raise APIError(
            400, "The JSON body of your request is nested too deeply.", code="invalid_json"
        ) from exc
    bad = _lone_surrogate(payload)
    if bad is not None:
        raise APIError(
            400,
            f"Invalid value for '{bad}': a string holds a lone UTF-16 surrogate, which is not valid Unicode.",
            param=bad,
            code="invalid_value",
        )
    return payload


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def handle_engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return from_engine(exc).response()


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
    if exc.status_code == 404:
        message = f"Unknown path {request.url.path}; see /v1/models, /v1/chat/completions."
    return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, "The server had an error while processing your request.").response()


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: handle_api_error,
    EngineError: handle_engine_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
