"""Property-based fuzzing of the generation routes with hypothesis.

Valid-ish bodies (kept cheap: at most a few tokens), the same bodies with one field mutated to a wrong
type or range, arbitrary JSON and arbitrary bytes go to ``/v1/chat/completions`` and ``/v1/completions``.
Whatever comes in, the answer is never a 5xx, every 4xx is OpenAI's error shape, every 200 is a
well-formed completion or SSE stream, and the server still serves afterwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import tiny_settings

pytestmark = pytest.mark.e2e

CHAT = "/chat/completions"
TEXT = "/completions"
VOCAB = 260  # the tiny model's byte-level vocabulary
MAX_TOKENS = 4

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written to the work tree
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture(scope="module")
def fuzz_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    """A server of its own, so that whatever the fuzzing does cannot disturb the other tests."""
    server: RunningServer = start_server(tiny_settings(tiny_models))
    return server


@pytest.fixture(scope="module")
def http(fuzz_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.v1, timeout=60) as client:
        yield client


# ------------------------------------------------------------------------------------------- strategies

# Mostly names that load, so that most valid-ish bodies get as far as generating; no "/" after a "+" in
# the random ones: a Hub adapter id would make the server try the (unreachable) Hub, an honest 503.
_NAMED = ["tiny"] * 6 + ["tiny+tiny-lora"] * 3 + ["test-org/tiny-base", "tiny-lora", "nope", "tiny+nope"]
_ODD = ["tiny+", "+", "tiny+..", "tiny+../x", "tiny@main", "", " tiny"]
MODELS = st.sampled_from([*_NAMED, *_ODD, "<random>"]).flatmap(
    lambda name: (
        st.text(alphabet=st.characters(blacklist_characters="/"), max_size=12)
        if name == "<random>"
        else st.just(name)
    )
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)

TEXTS = st.text(max_size=40)
STOPS = st.none() | st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4)
#: Token ids in the vocabulary and outside it (negative, just past its end, far past it): an id outside
#: is a 400 naming logit_bias, and the engine serves on.
TOKEN_IDS = (
    st.integers(min_value=0, max_value=VOCAB - 1)
    | st.integers(min_value=VOCAB, max_value=VOCAB + 8)
    | st.integers(min_value=-(2**64), max_value=-1)
    | st.integers(min_value=VOCAB, max_value=2**64)
)
LOGIT_BIAS = st.dictionaries(TOKEN_IDS.map(str), st.floats(min_value=-100, max_value=100), max_size=3)

SAMPLING_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "n": st.integers(min_value=1, max_value=2),
    "stream": st.booleans(),
    "stop": STOPS,
    "seed": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "logit_bias": LOGIT_BIAS,
    "user": st.text(max_size=10),
    "top_k": st.integers(min_value=-1, max_value=300),
    "repetition_penalty": st.floats(min_value=0.5, max_value=2),
}

CHAT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **SAMPLING_FIELDS,
    "max_tokens": st.integers(min_value=1, max_value=MAX_TOKENS),
    "max_completion_tokens": st.integers(min_value=1, max_value=MAX_TOKENS),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=20),
    "response_format": st.just({"type": "text"}),
    "tool_choice": st.just("none"),
    "store": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
}

TEXT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **SAMPLING_FIELDS,
    "max_tokens": st.integers(min_value=1, max_value=MAX_TOKENS),
    "echo": st.booleans(),
    "logprobs": st.integers(min_value=0, max_value=5),
}

CONTENT = TEXTS | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXTS}), max_size=3)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": CONTENT,
    },
    optional={"name": st.text(min_size=1, max_size=8)},
)
PROMPT = (
    TEXTS
    | st.lists(TEXTS, min_size=1, max_size=2)
    | st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=20)
    | st.lists(st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=8), max_size=2)
)


def _with_optional(required: dict[str, Any], optional: dict[str, st.SearchStrategy[Any]]) -> Any:
    return st.fixed_dictionaries(required, optional=optional)


def chat_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return _with_optional(
        {
            "model": MODELS,
            "messages": st.lists(MESSAGE, min_size=1, max_size=3),
            "max_tokens": st.integers(min_value=1, max_value=MAX_TOKENS),
        },
        {k: v for k, v in CHAT_FIELDS.items() if k != "max_tokens"},
    )


def text_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return _with_optional(
        {"model": MODELS, "prompt": PROMPT, "max_tokens": st.integers(min_value=1, max_value=MAX_TOKENS)},
        {k: v for k, v in TEXT_FIELDS.items() if k != "max_tokens"},
    )


KNOWN_KEYS = sorted({*CHAT_FIELDS, *TEXT_FIELDS, "model", "messages", "prompt", "stream_options", "tools"})


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid-ish body with one to three fields replaced by arbitrary JSON, removed, or added."""
    body = dict(draw(bodies))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(sorted(body)) | st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))
        action = draw(st.sampled_from(["replace", "replace", "delete", "nest"]))
        if action == "delete":
            body.pop(key, None)
        elif action == "nest" and isinstance(body.get("messages"), list) and body["messages"]:
            first = body["messages"][0]
            message = dict(first) if isinstance(first, dict) else {}
            message[draw(st.sampled_from(["role", "content", "name", "extra"]))] = draw(JSON_VALUES)
            body["messages"] = [message, *body["messages"][1:]]
        else:
            body[key] = draw(JSON_VALUES)
    return tame(body)


def tame(body: dict[str, Any]) -> dict[str, Any]:
    """Keep a mutated body cheap to serve and clear of known, separately tested failures.

    A token limit that is valid and large would turn one example into a long generation, so it is made
    invalid instead; a chat body without any limit gets a small one.
    """
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and MAX_TOKENS < value < 10**6:
            body[key] = 10**7
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = MAX_TOKENS
    return body


def encoded(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return bodies.map(lambda body: json.dumps(body).encode())


def chat_cases() -> st.SearchStrategy[bytes]:
    return st.one_of(encoded(chat_bodies()), encoded(mutated(chat_bodies())))


def text_cases() -> st.SearchStrategy[bytes]:
    return st.one_of(encoded(text_bodies()), encoded(mutated(text_bodies())))


def junk_cases() -> st.SearchStrategy[bytes]:
    """Anything at all: JSON of any shape, objects of known keys with any values, raw bytes."""
    return st.one_of(
        encoded(JSON_VALUES),
        st.binary(max_size=64),
        encoded(st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), JSON_VALUES, max_size=5)),
        st.sampled_from(
            [
                b"{",
                b'{"model": "tiny", "messages": [}',
                b"NaN",
                b'{"model": NaN}',
                b'{"n": Infinity}',
                b"\xef\xbb\xbf{}",
            ]
        ),
        st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(min_value=1, max_value=3000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    )


# ------------------------------------------------------------------------------------------------ checks


def assert_openai_error(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def assert_completion(path: str, response: httpx.Response) -> None:
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e.strip() and not e.startswith(":")]
        assert events and events[-1] == "data: [DONE]", response.text[-200:]
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert all("error" not in chunk for chunk in chunks), chunks
        assert len({c["id"] for c in chunks}) == 1
        return
    body = response.json()
    assert body["object"] == ("chat.completion" if path == CHAT else "text_completion")
    assert body["choices"] and all(c["finish_reason"] in {"stop", "length"} for c in body["choices"])
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


_TOKEN_ID = re.compile(r"-?[0-9]+")


def outside_vocab(body: bytes) -> bool:
    """Whether ``body`` has a ``logit_bias`` naming a token id outside the tiny model's vocabulary."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    bias = parsed.get("logit_bias") if isinstance(parsed, dict) else None
    return isinstance(bias, dict) and any(
        _TOKEN_ID.fullmatch(key) and not 0 <= int(key) < VOCAB for key in bias
    )


def check(http: httpx.Client, path: str, body: bytes, content_type: str = "application/json") -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(path, content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, body[:300], response.text[:300])
    assert response.headers.get("x-request-id")
    if response.status_code == 200:
        assert not outside_vocab(body), body[:300]  # such a bias is refused, never generated with
        assert_completion(path, response)
    else:
        assert 400 <= response.status_code < 500, response.status_code
        assert_openai_error(response)


#: Bodies every fuzzing run sends, whatever hypothesis draws: logit_bias ids outside the vocabulary.
OUT_OF_VOCAB_CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 2,
    "logit_bias": {str(VOCAB): 5, "-1": -5, str(2**70): 1},
}
OUT_OF_VOCAB_TEXT = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "logit_bias": {"1": 2, str(VOCAB): 5}}


@FUZZ_SETTINGS
@given(body=chat_cases())
@example(body=json.dumps(OUT_OF_VOCAB_CHAT).encode())
@example(body=json.dumps({**OUT_OF_VOCAB_CHAT, "stream": True, "n": 2}).encode())
def test_fuzzed_chat_bodies(http: httpx.Client, body: bytes) -> None:
    check(http, CHAT, body)


@FUZZ_SETTINGS
@given(body=text_cases())
@example(body=json.dumps(OUT_OF_VOCAB_TEXT).encode())
@example(body=json.dumps({**OUT_OF_VOCAB_TEXT, "stream": True, "prompt": ["a", "b"]}).encode())
def test_fuzzed_completion_bodies(http: httpx.Client, body: bytes) -> None:
    check(http, TEXT, body)


@settings(FUZZ_SETTINGS, max_examples=100)
@given(
    path=st.sampled_from([CHAT, TEXT]),
    body=junk_cases(),
    content_type=st.sampled_from(["application/json", "text/plain", ""]),
)
def test_junk_bodies(http: httpx.Client, path: str, body: bytes, content_type: str) -> None:
    check(http, path, body, content_type)


def test_server_still_serves_after_fuzzing(fuzz_server: RunningServer, http: httpx.Client) -> None:
    health = httpx.get(f"{fuzz_server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ok = http.post(
        CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    )
    assert ok.status_code == 200, ok.text
    assert http.post(TEXT, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------------------- regressions found by fuzzing

HI = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
PROMPT_HI = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}


def _with(base: dict[str, Any], **fields: Any) -> str:
    return json.dumps({**base, **fields})


def _spliced(base: dict[str, Any], fragment: str) -> str:
    """``base`` as JSON with ``fragment`` (not necessarily valid JSON) added as its last member."""
    return json.dumps(base)[:-1] + ", " + fragment + "}"


@pytest.mark.parametrize(
    ("path", "raw", "param", "code"),
    [
        # A lone surrogate reached the tokenizer, which raised a TypeError: 500.
        (CHAT, _with(HI, messages=[{"role": "user", "content": "\ud800"}]), "messages[0].content", None),
        (
            CHAT,
            _with(HI, messages=[{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]),
            "messages[0].content[0].text",
            None,
        ),
        (TEXT, _with(PROMPT_HI, prompt=["ok", "\udc00"]), "prompt[1]", None),
        # "²".isdigit() is true but int("²") fails: a logit_bias key like that was a 500.
        (CHAT, _with(HI, logit_bias={"\u00b2": 1}), "logit_bias", None),
        (CHAT, _with(HI, logit_bias={"\u0663": 1}), "logit_bias", None),
        # A logit_bias id outside the vocabulary reached the sampler and ended the engine thread.
        (CHAT, _with(HI, logit_bias={str(VOCAB): 1}), "logit_bias", None),
        (CHAT, _with(HI, logit_bias={"-1": 1}), "logit_bias", None),
        (TEXT, _with(PROMPT_HI, logit_bias={str(2**70): -1}), "logit_bias", None),
        # NaN and Infinity are not JSON (Python's parser takes them).
        (CHAT, _spliced(HI, '"temperature": NaN'), None, "invalid_json"),
        (TEXT, _spliced(PROMPT_HI, '"logit_bias": {"1": -Infinity}'), None, "invalid_json"),
        # A tiny repetition_penalty overflowed the logits to inf and sampling failed: 500.
        (CHAT, _with(HI, repetition_penalty=1e-300), "repetition_penalty", None),
        # More sequences than the engine can ever hold was a 503 that no retry could cure.
        (TEXT, _with(PROMPT_HI, prompt=["x"] * 81, max_tokens=1), "prompt", None),
        (TEXT, _with(PROMPT_HI, prompt=["x"] * 6, max_tokens=1, n=16), "n", None),
        # Known OpenAI fields are refused by name, not as "unrecognized".
        (CHAT, _with(HI, functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
        (CHAT, _with(HI, function_call={"name": "f"}), "function_call", "unsupported_parameter"),
        (CHAT, _with(HI, modalities=["text", "audio"]), "modalities", "unsupported_parameter"),
        (CHAT, _with(HI, audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
        (CHAT, _with(HI, reasoning_effort="low"), "reasoning_effort", "unsupported_parameter"),
        (CHAT, _with(HI, verbosity="low"), "verbosity", "unsupported_parameter"),
        (
            CHAT,
            _with(HI, prediction={"type": "content", "content": "x"}),
            "prediction",
            "unsupported_parameter",
        ),
        (CHAT, _with(HI, web_search_options={}), "web_search_options", "unsupported_parameter"),
        # Nesting deep enough to exhaust the parser's recursion was a 500.
        (CHAT, "[" * 100_000 + "]" * 100_000, None, "invalid_json"),
    ],
)
def test_regressions(http: httpx.Client, path: str, raw: str, param: str | None, code: str | None) -> None:
    response = http.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert_openai_error(response)
    error = response.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_an_empty_unknown_key_is_named_in_the_message(http: httpx.Client) -> None:
    response = http.post(
        CHAT, content=_with(HI, **{"": 1}).encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Unrecognized request argument supplied: ''"
