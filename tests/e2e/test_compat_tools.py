"""Real third-party clients against the real server: LangChain's ``ChatOpenAI`` and LiteLLM.

Both are imported lazily, under a guard that refuses every connection that is not to the loopback
interface, so that a library that phones home (LiteLLM's model-cost map, LangSmith tracing) fails the test
instead of silently reaching the internet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RunningServer

pytestmark = [
    pytest.mark.e2e,
    # LiteLLM's own TypedDicts make pydantic warn about ReadOnly items at import: not ours to fix.
    pytest.mark.filterwarnings("ignore:Items? .*ReadOnly:UserWarning"),
]

# Set before either library is imported: no cost-map download, no telemetry, no LangSmith tracing.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_TELEMETRY": "False",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
}

QUESTION = "Hello, who are you?"


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class InternetAccess(AssertionError):
    pass


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every non-loopback ``connect`` or name lookup fails the test (and is recorded)."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            attempts.append(address)
            raise InternetAccess(f"a client tried to reach {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host):
            attempts.append(host)
            raise InternetAccess(f"a client tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == [], f"tried to reach the internet: {attempts}"


@pytest.fixture
def litellm(loopback_only: list[Any]) -> Any:
    module = pytest.importorskip("litellm")
    module.telemetry = False  # older releases phone home unless told not to
    module.drop_params = False  # send what we ask for, so that a refused field shows up as an error
    return module


@pytest.fixture
def chat_openai(loopback_only: list[Any]) -> Any:
    return pytest.importorskip("langchain_openai").ChatOpenAI


def test_litellm_import_reads_the_bundled_cost_map(litellm: Any) -> None:
    from litellm.litellm_core_utils.get_model_cost_map import get_model_cost_map_source_info

    assert litellm.model_cost, "the bundled model-cost map was not loaded"
    # Where litellm says its map came from: the bundled file, by choice, not a failed download's fallback.
    source = get_model_cost_map_source_info()
    assert source["source"] == "local" and source["url"] is None, source
    assert source["is_env_forced"] is True and source["fallback_reason"] is None, source


# ---------------------------------------------------------------------------------------------- LangChain


def test_langchain_invoke(tiny_server: RunningServer, chat_openai: Any) -> None:
    llm = chat_openai(
        base_url=tiny_server.v1, api_key="unused", model="tiny+tiny-lora", temperature=0, max_tokens=8
    )
    message = llm.invoke(QUESTION)
    assert isinstance(message.content, str)
    assert message.response_metadata["finish_reason"] in {"stop", "length"}
    assert message.response_metadata["model_name"] == "tiny+tiny-lora"
    usage = message.usage_metadata
    assert usage is not None and usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 8
    # The same request again is the same greedy answer.
    assert llm.invoke(QUESTION).content == message.content


def test_langchain_invoke_with_history_and_stop(tiny_server: RunningServer, chat_openai: Any) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    llm = chat_openai(base_url=tiny_server.v1, api_key="unused", model="tiny", temperature=0, max_tokens=6)
    history = [
        SystemMessage("You are terse."),
        HumanMessage("Hi"),
        AIMessage("Hello."),
        HumanMessage(QUESTION),
    ]
    message = llm.invoke(history, stop=["\n"])
    assert isinstance(message.content, str) and "\n" not in message.content


def test_langchain_stream_equals_invoke(tiny_server: RunningServer, chat_openai: Any) -> None:
    llm = chat_openai(
        base_url=tiny_server.v1,
        api_key="unused",
        model="tiny+tiny-lora",
        temperature=0,
        max_tokens=8,
        stream_usage=True,
    )
    whole = llm.invoke(QUESTION)
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) > 1
    assert "".join(str(c.content) for c in chunks) == whole.content
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.content == whole.content
    assert merged.usage_metadata is not None
    assert merged.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]
    assert merged.response_metadata.get("finish_reason") == whole.response_metadata["finish_reason"]


def test_langchain_async_stream(tiny_server: RunningServer, chat_openai: Any) -> None:
    llm = chat_openai(base_url=tiny_server.v1, api_key="unused", model="tiny", temperature=0, max_tokens=5)

    async def scenario() -> tuple[Any, list[str]]:
        whole = await llm.ainvoke(QUESTION)
        return whole, [str(chunk.content) async for chunk in llm.astream(QUESTION)]

    whole, parts = asyncio.run(scenario())
    assert "".join(parts) == whole.content


# ------------------------------------------------------------------------------------------------ LiteLLM


def _litellm_kwargs(server: RunningServer, **extra: Any) -> dict[str, Any]:
    return {
        "model": "openai/tiny",
        "api_base": server.v1,
        "api_key": "unused",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        "num_retries": 0,
        **extra,
    }


def test_litellm_completion(tiny_server: RunningServer, litellm: Any) -> None:
    reply = litellm.completion(**_litellm_kwargs(tiny_server))
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8


def test_litellm_streaming_equals_whole(tiny_server: RunningServer, litellm: Any) -> None:
    whole = litellm.completion(**_litellm_kwargs(tiny_server))
    chunks = list(
        litellm.completion(
            **_litellm_kwargs(tiny_server, stream=True, stream_options={"include_usage": True})
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes[-1] == whole.choices[0].finish_reason
    rebuilt = litellm.stream_chunk_builder(chunks)
    assert rebuilt.choices[0].message.content == whole.choices[0].message.content


def test_litellm_adapter_model_and_sampling_params(tiny_server: RunningServer, litellm: Any) -> None:
    base = litellm.completion(**_litellm_kwargs(tiny_server, max_tokens=12))
    merged = litellm.completion(**_litellm_kwargs(tiny_server, model="openai/tiny+tiny-lora", max_tokens=12))
    assert base.choices[0].message.content != merged.choices[0].message.content
    seeded = _litellm_kwargs(tiny_server, temperature=1.0, top_p=0.9, seed=7, stop=["\n"], user="me")
    first = litellm.completion(**seeded)
    assert litellm.completion(**seeded).choices[0].message.content == first.choices[0].message.content


def test_litellm_async_streaming(tiny_server: RunningServer, litellm: Any) -> None:
    async def scenario() -> tuple[Any, str]:
        whole = await litellm.acompletion(**_litellm_kwargs(tiny_server))
        stream = await litellm.acompletion(**_litellm_kwargs(tiny_server, stream=True))
        return whole, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    whole, text = asyncio.run(scenario())
    assert text == whole.choices[0].message.content


def test_litellm_text_completion(tiny_server: RunningServer, litellm: Any) -> None:
    reply = litellm.text_completion(
        model="openai/tiny",
        api_base=tiny_server.v1,
        api_key="unused",
        prompt="Once upon",
        max_tokens=5,
        temperature=0,
    )
    assert isinstance(reply.choices[0].text, str)
    assert reply.choices[0].finish_reason in {"stop", "length"}


def test_litellm_error_is_mapped(tiny_server: RunningServer, litellm: Any) -> None:
    with pytest.raises(litellm.exceptions.NotFoundError):
        litellm.completion(**_litellm_kwargs(tiny_server, model="openai/no-such-model"))
    with pytest.raises(litellm.exceptions.BadRequestError):
        litellm.completion(**_litellm_kwargs(tiny_server, temperature=5))
