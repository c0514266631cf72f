"""The built-in demo through a real server and the openai SDK: English base, Chinese adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from engines.demo.models import DEMO_QUESTIONS
from gateway.cli import with_demo
from gateway.settings import Settings
from tests.conftest import RunningServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "世界上最大的动物是什么？"


@pytest.fixture(scope="module")
def demo_server(start_server: Any, demo_dir: Path) -> RunningServer:
    settings = with_demo(Settings(), demo_dir)
    server: RunningServer = start_server(settings)
    return server


def ask(server: RunningServer, model: str, question: str, *, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": question}]
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert all("\ufffd" not in delta for delta in deltas), deltas
    assert sum(1 for d in deltas if d) > 1  # really streamed, piece by piece
    return "".join(deltas)


def test_demo_models_are_listed(demo_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=demo_server.v1, api_key="unused", max_retries=0)
    assert {"demo", "demo+demo-zh", "demo-zh"} <= {m.id for m in client.models.list().data}


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_inside_a_character_ends_at_the_last_whole_one(
    demo_server: RunningServer, stream: bool
) -> None:
    # Chinese is one token per UTF-8 byte here, three per character: 7 tokens are two characters and a third.
    client = openai.OpenAI(base_url=demo_server.v1, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    if stream:
        chunks = client.chat.completions.create(
            model="demo-zh",
            messages=messages,
            temperature=0,
            max_tokens=7,
            stream=True,  # type: ignore[arg-type]
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        reply = client.chat.completions.create(
            model="demo-zh", messages=messages, temperature=0, max_tokens=7
        )  # type: ignore[arg-type]
        assert reply.choices[0].finish_reason == "length"
        text = reply.choices[0].message.content or ""
    assert text == DEMO_QUESTIONS[QUESTION][1][:2]


def test_base_answers_in_english_and_adapter_in_chinese(demo_server: RunningServer) -> None:
    english, chinese = DEMO_QUESTIONS[QUESTION]
    assert ask(demo_server, "demo", QUESTION) == english
    assert ask(demo_server, "demo+demo-zh", QUESTION) == chinese


def test_streamed_chinese_never_contains_replacement_characters(demo_server: RunningServer) -> None:
    _english, chinese = DEMO_QUESTIONS[QUESTION]
    assert ask(demo_server, "demo+demo-zh", QUESTION, stream=True) == chinese
    assert (
        ask(demo_server, "demo-zh", "What is the capital of France?", stream=True)
        == DEMO_QUESTIONS["What is the capital of France?"][1]
    )


def test_demo_is_greedy_by_default_from_its_generation_config(demo_server: RunningServer) -> None:
    import httpx

    body = {"model": "demo+demo-zh", "messages": [{"role": "user", "content": QUESTION}]}  # no temperature
    answers = {
        httpx.post(f"{demo_server.v1}/chat/completions", json=body, timeout=60).json()["choices"][0][
            "message"
        ]["content"]
        for _ in range(8)
    }
    assert answers == {DEMO_QUESTIONS[QUESTION][1]}
    sampled = {
        httpx.post(
            f"{demo_server.v1}/chat/completions", json={**body, "temperature": 2.0, "seed": s}, timeout=60
        ).json()["choices"][0]["message"]["content"]
        for s in range(4)
    }
    assert len(sampled) > 1  # an explicit temperature still wins
