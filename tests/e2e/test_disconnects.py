"""A client hanging up in the middle of its request body is not a server error."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e


def test_a_client_gone_mid_body_is_one_quiet_line_not_a_500(
    tiny_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    host, port = tiny_server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000\r\n\r\n" + b'{"model": "tiny", "messages": ['
            )
            time.sleep(0.2)
    time.sleep(1.0)
    metrics = httpx.get(f"{tiny_server.url}/metrics", timeout=10).text
    assert 'path="/v1/chat/completions",status="500"' not in metrics
    assert not [r for r in caplog.records if r.exc_info], [
        r.getMessage() for r in caplog.records if r.exc_info
    ]
    assert any("disconnected while sending the request body" in r.getMessage() for r in caplog.records)
