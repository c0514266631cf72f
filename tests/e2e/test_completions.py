"""Legacy text completions through the real server and SDK."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def test_text_completion_returns_text_and_usage(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, temperature=0
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage is not None and reply.usage.completion_tokens <= 6


def test_streamed_completion_equals_whole(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    whole = api.completions.create(model="tiny+tiny-lora", prompt="abc", max_tokens=8, temperature=0)
    parts = api.completions.create(
        model="tiny+tiny-lora", prompt="abc", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_echo_prepends_prompt(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).completions.create(
        model="tiny", prompt="Echo me", max_tokens=3, temperature=0, echo=True
    )
    assert reply.choices[0].text.startswith("Echo me")


def test_prompt_list_and_n_give_prompt_major_indexes(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).completions.create(
        model="tiny", prompt=["one", "two"], n=2, max_tokens=3, temperature=1, seed=5
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]


def test_token_id_prompt_is_accepted_and_out_of_vocab_refused(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    reply = api.completions.create(model="tiny", prompt=[65, 66, 67], max_tokens=2, temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="tiny", prompt=[10**7], max_tokens=2)


def test_legacy_logprobs_shape(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).completions.create(
        model="tiny", prompt="x", max_tokens=4, logprobs=2, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_suffix_is_refused(tiny_server: RunningServer) -> None:
    response = httpx.post(
        f"{tiny_server.v1}/completions", json={"model": "tiny", "prompt": "a", "suffix": "b"}, timeout=30
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "suffix"


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).completions.create(
        model="tiny", prompt="Echo me", max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith("Echo me") and logprobs is not None
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    prompt_tokens = reply.usage.prompt_tokens if reply.usage else 0
    assert len(logprobs.token_logprobs) == prompt_tokens + reply.usage.completion_tokens  # type: ignore[union-attr]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens[:prompt_tokens]) == "Echo me"  # type: ignore[index]
    assert logprobs.text_offset is not None and logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]  # type: ignore[index]


def test_max_tokens_zero_with_echo_returns_only_the_scored_prompt(tiny_server: RunningServer) -> None:
    reply = client(tiny_server).completions.create(
        model="tiny+tiny-lora", prompt=[[65, 66, 67, 68], [70, 71]], max_tokens=0, echo=True, logprobs=2
    )
    assert [c.finish_reason for c in reply.choices] == ["length", "length"]
    assert reply.usage is not None and reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == 6
    lengths = [len(c.logprobs.token_logprobs or []) for c in reply.choices if c.logprobs]
    assert lengths == [4, 2]
    assert all(
        len(top) <= 2 for c in reply.choices if c.logprobs for top in (c.logprobs.top_logprobs or [])[1:]
    )


def test_scored_echo_streams_the_same_as_whole(tiny_server: RunningServer) -> None:
    api = client(tiny_server)
    args: dict[str, Any] = {"model": "tiny", "prompt": "abcdef", "max_tokens": 4, "temperature": 0}
    whole = api.completions.create(**args, echo=True, logprobs=1).choices[0]
    chunks = list(api.completions.create(**args, echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    streamed = [
        lp
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.token_logprobs or []
    ]
    assert whole.logprobs is not None and streamed == whole.logprobs.token_logprobs
