"""One hostile request cannot freeze the server, and a full engine answers 503 before any stream starts."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import EngineSettings, ModelSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, tiny_settings

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]
#: A context the busy stream of ``full_server`` never reaches (ignore_eos up to it would take minutes).
LONG_CONTEXT = 16384
RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    hostile = tmp_path_factory.mktemp("hostile") / "base"
    shutil.copytree(tiny_models.base, hostile)
    (hostile / "chat_template.jinja").write_text(RUNAWAY)
    settings = tiny_settings(tiny_models)
    models = {
        "tiny": settings.models["tiny"],
        "hostile": ModelSettings(source=str(hostile), dtype="float32", context_length=256),
    }
    server_settings = settings.server.model_copy(
        update={"prompt_timeout": 1.0, "max_messages": 50, "max_prompt_chars": 2_000_000}
    )
    result: RunningServer = start_server(
        settings.model_copy(update={"models": models, "server": server_settings})
    )
    return result


def health_latencies(
    server: RunningServer, busy: threading.Thread, answered: threading.Event | None = None
) -> list[tuple[float, float]]:
    """``(answered at, latency)`` of /health, polled while ``busy`` runs; sets ``answered`` on the first."""
    latencies = []
    while busy.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        latencies.append((time.monotonic(), time.monotonic() - started))
        if answered is not None:
            answered.set()
        time.sleep(0.05)
    return latencies


class Watched:
    """A blocking prompt step of the engine (``engines.engine.<name>``, run as ``step(tokenizer, subject,
    ...)``) watched for the calls ``wanted(tokenizer, subject)`` picks: when one started and ended, and,
    with ``gate``, held at its start until the test opens the gate."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, name: str, wanted: Any, *, gate: bool = False
    ) -> None:
        import engines.engine

        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate_opened_in_time = False
        self.ended_at = float("inf")
        real = getattr(engines.engine, name)

        def watched(tokenizer: Any, subject: Any, *args: Any, **kwargs: Any) -> Any:
            if not wanted(tokenizer, subject):
                return real(tokenizer, subject, *args, **kwargs)
            self.started.set()
            try:
                if gate:  # on the event loop this wait would stall it: nothing could open the gate
                    self.gate_opened_in_time = self.gate.wait(10)
                return real(tokenizer, subject, *args, **kwargs)
            finally:
                self.ended_at = time.monotonic()

        monkeypatch.setattr(engines.engine, name, watched)

    def wait_started(self, busy: threading.Thread) -> None:
        deadline = time.monotonic() + 60
        while not self.started.wait(0.01):
            assert busy.is_alive() and time.monotonic() < deadline, "the watched step never ran"


def in_background(work: Any) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(response=work()))
    thread.start()
    return thread, result


def test_a_runaway_chat_template_gets_400_while_health_answers(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = httpx.post(f"{server.v1}/load_model", json={"model": "hostile"}, headers=ADMIN, timeout=60)
    assert loaded.status_code == 200, loaded.text
    render = Watched(monkeypatch, "render_chat", lambda tokenizer, _: tokenizer.chat_template == RUNAWAY)
    thread, result = in_background(
        lambda: httpx.post(
            f"{server.v1}/chat/completions",
            json={"model": "hostile", "messages": HELLO, "max_tokens": 2},
            timeout=60,
        )
    )
    render.wait_started(thread)
    latencies = health_latencies(server, thread)
    response = result["response"]
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "chat_template_limit"
    # /health answered while the render was still running: impossible if it ran on the event loop.
    assert latencies and latencies[0][0] < render.ended_at, (latencies[:3], render.ended_at)
    assert max(latency for _at, latency in latencies) < 1.0, latencies
    ok = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


def test_a_huge_completions_prompt_is_tokenized_off_the_event_loop(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "hello world, this is a long prompt. " * 30_000  # about 1 MB
    # The tokenization waits at its start until /health has answered: by construction it is still
    # running when /health answers, and on the event loop it would never let /health answer at all.
    tokenize = Watched(monkeypatch, "encode_text", lambda _, text: text == prompt, gate=True)
    thread, result = in_background(
        lambda: httpx.post(
            f"{server.v1}/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=120
        )
    )
    tokenize.wait_started(thread)
    latencies = health_latencies(server, thread, answered=tokenize.gate)
    assert tokenize.gate_opened_in_time and latencies[0][0] < tokenize.ended_at
    response = result["response"]
    assert response.status_code == 400, response.text  # longer than the context: refused after tokenizing
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert max(latency for _at, latency in latencies) < 1.5, latencies


def test_too_many_messages_and_too_long_prompts_are_400(server: RunningServer) -> None:
    many = httpx.post(
        f"{server.v1}/chat/completions", json={"model": "tiny", "messages": HELLO * 51}, timeout=30
    )
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_messages"
    assert many.json()["error"]["param"] == "messages"
    # Over max_prompt_chars (2,000,000 here) in all, though each prompt alone is under it; the body is
    # under max_body_bytes, so the size check, not the body limit, answers.
    long = httpx.post(
        f"{server.v1}/completions",
        json={"model": "tiny", "prompt": ["x" * 1_500_000, "y" * 600_000]},
        timeout=30,
    )
    assert long.status_code == 400, long.text
    assert long.json()["error"]["code"] == "prompt_too_large" and long.json()["error"]["param"] == "prompt"
    long_chat = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "z" * 2_100_000}]},
        timeout=30,
    )
    assert long_chat.status_code == 400, long_chat.text
    assert long_chat.json()["error"]["code"] == "prompt_too_large"
    assert long_chat.json()["error"]["param"] == "messages"


#: ``[server] max_prompt_chars`` of ``small_server``: far under the tiny model's 256-token context.
SMALL_PROMPT_CHARS = 40


@pytest.fixture(scope="module")
def small_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    settings = tiny_settings(tiny_models)
    limited = settings.server.model_copy(update={"max_prompt_chars": SMALL_PROMPT_CHARS})
    result: RunningServer = start_server(settings.model_copy(update={"server": limited}))
    return result


def test_a_prompt_over_max_prompt_chars_but_within_the_context_is_400_prompt_too_large(
    small_server: RunningServer,
) -> None:
    def complete(prompt: Any) -> httpx.Response:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1}
        return httpx.post(f"{small_server.v1}/completions", json=body, timeout=30)

    def chat(*contents: str) -> httpx.Response:
        messages = [{"role": "user", "content": content} for content in contents]
        body = {"model": "tiny", "messages": messages, "max_tokens": 1}
        return httpx.post(f"{small_server.v1}/chat/completions", json=body, timeout=30)

    at_limit = "a" * SMALL_PROMPT_CHARS
    # At the limit: served (the context, 256 tokens, would take far more).
    assert complete(at_limit).status_code == 200
    assert chat(at_limit[:20], at_limit[20:]).status_code == 200
    for refused, param in (
        (complete(at_limit + "a"), "prompt"),
        (complete([at_limit[:30], at_limit[:11]]), "prompt"),  # counted over all the prompts
        (complete(list(range(1, SMALL_PROMPT_CHARS + 2))), "prompt"),  # token ids count one each
        (chat(at_limit[:30], at_limit[:11]), "messages"),  # counted over all the messages
    ):
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("prompt_too_large", param), error
        assert f"at most {SMALL_PROMPT_CHARS}" in error["message"]


@pytest.fixture(scope="module")
def full_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    """One row at a time and no queue, on a context long enough for a stream that outlasts the test."""
    settings = tiny_settings(tiny_models)
    tiny = settings.models["tiny"].model_copy(update={"context_length": LONG_CONTEXT})
    result: RunningServer = start_server(
        settings.model_copy(
            update={"models": {"tiny": tiny}, "engine": EngineSettings(max_batch=1, max_waiting=0)}
        )
    )
    return result


def test_a_stream_at_capacity_gets_503_with_retry_after_before_any_chunk(full_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=full_server.v1, api_key="x", max_retries=0)
    busy = api.chat.completions.create(
        model="tiny",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=LONG_CONTEXT - 64,  # it runs until closed below
        stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        next(iter(busy))  # admitted and running
        with httpx.stream(
            "POST",
            f"{full_server.v1}/chat/completions",
            json={"model": "tiny", "messages": HELLO, "max_tokens": 2, "stream": True},
            timeout=30,
        ) as refused:
            refused.read()
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "overloaded"
        with pytest.raises(openai.APIStatusError) as raised:
            api.completions.create(model="tiny", prompt="Hi", max_tokens=2, stream=True)
        assert raised.value.status_code == 503
        engine = full_server.app.state.engine  # type: ignore[attr-defined]
        assert engine.scheduler.active_count == 1  # the busy stream was running all along
    finally:
        busy.close()
