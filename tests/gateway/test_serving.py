"""uvicorn's connection limits and timeouts; SIGTERM: streams end cleanly, Hub waits end at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
from tests.hub_server import HubServer

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


#: Tokens the streaming test's model may hold (and the gateway grant): more than any CPU can produce in a
#: shutdown grace, so the stream can only end by being drained, whatever the machine's speed.
ENDLESS = 2**30

#: Starts ``python -m gateway.cli`` with SIGTERM's action ignored, as it is for a container's PID 1 (the
#: kernel drops a signal whose action is the default there, such as the SIGTERM uvicorn re-raises once it
#: has shut down): the process must then end on its own, not by that signal.
AS_PID_1 = (
    "import runpy, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "runpy.run_module('gateway.cli', run_name='__main__', alter_sys=True)"
)


def start_serve(
    config: Path, port: int, log: Path, *, env: dict[str, str] | None = None, as_pid_1: bool = False
) -> subprocess.Popen[str]:
    """``peft-gateway serve --config config`` in a subprocess, once it answers /health on ``port``.

    Its stderr goes to ``log`` rather than a pipe, which a chatty server could fill and block on.
    """
    launcher = ["-c", AS_PID_1] if as_pid_1 else ["-m", "gateway.cli"]
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, *launcher, "serve", "--config", str(config)],
            stderr=sink,
            text=True,
            env=env,
        )
    wait_for(lambda: _healthy(port), process, log, "serve did not come up")
    return process


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(
    condition: Callable[[], bool], process: subprocess.Popen[str], log: Path, what: str, limit: float = 120
) -> None:
    """Poll ``condition`` (a state, never a duration); ``limit`` only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"{what}: serve exited with {process.returncode}\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{what} within {limit}s\n{log.read_text()}"
        time.sleep(0.05)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


@pytest.mark.slow
def test_sigterm_lets_streams_run_then_ends_them_with_an_error_frame(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    """A stream that outlasts the grace goes on after SIGTERM and is then ended with the shutdown frame.

    The stream cannot finish first on any CPU: ``ignore_eos`` and no ``max_tokens`` on a model whose
    context (and the gateway's token limit) is :data:`ENDLESS` tokens; the memory budget is set as large,
    so the KV cache admission does not refuse what it would need at the very end.
    """
    port = free_port()
    grace = 1.5
    config = tmp_path / "serve.toml"
    config.write_text(
        f"[server]\nport = {port}\nshutdown_grace = {grace}\nmax_tokens_limit = {ENDLESS}\n"
        f"[cache]\nmax_memory = {2**60}\n"
        f'[models.tiny]\nsource = "{tiny_models.base}"\ndtype = "float32"\ncontext_length = {ENDLESS}\n'
    )
    process = start_serve(config, port, tmp_path / "serve.log")
    try:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
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
                elif signalled_at and '"content"' in events[-1]:
                    after_signal += 1
        ended = time.monotonic() - signalled_at
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == "server_shutting_down", events[-3:]
        assert after_signal > 0  # the stream went on during the grace period
        assert grace * 0.6 < ended < grace + 10, ended
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    finally:
        stop(process)


HUB_REPO = "test-org/tiny-lora"
HUB_BASE = "test-org/tiny-hub-base"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("as_pid_1", "stall_on", "what"),
    [(False, "info", "adapter"), (True, "get", "adapter"), (False, "get", "base")],
    ids=["stalled-api-call", "pid-1-stalled-file-download", "stalled-base-download"],
)
def test_sigterm_answers_a_request_waiting_on_a_stalled_hub_and_exits_within_the_grace(
    tmp_path: Path, tiny_models: TinyModels, as_pid_1: bool, stall_on: str, what: str
) -> None:
    """A request waiting on a Hub that never answers gets its 503 at SIGTERM, and serve exits in the grace.

    The stall lasts until the fake Hub stops, and the fetch deadline and ``huggingface_hub``'s own
    timeouts are 120 s: only the shutdown can end the wait within the test's bound. The second case
    stalls the weights file, which ``huggingface_hub`` reads on a worker thread of its own that Python
    would join at exit, in a process where SIGTERM does not kill (a container's PID 1). The third stalls
    a base model's weights, which are fetched with no deadline (they can be many GB).
    """
    grace = 2.0
    repo = HUB_REPO if what == "adapter" else HUB_BASE
    with HubServer() as hub:
        hub.add_repo(repo, tiny_models.adapter if what == "adapter" else tiny_models.base)
        weights = "adapter_model.safetensors" if what == "adapter" else "model.safetensors"
        files = [weights] if stall_on == "get" else []
        hub.fail(repo, "stall", on=stall_on, files=files, stall_s=None)
        port = free_port()
        config = tmp_path / "serve.toml"
        config.write_text(
            f"[server]\nport = {port}\nshutdown_grace = {grace}\n[hub]\nfetch_timeout = 120\n"
            f'[models.tiny]\nsource = "{tiny_models.base}"\naliases = ["test-org/tiny-base"]\n'
            'dtype = "float32"\n'
            f'[models.hubbase]\nsource = "{HUB_BASE}"\ndtype = "float32"\n'
        )
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "120",
            "HF_HUB_DOWNLOAD_TIMEOUT": "120",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        log = tmp_path / "serve.log"
        process = start_serve(config, port, log, env=env, as_pid_1=as_pid_1)
        try:
            answers: list[httpx.Response | httpx.HTTPError] = []

            def ask() -> None:
                try:
                    answers.append(
                        httpx.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={
                                "model": f"tiny+{HUB_REPO}" if what == "adapter" else "hubbase",
                                "messages": [{"role": "user", "content": "hi"}],
                            },
                            timeout=120,
                        )
                    )
                except httpx.HTTPError as exc:  # the server went away without answering
                    answers.append(exc)

            client = threading.Thread(target=ask, daemon=True)
            client.start()
            wait_for(lambda: hub.stalled(repo) > 0, process, log, "the fetch did not reach the Hub")
            process.send_signal(signal.SIGTERM)
            try:  # the grace plus a margin: far less than the 120 s the stall and the timeouts would take
                code = process.wait(timeout=grace + 3)
            except subprocess.TimeoutExpired:
                pytest.fail(f"serve still running {grace + 3}s after SIGTERM\n{log.read_text()}")
            client.join(timeout=30)
            assert answers, "the client is still waiting"
            refused = answers[0]
            assert isinstance(refused, httpx.Response), f"{refused!r}\n{log.read_text()}"
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "fetch_cancelled" and refused.headers["retry-after"]
            assert code == (0 if as_pid_1 else -signal.SIGTERM), log.read_text()
            assert hub.stalled(repo) > 0  # the Hub never answered: the shutdown ended the wait
        finally:
            stop(process)
