"""How uvicorn runs the app: connection limits and timeouts from ``[server]``.

uvicorn closes idle keep-alive connections but has no timeout for a client that opens a connection and
sends its headers slowly or never (slowloris); such connections would be held for ever. The protocol
class below closes a connection whose request headers have not arrived ``header_timeout`` seconds after
it opened or after its previous response.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from gateway.settings import ServerSettings


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (httptools if installed, else h11) with a header deadline."""
    base: Any
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - httptools is an optional uvicorn extra
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderTimeoutProtocol(base):  # type: ignore[misc]
        header_timeout = seconds

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

        def _cancel_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` from ``[server]``."""
    return {
        "host": server.host,
        "port": server.port,
        "http": header_timeout_protocol(server.header_timeout),
        "timeout_keep_alive": server.keep_alive_timeout,
        "limit_concurrency": server.limit_concurrency,
        # Streams get shutdown_grace to finish and then end themselves; this is only the backstop.
        "timeout_graceful_shutdown": math.ceil(server.shutdown_grace) + 10,
        "log_config": None,
        "access_log": False,
        "server_header": False,
    }
