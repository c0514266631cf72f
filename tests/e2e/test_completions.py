"""Legacy text completions through the real server and SDK."""

from __future__ import annotations

import json
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
        model="tiny", prompt=["one", "two"], n=2, max_tokens=3, temperature=1, seed=5, echo=True
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    # Prompt-major: index i answers prompt i // n (echo shows which prompt each choice continues).
    assert [c.text[:3] for c in reply.choices] == ["one", "one", "two", "two"]


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


MULTIBYTE = "héllo 巴黎"  # é is 2 bytes, 巴 and 黎 3 each: byte tokens of the tiny model
SPECIAL = "<|im_end|>"  # the tiny model's EOS: under ignore_eos it is generated but not in the text


def legacy(server: RunningServer, **body: Any) -> dict[str, Any]:
    payload = {"model": "tiny", "prompt": MULTIBYTE, "logprobs": 1, **body}
    response = httpx.post(f"{server.v1}/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json()["choices"][0])


def token_raw(token: str) -> bytes:
    """A legacy token's bytes: ``bytes:\\xNN...`` for part of a character, else its text."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token[len("bytes:") :].replace("\\x", ""))
    return token.encode("utf-8")


def assert_offsets_follow_the_text(choice: dict[str, Any]) -> None:
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert len(offsets) == len(tokens)
    assert offsets == sorted(offsets) and all(0 <= offset <= len(text) for offset in offsets)
    for token, offset in zip(tokens, offsets, strict=True):
        # A token at the very end is past the text: cut off by a stop string, or a never-finished character.
        if not token.startswith("bytes:") and token != SPECIAL and offset < len(text):
            assert text[offset : offset + len(token)] == token, (token, offset)
    shown = b"".join(token_raw(token) for token in tokens if token != SPECIAL).decode("utf-8", "replace")
    assert shown.startswith(text)


def test_echoed_multibyte_prompt_offsets_are_character_positions(tiny_server: RunningServer) -> None:
    choice = legacy(tiny_server, echo=True, max_tokens=0)
    logprobs = choice["logprobs"]
    assert choice["text"] == MULTIBYTE
    # h é(2 bytes) l l o ' ' 巴(3) 黎(3): a byte inside a character starts where its character does.
    assert logprobs["text_offset"] == [0, 1, 1, 2, 3, 4, 5, 6, 6, 6, 7, 7, 7]
    assert logprobs["tokens"][:3] == ["h", "bytes:\\xc3", "bytes:\\xa9"]
    assert logprobs["tokens"][7:10] == ["bytes:\\xe5", "bytes:\\xb7", "bytes:\\xb4"]
    assert "\ufffd" not in "".join(logprobs["tokens"])
    assert_offsets_follow_the_text(choice)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_echo_offsets_run_on_from_the_prompt_through_the_completion(
    tiny_server: RunningServer, seed: int
) -> None:
    choice = legacy(tiny_server, echo=True, max_tokens=24, temperature=1, seed=seed, ignore_eos=True)
    assert choice["text"].startswith(MULTIBYTE)
    assert choice["logprobs"]["text_offset"][13] == len(MULTIBYTE)  # the first generated token
    assert_offsets_follow_the_text(choice)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_offsets_without_echo_follow_the_completion_text(tiny_server: RunningServer, seed: int) -> None:
    choice = legacy(tiny_server, max_tokens=24, temperature=1, seed=seed, ignore_eos=True)
    assert choice["logprobs"]["text_offset"][0] == 0
    assert_offsets_follow_the_text(choice)


def test_partial_character_alternatives_are_told_apart_by_their_bytes(tiny_server: RunningServer) -> None:
    choice = legacy(tiny_server, echo=True, max_tokens=0, logprobs=5)
    keys = [key for top in choice["logprobs"]["top_logprobs"][1:] for key in top]
    assert keys and all("\ufffd" not in key for key in keys)
    assert all(len(top) == 5 for top in choice["logprobs"]["top_logprobs"][1:])


def stream_legacy(server: RunningServer, **body: Any) -> dict[str, Any]:
    """The streamed choice put together: its text, tokens and offsets."""
    payload = {"model": "tiny", "prompt": MULTIBYTE, "logprobs": 1, **body, "stream": True}
    text, tokens, offsets = "", [], []
    with httpx.stream("POST", f"{server.v1}/completions", json=payload, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[len("data: ") :])["choices"]:
                    text += choice["text"]
                    if choice["logprobs"]:
                        tokens += choice["logprobs"]["tokens"]
                        offsets += choice["logprobs"]["text_offset"]
    return {"text": text, "logprobs": {"tokens": tokens, "text_offset": offsets}}


@pytest.mark.parametrize("echo", [True, False])
def test_streamed_offsets_follow_the_text_as_the_whole_ones_do(
    tiny_server: RunningServer, echo: bool
) -> None:
    body = {"echo": echo, "max_tokens": 16, "temperature": 1, "seed": 4, "ignore_eos": True}
    whole, streamed = legacy(tiny_server, **body), stream_legacy(tiny_server, **body)
    assert streamed["text"] == whole["text"]
    assert streamed["logprobs"]["tokens"] == whole["logprobs"]["tokens"]
    assert streamed["logprobs"]["text_offset"] == whole["logprobs"]["text_offset"]
    assert_offsets_follow_the_text(streamed)


def test_offsets_stay_within_a_text_cut_by_a_stop_string(tiny_server: RunningServer) -> None:
    body = {"echo": True, "max_tokens": 24, "temperature": 1, "seed": 1, "ignore_eos": True}
    generated = legacy(tiny_server, **body)["text"][len(MULTIBYTE) :]
    stop = next(char for char in generated[4:] if char.isascii() and char.isalnum())
    for choice in (legacy(tiny_server, **body, stop=stop), stream_legacy(tiny_server, **body, stop=stop)):
        assert choice["text"] == MULTIBYTE + generated[: generated.index(stop)]
        assert_offsets_follow_the_text(choice)
