"""Each sampling parameter changes the output the way OpenAI documents it, through the real server.

The tiny test model has a byte-level vocabulary (one token per byte), so a token id is found from its
byte, and the ``bytes`` of the logprobs say exactly which tokens were generated.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from typing import Any

import httpx
import openai
import pytest

from engines.prompts import bytes_to_unicode
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import tiny_settings

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def chat(server: RunningServer, **body: Any) -> dict[str, Any]:
    payload = {"model": "tiny", "messages": HELLO, "temperature": 0, **body}
    response = httpx.post(f"{server.v1}/chat/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def complete(server: RunningServer, **body: Any) -> dict[str, Any]:
    payload = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, **body}
    response = httpx.post(f"{server.v1}/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def text(reply: dict[str, Any], index: int = 0) -> str:
    choice = reply["choices"][index]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def stream_chat(server: RunningServer, **body: Any) -> list[dict[str, Any]]:
    payload = {"model": "tiny", "messages": HELLO, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200, response.read().decode()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def token_bytes(reply: dict[str, Any], index: int = 0) -> list[bytes]:
    """The generated tokens, as bytes, from a chat reply made with ``logprobs: true``."""
    return [bytes(entry["bytes"]) for entry in reply["choices"][index]["logprobs"]["content"]]


@cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def token_id(tiny_models: TinyModels) -> Any:
    """``token_id(b"A")``: the id of a one-byte token of the tiny model."""
    tokenizer = _tokenizer(str(tiny_models.base))
    alphabet = bytes_to_unicode()

    def lookup(raw: bytes) -> int:
        assert len(raw) == 1, raw
        return int(tokenizer.convert_tokens_to_ids(alphabet[raw[0]]))

    return lookup


@pytest.fixture(scope="module")
def eos_id(tiny_models: TinyModels) -> int:
    return int(_tokenizer(str(tiny_models.base)).eos_token_id)


def _ascii_stop(reference: str, start: int = 2) -> str:
    """A two-character ASCII stop string that occurs in ``reference`` at or after ``start``."""
    for i in range(start, len(reference) - 1):
        candidate = reference[i : i + 2]
        if candidate.isascii() and candidate.isprintable():
            return candidate
    pytest.fail(f"no ASCII pair to stop at in {reference!r}")


# -------------------------------------------------------------------------------------------------- stop


def test_stop_trims_where_the_stop_string_would_have_appeared(tiny_server: RunningServer) -> None:
    free = text(chat(tiny_server, max_tokens=24))
    stop = _ascii_stop(free)
    expected = free[: free.index(stop)]
    stopped = chat(tiny_server, max_tokens=24, stop=stop)
    assert text(stopped) == expected
    assert stop not in text(stopped)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # A list of stops: the earliest one in the text wins; one that never occurs changes nothing.
    other = _ascii_stop(free, free.index(stop) + 2)
    listed = chat(tiny_server, max_tokens=24, stop=[other, "never-appears", stop])
    assert text(listed) == expected
    assert text(chat(tiny_server, max_tokens=24, stop="never-appears")) == free


def test_stop_trims_streamed_output_too(tiny_server: RunningServer) -> None:
    free = text(chat(tiny_server, max_tokens=24))
    stop = _ascii_stop(free)
    chunks = stream_chat(tiny_server, max_tokens=24, stop=[stop])
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(pieces) == free[: free.index(stop)]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]


def test_stop_on_text_completions(tiny_server: RunningServer) -> None:
    free = text(complete(tiny_server, max_tokens=24))
    stop = _ascii_stop(free)
    stopped = complete(tiny_server, max_tokens=24, stop=stop)
    assert text(stopped) == free[: free.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


# -------------------------------------------------------------------------------------------- logit_bias


def test_logit_bias_plus_100_forces_the_token(tiny_server: RunningServer, token_id: Any) -> None:
    forced = chat(tiny_server, max_tokens=6, logit_bias={str(token_id(b"A")): 100})
    assert text(forced) == "AAAAAA"
    sampled = chat(tiny_server, max_tokens=6, temperature=1.0, seed=3, logit_bias={str(token_id(b"Z")): 100})
    assert text(sampled) == "ZZZZZZ"
    assert text(complete(tiny_server, max_tokens=4, logit_bias={str(token_id(b"q")): 100})) == "qqqq"


def test_logit_bias_minus_100_bans_the_greedy_choice(tiny_server: RunningServer, token_id: Any) -> None:
    greedy = chat(tiny_server, max_tokens=12, logprobs=True, top_logprobs=2)
    first = greedy["choices"][0]["logprobs"]["content"][0]
    banned = bytes(first["bytes"])
    runner_up = bytes(first["top_logprobs"][1]["bytes"])
    biased = chat(
        tiny_server, max_tokens=12, logprobs=True, top_logprobs=2, logit_bias={str(token_id(banned)): -100}
    )
    tokens = token_bytes(biased)
    assert tokens[0] == runner_up, "greedy should fall back to the second most likely token"
    assert banned not in tokens
    assert banned in token_bytes(greedy)


@pytest.fixture(scope="module")
def expendable_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    """A server of its own for a test that may leave its engine broken."""
    server: RunningServer = start_server(tiny_settings(tiny_models))
    return server


def test_logit_bias_outside_the_vocabulary_is_400(expendable_server: RunningServer) -> None:
    for key in ("100000", "-1"):
        response = httpx.post(
            f"{expendable_server.v1}/chat/completions",
            json={"model": "tiny", "messages": HELLO, "max_tokens": 2, "logit_bias": {key: 5}},
            timeout=10,
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
    ok = httpx.post(
        f"{expendable_server.v1}/chat/completions",
        json={"model": "tiny", "messages": HELLO, "max_tokens": 2},
        timeout=10,
    )
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------------ penalty


def _repeats(tokens: list[bytes]) -> int:
    return len(tokens) - len(set(tokens))


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_make_greedy_output_repeat_less(tiny_server: RunningServer, penalty: str) -> None:
    greedy = chat(tiny_server, max_tokens=40, logprobs=True)
    penalised = chat(tiny_server, max_tokens=40, logprobs=True, **{penalty: 2.0})
    plain, fewer = token_bytes(greedy), token_bytes(penalised)
    assert fewer != plain
    assert _repeats(fewer) < _repeats(plain)
    assert max(Counter(fewer).values()) < max(Counter(plain).values())
    # The first token has nothing to repeat yet, so it is the same.
    assert fewer[0] == plain[0]
    # A negative penalty rewards repeating instead.
    rewarded = token_bytes(chat(tiny_server, max_tokens=40, logprobs=True, **{penalty: -2.0}))
    assert _repeats(rewarded) > _repeats(plain)


def test_frequency_penalty_grows_with_the_count_and_presence_does_not(tiny_server: RunningServer) -> None:
    # Presence subtracts once per seen token, frequency once per occurrence: after a token has been
    # generated twice they diverge, so 40 greedy tokens cannot come out the same.
    presence = token_bytes(chat(tiny_server, max_tokens=40, logprobs=True, presence_penalty=0.5))
    frequency = token_bytes(chat(tiny_server, max_tokens=40, logprobs=True, frequency_penalty=0.5))
    assert presence != frequency


# --------------------------------------------------------------------------------------------------- seed


def test_same_seed_same_output_and_different_seeds_differ(tiny_server: RunningServer) -> None:
    def sample(seed: int) -> str:
        return text(chat(tiny_server, max_tokens=16, temperature=1.0, seed=seed, logprobs=False))

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) == 3
    completion = {"max_tokens": 16, "temperature": 1.0, "seed": 5}
    assert text(complete(tiny_server, **completion)) == text(complete(tiny_server, **completion))


def test_unseeded_sampling_varies(tiny_server: RunningServer) -> None:
    outputs = {text(chat(tiny_server, max_tokens=16, temperature=1.0)) for _ in range(3)}
    assert len(outputs) > 1


# ------------------------------------------------------------------------------------------------------ n


def test_n_gives_n_distinct_choices(tiny_server: RunningServer) -> None:
    reply = chat(tiny_server, max_tokens=8, n=3, temperature=1.0, seed=21, logprobs=True)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    texts = [text(reply, i) for i in range(3)]
    assert len(set(texts)) == 3
    assert all(c["finish_reason"] in {"stop", "length"} for c in reply["choices"])
    # Usage counts the prompt once and the tokens of every choice.
    single = chat(tiny_server, max_tokens=8, temperature=1.0, seed=21)
    assert reply["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert reply["usage"]["completion_tokens"] == sum(len(token_bytes(reply, i)) for i in range(3))
    # The same seed gives the same n choices again.
    again = chat(tiny_server, max_tokens=8, n=3, temperature=1.0, seed=21, logprobs=True)
    assert [text(again, i) for i in range(3)] == texts


def test_n_streamed_gives_each_choice_its_role_and_finish_chunk(tiny_server: RunningServer) -> None:
    whole = chat(tiny_server, max_tokens=8, n=3, temperature=1.0, seed=21)
    chunks = stream_chat(
        tiny_server, max_tokens=8, n=3, temperature=1.0, seed=21, stream_options={"include_usage": True}
    )
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    by_index: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        by_index.setdefault(choice["index"], []).append(choice)
    assert sorted(by_index) == [0, 1, 2]
    for index, choices in by_index.items():
        assert choices[0]["delta"] == {"role": "assistant"}
        assert all("role" not in c["delta"] for c in choices[1:])
        finishes = [c["finish_reason"] for c in choices if c["finish_reason"]]
        assert finishes == [whole["choices"][index]["finish_reason"]]
        assert choices[-1]["finish_reason"] is not None
        assert "".join(c["delta"].get("content", "") for c in choices) == text(whole, index)


def test_n_on_text_completions(tiny_server: RunningServer) -> None:
    reply = complete(tiny_server, max_tokens=6, n=2, temperature=1.0, seed=4)
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert text(reply, 0) != text(reply, 1)


# ----------------------------------------------------------------------------------------------- logprobs


def test_logprobs_follow_openai_shape(tiny_server: RunningServer) -> None:
    api = openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)
    reply = api.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=5,  # type: ignore[arg-type]
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for entry in logprobs.content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 5
        assert entry.bytes is not None and len(entry.bytes) == 1
        # Greedy picks the most likely token: it is the top-1 alternative, with the same logprob.
        assert entry.top_logprobs[0].bytes == entry.bytes
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert len({bytes(alt.bytes or []) for alt in entry.top_logprobs}) == 5
    content = b"".join(bytes(e.bytes or []) for e in logprobs.content)
    assert content.decode("utf-8", "replace") == reply.choices[0].message.content


def test_logprobs_without_top_and_when_off(tiny_server: RunningServer) -> None:
    reply = chat(tiny_server, max_tokens=3, logprobs=True)
    assert all(e["top_logprobs"] == [] for e in reply["choices"][0]["logprobs"]["content"])
    assert chat(tiny_server, max_tokens=3)["choices"][0]["logprobs"] is None
    full = chat(tiny_server, max_tokens=3, logprobs=True, top_logprobs=20)
    assert all(len(e["top_logprobs"]) == 20 for e in full["choices"][0]["logprobs"]["content"])
    too_many = httpx.post(
        f"{tiny_server.v1}/chat/completions",
        json={"model": "tiny", "messages": HELLO, "logprobs": True, "top_logprobs": 21},
        timeout=30,
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "top_logprobs"


def test_streamed_logprobs_equal_whole(tiny_server: RunningServer) -> None:
    whole = chat(tiny_server, max_tokens=6, logprobs=True, top_logprobs=2)
    chunks = stream_chat(tiny_server, max_tokens=6, logprobs=True, top_logprobs=2)
    streamed = [
        e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == whole["choices"][0]["logprobs"]["content"]


def test_sampled_token_logprob_is_its_model_probability(tiny_server: RunningServer) -> None:
    reply = chat(tiny_server, max_tokens=8, temperature=1.0, seed=9, logprobs=True, top_logprobs=20)
    for entry in reply["choices"][0]["logprobs"]["content"]:
        assert entry["logprob"] <= 0
        alternatives = {bytes(a["bytes"]): a["logprob"] for a in entry["top_logprobs"]}
        if bytes(entry["bytes"]) in alternatives:
            assert alternatives[bytes(entry["bytes"])] == pytest.approx(entry["logprob"])
        else:
            assert entry["logprob"] <= min(alternatives.values()) + 1e-6


# --------------------------------------------------------------------------------------- token limits


def test_max_completion_tokens_is_preferred_over_max_tokens(tiny_server: RunningServer) -> None:
    assert chat(tiny_server, max_completion_tokens=3)["usage"]["completion_tokens"] == 3
    assert chat(tiny_server, max_tokens=4)["usage"]["completion_tokens"] == 4
    both = chat(tiny_server, max_completion_tokens=2, max_tokens=5)
    assert both["usage"]["completion_tokens"] == 2
    assert text(both) == text(chat(tiny_server, max_tokens=2))


@pytest.mark.parametrize("limit", [1, 2, 7])
def test_finish_reason_length_exactly_at_the_limit(tiny_server: RunningServer, limit: int) -> None:
    reply = chat(tiny_server, max_tokens=limit, logprobs=True)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == limit
    assert len(token_bytes(reply)) == limit
    longer = chat(tiny_server, max_tokens=limit + 5, logprobs=True)
    assert token_bytes(longer)[:limit] == token_bytes(reply)
    chunks = stream_chat(tiny_server, max_tokens=limit)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text_reply = complete(tiny_server, max_tokens=limit)
    assert text_reply["choices"][0]["finish_reason"] == "length"
    assert text_reply["usage"]["completion_tokens"] == limit


def test_no_limit_runs_to_the_end_of_the_context(tiny_server: RunningServer) -> None:
    reply = chat(tiny_server)
    usage = reply["usage"]
    if reply["choices"][0]["finish_reason"] == "length":
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 256
    else:
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 256


def test_eos_finishes_with_stop_unless_ignore_eos(tiny_server: RunningServer, eos_id: int) -> None:
    ended = chat(tiny_server, max_tokens=5, logit_bias={str(eos_id): 100})
    assert ended["choices"][0]["finish_reason"] == "stop"
    assert text(ended) == ""
    ignored = chat(tiny_server, max_tokens=5, logit_bias={str(eos_id): 100}, ignore_eos=True)
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 5


# ------------------------------------------------------------------------------------------------ messages


def test_content_parts_equal_the_plain_string(tiny_server: RunningServer) -> None:
    plain = chat(tiny_server, max_tokens=10)
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "who are you?"}]
    split = chat(tiny_server, max_tokens=10, messages=[{"role": "user", "content": parts}])
    assert text(split) == text(plain)
    assert split["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_system_and_multi_turn_messages(tiny_server: RunningServer) -> None:
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Hello, who are you?"},
    ]
    single = chat(tiny_server, max_tokens=10)
    multi = chat(tiny_server, max_tokens=10, messages=conversation)
    assert multi["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"]
    assert text(multi) != text(single)
    developer = [{"role": "developer", "content": "Be brief."}, *HELLO]
    assert chat(tiny_server, max_tokens=3, messages=developer)["choices"][0]["message"]["role"] == "assistant"
    named = [{"role": "user", "content": "Hello, who are you?", "name": "alice"}]
    assert chat(tiny_server, max_tokens=3, messages=named)["choices"]


def test_user_and_other_identifiers_are_accepted_and_change_nothing(tiny_server: RunningServer) -> None:
    plain = text(chat(tiny_server, max_tokens=8))
    tagged = chat(
        tiny_server,
        max_tokens=8,
        user="user-1234",
        safety_identifier="h-1",
        prompt_cache_key="k",
        store=False,
    )
    assert text(tagged) == plain
    assert text(complete(tiny_server, max_tokens=4, user="u")) == text(complete(tiny_server, max_tokens=4))


def test_explicit_nulls_mean_defaults(tiny_server: RunningServer) -> None:
    plain = chat(tiny_server, max_tokens=6)
    nulls = chat(
        tiny_server,
        max_tokens=6,
        n=None,
        stream=None,
        stop=None,
        seed=None,
        presence_penalty=None,
        frequency_penalty=None,
        logprobs=None,
        top_logprobs=None,
        logit_bias=None,
        user=None,
        stream_options=None,
    )
    assert text(nulls) == text(plain) and len(nulls["choices"]) == 1
    assert complete(tiny_server, max_tokens=None, echo=None, n=None)["usage"]["completion_tokens"] == 16


# ----------------------------------------------------------------------------------------- top_k / top_p


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_server: RunningServer) -> None:
    greedy = text(chat(tiny_server, max_tokens=16))
    for seed in (1, 2):
        assert text(chat(tiny_server, max_tokens=16, temperature=1.0, top_k=1, seed=seed)) == greedy
        assert text(chat(tiny_server, max_tokens=16, temperature=1.0, top_p=1e-6, seed=seed)) == greedy
    assert text(chat(tiny_server, max_tokens=16, temperature=1.0, seed=1)) != greedy


@pytest.mark.parametrize("seed", [1, 2, None])
def test_top_p_zero_gives_exactly_the_greedy_answer(tiny_server: RunningServer, seed: int | None) -> None:
    sampled = {"temperature": 1.0, "top_p": 0, "seed": seed, "max_tokens": 16, "ignore_eos": True}
    assert text(chat(tiny_server, **sampled)) == text(chat(tiny_server, max_tokens=16, ignore_eos=True))
    assert text(complete(tiny_server, **sampled)) == text(
        complete(tiny_server, max_tokens=16, ignore_eos=True)
    )


def test_top_p_zero_gives_the_greedy_response(tiny_server: RunningServer) -> None:
    texts = []
    for body in ({"temperature": 1.0, "top_p": 0}, {"temperature": 0}):  # Responses has no seed
        payload = {"model": "tiny", "input": "Hi", "max_output_tokens": 16, **body}
        answer = httpx.post(f"{tiny_server.v1}/responses", json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        texts.append([item["content"] for item in answer.json()["output"] if item["type"] == "message"])
    assert texts[0] == texts[1]


def test_temperature_zero_is_repeatable(tiny_server: RunningServer) -> None:
    assert text(chat(tiny_server, max_tokens=12)) == text(chat(tiny_server, max_tokens=12))
