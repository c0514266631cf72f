"""The e2e servers run with the options ``peft-gateway serve`` gives uvicorn, so the suite tests them.

A server started by the ``start_server`` fixture with a small ``header_timeout`` closes a connection that
never sends its request headers (the slowloris guard ``peft-gateway serve`` installs), and still serves a
request that does send them.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from tests.conftest import TinyModels
from tests.e2e.conftest import tiny_settings


def test_the_e2e_server_closes_a_connection_that_never_sends_its_headers(
    start_server: Any, tiny_models: TinyModels
) -> None:
    server = start_server(tiny_settings(tiny_models, server={"header_timeout": 0.5}))
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server, not by the 10 s client timeout
        assert time.monotonic() - started < 9
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.app.state.server.config.limit_concurrency == 1024  # the serve default, as configured
