"""The ``x-peft-gateway-replica`` response header: which engine replica served a request.

``ClusterEngine`` names the replica in ``CURRENT_REPLICA`` as the first message of a stream arrives;
the middleware holds a streamed response's headers back until then.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "x-peft-gateway-replica"


@dataclass
class ReplicaNote:
    """Which replica served the current request; filled by ``ClusterEngine.generate``."""

    name: str | None = None
    #: The replica that answered ``acquire``: named when no stream ran (``/v1/load_model``).
    described: str | None = None
    flush: Callable[[], Awaitable[None]] | None = None

    async def record(self, name: str) -> None:
        if self.name is None:
            self.name = name
            if self.flush is not None:
                await self.flush()


CURRENT_REPLICA: contextvars.ContextVar[ReplicaNote | None] = contextvars.ContextVar(
    "peft_gateway_replica", default=None
)


class ReplicaHeader:
    """Adds ``x-peft-gateway-replica`` to every response a replica served.

    A streamed response's headers go out before generation starts, so they are held back (with the
    first frames) until the replica's first message names it, which comes before any token; responses
    no replica served (errors found in the ingress, ``/v1/models``) go out unchanged when complete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = ReplicaNote()
        held: list[Message] = []

        async def flush() -> None:
            while held:
                message = held.pop(0)
                replica = note.name or note.described
                if message["type"] == "http.response.start" and replica is not None:
                    headers = list(message.get("headers", []))
                    headers.append((REPLICA_HEADER.encode(), replica.encode("latin-1", "replace")))
                    message = {**message, "headers": headers}
                await send(message)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" or held:
                held.append(message)
                finished = message["type"] == "http.response.body" and not message.get("more_body", False)
                if note.name is not None or finished:
                    await flush()
                return
            await send(message)

        note.flush = flush
        token = CURRENT_REPLICA.set(note)
        try:
            await self.app(scope, receive, send_with_header)
        finally:
            CURRENT_REPLICA.reset(token)
