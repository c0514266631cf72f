"""Pure ASGI middleware: request ids and access log, API-key auth, request body size limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so that streaming responses pass through untouched and client
disconnects still reach the route, which is what cancels generation.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError

log = logging.getLogger("peft_gateway.access")

PUBLIC_PATHS = frozenset({"/", "/health", "/ready"})  # "/" is the playground page; it asks for the key


async def _send_error(send: Send, error: APIError, extra_headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers + extra_headers})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Gives every request an id (the client's ``x-request-id`` if it sent a sane one) and logs it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if sent and len(sent) <= 128 and sent.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            usage = metrics.pop_usage(request_id) if metrics is not None else None
            if usage is not None:
                state = scope["state"]
                state["model"], state["prompt_tokens"], state["completion_tokens"] = usage
            self._log(scope, status, seconds, request_id)
            if metrics is not None:
                metrics.record_request(scope.get("path", ""), status, seconds)

    def _log(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        state: dict[str, Any] = scope.get("state", {})
        fields = {
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "model": state.get("model"),
            "prompt_tokens": state.get("prompt_tokens"),
            "completion_tokens": state.get("completion_tokens"),
            "latency_ms": round(seconds * 1000, 1),
            "request_id": request_id,
        }
        text = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        log.info("%s", text, extra={"fields": fields})


class ApiKeyAuth:
    """Bearer-token auth against configured keys, compared in constant time; ``PUBLIC_PATHS`` stay open."""

    def __init__(self, app: ASGIApp, *, keys: list[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys if key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or scope["path"] in PUBLIC_PATHS
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matched = False
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(token.strip(), key)
        if scheme.lower() == b"bearer" and matched:
            await self.app(scope, receive, send)
            return
        message = (
            "You didn't provide an API key. Send 'Authorization: Bearer <key>'."
            if not header
            else "Incorrect API key provided."
        )
        await _send_error(
            send,
            APIError(401, message, code="invalid_api_key"),
            [(b"www-authenticate", b'Bearer realm="peft-gateway"')],
        )


class BodySizeLimit:
    """413 for bodies above the limit, whether announced by Content-Length or streamed chunked."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(
            413,
            f"The request body is larger than this gateway's limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, too_large, [])
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except APIError as exc:
            if exc is not too_large or response_started:
                raise
            await _send_error(send, too_large, [])
