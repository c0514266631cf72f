"""The Responses API on the trained demo models, whose answers end by themselves (``completed``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from engines.demo.content import DEMO_QUESTIONS
from gateway.cli import with_demo
from gateway.settings import Settings
from tests.conftest import RunningServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def demo_client(start_server: Any, demo_dir: Path) -> openai.OpenAI:
    server: RunningServer = start_server(with_demo(Settings(), demo_dir))
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.mark.parametrize(("model", "language"), [("demo", 0), ("demo+demo-zh", 1)])
def test_create_answers_like_chat_and_completes(
    demo_client: openai.OpenAI, model: str, language: int
) -> None:
    response = demo_client.responses.create(model=model, input=QUESTION, temperature=0)
    assert response.status == "completed" and response.completed_at is not None
    assert response.output_text == DEMO_QUESTIONS[QUESTION][language]


def test_sdk_stream_helper_accumulates_the_final_response(demo_client: openai.OpenAI) -> None:
    with demo_client.responses.stream(model="demo+demo-zh", input=QUESTION, temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == DEMO_QUESTIONS[QUESTION][1]
    assert final.status == "completed" and final.output_text == DEMO_QUESTIONS[QUESTION][1]
    assert final.usage is not None and final.usage.output_tokens > 0
