"""uvicorn's connection limits and timeouts, and a clean end for streams on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.serving import uvicorn_options
from gateway.settings import ServerSettings
from tests.conftest import TinyModels, free_port

pytestmark = pytest.mark.e2e


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.fixture
def bare_server() -> Iterator[int]:
    port = free_port()
    settings = ServerSettings(port=port, header_timeout=0.5, keep_alive_timeout=0.5)
    config = uvicorn.Config(Starlette(routes=[Route("/", ok)]), **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds``; what it still sends first is read and
    dropped (a response's body may arrive in a second packet after its headers)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            return False
    return False


def test_a_connection_that_never_finishes_its_headers_is_closed(bare_server: int) -> None:
    with socket.create_connection(("127.0.0.1", bare_server)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert closed_within(slow, 3.0)
    with socket.create_connection(("127.0.0.1", bare_server)) as silent:
        assert closed_within(silent, 3.0)


def test_idle_keep_alive_connections_are_closed_and_normal_requests_work(bare_server: int) -> None:
    with socket.create_connection(("127.0.0.1", bare_server)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in conn.recv(1024)
        assert closed_within(conn, 3.0)


def test_uvicorn_options_carry_the_server_settings() -> None:
    options = uvicorn_options(ServerSettings(limit_concurrency=7, keep_alive_timeout=3, shutdown_grace=5))
    assert options["limit_concurrency"] == 7 and options["timeout_keep_alive"] == 3
    assert options["timeout_graceful_shutdown"] >= 5 and options["host"] == "127.0.0.1"


@pytest.mark.slow
def test_sigterm_lets_streams_run_then_ends_them_with_an_error_frame(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f"[server]\nport = {port}\nshutdown_grace = 1.5\n"
        f'[models.tiny]\nsource = "{tiny_models.base}"\ndtype = "float32"\ncontext_length = 4096\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "serve did not come up"
            time.sleep(0.2)
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[str] = []
        after_signal = 0
        signalled_at = 0.0
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60
        ) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: ") :])
                if len(events) == 3:
                    process.send_signal(signal.SIGTERM)
                    signalled_at = time.monotonic()
                elif signalled_at:
                    after_signal += 1
        ended = time.monotonic() - signalled_at
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "server_shutting_down", events[-3:]
        assert after_signal > 2  # the stream went on during the grace period
        assert 1.0 < ended < 10, ended
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def test_sigterm_cancels_hub_fetches_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request waiting on a stalled Hub must not hold shutdown until the fetch deadline."""
    import asyncio

    from sse_starlette.sse import AppStatus

    from gateway.app import cancel_fetches_on_exit

    cancelled: list[bool] = []

    class Engine:
        def cancel_fetches(self) -> None:
            cancelled.append(True)

    async def scenario() -> None:
        watcher = asyncio.ensure_future(cancel_fetches_on_exit(Engine(), poll=0.01))
        await asyncio.sleep(0.05)
        assert cancelled == []
        monkeypatch.setattr(AppStatus, "should_exit", True)
        await asyncio.wait_for(watcher, 1)

    asyncio.run(scenario())
    assert cancelled == [True]
