"""How uvicorn runs the app: connection limits and timeouts from ``[server]``.

uvicorn closes idle keep-alive connections but has no timeout for a client that opens a connection and
sends its headers slowly or never (slowloris); such connections would be held for ever. The protocol
class below closes a connection whose request headers have not arrived ``header_timeout`` seconds after
it opened or after its previous response.

:func:`serve` runs the app under its own ``uvicorn.Server`` and hands that server to the app, so the app
sees the exit signal the moment uvicorn does (``gateway.app.exit_requested``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from gateway.settings import ServerSettings

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger("peft_gateway.serving")

#: uvicorn's exit code for a server that never started (``uvicorn.run`` exits with it too).
STARTUP_FAILURE = 3


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


def serve(app: Starlette, server: ServerSettings) -> int:
    """Run ``app`` under uvicorn until a signal stops it; the exit code (0, or :data:`STARTUP_FAILURE`).

    Like ``uvicorn.run``, except that the ``uvicorn.Server`` is put on ``app.state.server`` first: its
    ``should_exit`` is what the app watches to cancel Hub fetches as SIGTERM arrives, since
    sse-starlette's own flag is not set by a signal here (see ``gateway.app.exit_requested``).

    A thread still blocked in a Hub download may outlive this; see :func:`exit_past_blocked_threads`.
    """
    import uvicorn

    runner = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(server)))
    app.state.server = runner
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, re-raised by uvicorn once it has shut down
        runner.run()
    return 0 if runner.started else STARTUP_FAILURE


def exit_past_blocked_threads(code: int, wait: float = 1.0) -> None:
    """End the process with ``code`` now if threads Python would join at exit are still running.

    A cancelled Hub fetch stops being waited for, but the download under it goes on: ``snapshot_download``
    reads files on a ``ThreadPoolExecutor`` of its own, whose workers Python joins at exit (daemon or
    not), and a worker blocked on a silent socket holds that for ``huggingface_hub``'s own timeouts and
    retries (minutes). uvicorn re-raises the SIGTERM it caught after shutting down, which kills an ordinary
    process before that join, but the gateway is PID 1 in its container (the Dockerfile's ``ENTRYPOINT``),
    and the kernel ignores a signal whose action is the default there: the process would go on to
    Python's exit and wait until Kubernetes' SIGKILL. By now the app has shut down (responses sent, the
    engine closed), so nothing is lost by not waiting: the interrupted download's ``.incomplete`` file is
    removed by the next fetch of that repo. Threads that end within ``wait`` seconds (idle pool workers
    winding down) end normally.
    """
    deadline = time.monotonic() + wait
    for thread in _joined_at_exit():
        thread.join(max(deadline - time.monotonic(), 0))
    blocked = _joined_at_exit()
    if not blocked:
        return
    log.warning(
        "exiting without waiting for %d thread(s) still blocked (%s)",
        len(blocked),
        ", ".join(sorted({thread.name for thread in blocked})),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _joined_at_exit() -> list[threading.Thread]:
    """The live threads besides this one that Python's exit would wait for.

    Those are the non-daemon threads, and every worker of a ``concurrent.futures`` thread pool, daemon
    or not: the pool's exit hook joins them all (a worker started from a daemon thread, as
    ``snapshot_download``'s are from the fetcher's, is a daemon and still joined). The pool's registry is
    private; should it move, only its workers are missed here.
    """
    import concurrent.futures.thread as pool_threads

    current = threading.current_thread()
    workers = list(getattr(pool_threads, "_threads_queues", {}).keys())
    candidates = {*(t for t in threading.enumerate() if not t.daemon), *workers}
    return [t for t in candidates if t is not current and t.is_alive()]
