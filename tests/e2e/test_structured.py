"""Structured outputs and tool calls end to end, with the real openai SDK against a real server.

The tiny models have random weights, so whatever they produce is valid only because constrained
decoding made it so: each test here fails if the grammar is not applied to every row.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from engines.testing.tiny import save_tiny_adapter
from gateway.settings import AdapterSettings, ModelSettings, Settings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.test_compat_tools import loopback_only as loopback_only  # fixture: clients stay on loopback

pytestmark = pytest.mark.e2e

#: A Hermes/Qwen-style template: tools in the system turn, calls as <tool_call> blocks, tool results.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool['function']['name'] }} "
    "{% endfor %}</tools> Answer with <tool_call> blocks.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}<tool_call>\n"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "\n</tool_call>{% endfor %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "sunny": {"type": "boolean"},
        "rank": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["city", "sunny", "rank", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA, "strict": True}}
LONG_CONTEXT = 16384


class Report(BaseModel):
    city: Literal["Paris", "Rome"]
    sunny: bool
    mood: Literal["good", "bad"]


@pytest.fixture(scope="module")
def server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    root = tmp_path_factory.mktemp("structured")
    folder = root / "tiny-hermes"
    shutil.copytree(tiny_models.base, folder)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    adapter = save_tiny_adapter(folder, root / "lora", seed=5)
    settings = Settings(
        models={
            "hermes": ModelSettings(source=str(folder), dtype="float32"),
            "hermes-multi": ModelSettings(source=str(folder), dtype="float32", adapter_mode="multi"),
            "llama3": ModelSettings(source=str(folder), dtype="float32", tool_parser="llama3_json"),
            # A context no test's stream reaches: a free row run up to it outlasts any other row.
            "hermes-long": ModelSettings(source=str(folder), dtype="float32", context_length=LONG_CONTEXT),
        },
        adapters={
            "lora": AdapterSettings(source=str(adapter), base="hermes"),
            "lora-multi": AdapterSettings(source=str(adapter), base="hermes-multi"),
        },
    )
    result: RunningServer = start_server(settings)
    return result


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_json_schema_output_validates_for_every_choice_and_adapter(client: openai.OpenAI) -> None:
    for model in ("hermes", "hermes+lora", "hermes-multi+lora-multi"):
        response = client.chat.completions.create(
            model=model,
            messages=ASK,
            response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
            n=2,
            temperature=1.0,
            seed=7,
            max_tokens=160,
        )
        for choice in response.choices:
            assert choice.finish_reason == "stop", (model, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_parse_with_a_pydantic_model_gives_the_parsed_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="hermes", messages=ASK, response_format=Report, max_tokens=160, seed=1
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Report)


def test_json_object_is_a_json_object(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="hermes", messages=ASK, response_format={"type": "json_object"}, max_tokens=200, seed=3
    )
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content or ""), dict)
    else:  # cut by max_tokens: still a valid prefix of an object
        assert choice.finish_reason == "length" and (choice.message.content or "").startswith("{")


def test_max_tokens_cutting_a_constrained_answer_finishes_with_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="hermes",
        messages=ASK,
        response_format=RESPONSE_FORMAT,
        max_tokens=3,  # type: ignore[arg-type]
    )
    assert response.choices[0].finish_reason == "length"
    assert (response.choices[0].message.content or "").startswith("{")


class FreeRow(threading.Thread):
    """A free (unconstrained) streamed row that runs until stopped: ``ignore_eos`` up to a context it
    never reaches. Read as it comes; ``ended`` keeps the frame if it ever ended by itself."""

    def __init__(self, server: RunningServer) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.v1}/chat/completions"
        self.body = {
            "model": "hermes-long",
            "messages": ASK,
            "max_tokens": LONG_CONTEXT - 64,
            "ignore_eos": True,
            "stream": True,
        }
        self.text = ""
        self.ended: Any = None
        self.decoding = threading.Event()  # its first tokens came: it is in its batch
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return  # leaving the block closes the stream: the server cancels the row
                    if line == "data: [DONE]" or (line.startswith("data: {") and "choices" not in line):
                        self.ended = line
                        return
                    if line.startswith("data: {"):
                        choice = json.loads(line[len("data: ") :])["choices"][0]
                        if choice["finish_reason"] is not None:
                            self.ended = choice
                            return
                        self.text += choice["delta"].get("content") or ""
                        if len(self.text) >= 8:
                            self.decoding.set()
        except Exception as exc:  # reported by the test
            self.ended = exc
        finally:
            self.decoding.set()


def test_constrained_and_free_rows_share_a_batch(server: RunningServer, client: openai.OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    scheduler = server.app.state.engine.scheduler  # type: ignore[attr-defined]
    assert scheduler.stats.largest_batch_size < 4  # nothing earlier in this module batched four rows

    def constrained(_: int) -> str:
        response = client.chat.completions.create(
            model="hermes-long",
            messages=ASK,
            response_format=RESPONSE_FORMAT,
            max_tokens=160,  # type: ignore[arg-type]
        )
        return response.choices[0].message.content or ""

    # Three free rows decoding first, then three constrained rows sent at once: each constrained row,
    # from its join to its end, decodes in the same steps as the three free ones, which outlive it.
    free = [FreeRow(server) for _ in range(3)]
    try:
        for row in free:
            row.start()
            assert row.decoding.wait(120) and row.ended is None, row.ended
        with ThreadPoolExecutor(3) as pool:
            structured = list(pool.map(constrained, range(3)))
        deadline = time.monotonic() + 60
        while scheduler.active_count > 3 and time.monotonic() < deadline:  # the answered rows leave
            time.sleep(0.01)
        assert [row.ended for row in free] == [None] * 3  # the free rows outlived every constrained one
        assert scheduler.active_count == 3
    finally:
        for row in free:
            row.stop.set()
        for row in free:
            row.join(timeout=60)
    for text in structured:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert any(not row.text.startswith("{") for row in free)  # the free rows were not constrained
    assert scheduler.stats.largest_batch_size >= 4  # three free rows and a constrained one in one step
    deadline = time.monotonic() + 60
    while scheduler.active_count:  # the closed streams are cancelled
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_structured_output_streams(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="hermes", messages=ASK, response_format=Report, max_tokens=160
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Report)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objec"}}},
        {
            "type": "json_schema",
            "json_schema": {"name": "lookaround", "schema": {"type": "string", "pattern": "(?<=a)b"}},
        },
        {"type": "json_schema", "json_schema": {"name": "not", "schema": {"not": {"type": "string"}}}},
        {"type": "json_schema"},
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_response_format(
    server: RunningServer, response_format: dict[str, Any]
) -> None:
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "hermes", "messages": ASK, "response_format": response_format, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


def test_a_named_tool_choice_forces_a_valid_call(client: openai.OpenAI) -> None:
    for model in ("hermes", "hermes+lora", "hermes-multi+lora-multi"):
        response = client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=160,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
        assert calls[0].function.name == "get_weather"
        arguments = json.loads(calls[0].function.arguments)
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
        assert not choice.message.content


@pytest.mark.slow
def test_required_without_parallel_calls_gives_exactly_one_call(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="hermes",
        messages=ASK,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        n=2,
        max_tokens=160,
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls or []) == 1
        assert choice.message.tool_calls[0].function.name in {"get_weather", "get_time"}  # type: ignore[index]


def test_tool_calls_stream_as_deltas_and_accumulate_in_the_sdk_helper(
    server: RunningServer, client: openai.OpenAI
) -> None:
    raw = httpx.post(
        f"{server.v1}/chat/completions",
        json={
            "model": "hermes",
            "messages": ASK,
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 160,
            "stream": True,
        },
        timeout=60,
    )
    chunks = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(c) == {"index", "function"} for c in calls[1:])
    assert not any(d.get("content") for d in deltas)  # the markup never leaks as content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    with client.chat.completions.stream(
        model="hermes",
        messages=ASK,
        tools=[openai.pydantic_function_tool(Report, name="report")],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=160,
    ) as stream:
        final = stream.get_final_completion()
    call = (final.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "report"
    assert isinstance(call.function.parsed_arguments, Report)


def test_auto_tool_calls_are_parsed_from_the_output(client: openai.OpenAI) -> None:
    # The random model never calls on its own; a response_format shaped like a Llama 3 call makes it
    # write one, and the auto parser (configured per model: tool_parser = "llama3_json") must find it.
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER["function"]["parameters"]},  # type: ignore[index]
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="llama3",
        messages=ASK,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="auto",
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema}},
        max_tokens=160,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"
    assert choice.message.content is None


def test_a_call_to_an_unknown_function_stays_text(client: openai.OpenAI) -> None:
    call_schema = {
        "type": "object",
        "properties": {
            "name": {"const": "launch_rockets"},
            "parameters": {"type": "object", "maxProperties": 0},
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="llama3",
        messages=ASK,
        tools=[WEATHER],  # type: ignore[list-item]
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema}},
        max_tokens=160,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert json.loads(choice.message.content or "")["name"] == "launch_rockets"


@pytest.mark.parametrize(
    ("tool_choice", "tools"),
    [
        ({"type": "function", "function": {"name": "nope"}}, [WEATHER]),
        ("required", None),
        ("sometimes", [WEATHER]),
    ],
)
def test_bad_tool_choice_is_a_400(server: RunningServer, tool_choice: Any, tools: Any) -> None:
    body: dict[str, Any] = {"model": "hermes", "messages": ASK, "tool_choice": tool_choice, "max_tokens": 4}
    if tools:
        body["tools"] = tools
    response = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tool_choice"


def test_a_tool_result_round_trip_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="hermes",
        messages=ASK,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=160,
    )
    call = (first.choices[0].message.tool_calls or [])[0]

    def answer(result: str) -> Any:
        history: list[Any] = [
            *ASK,
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        return client.chat.completions.create(
            model="hermes",
            messages=history,
            tools=[WEATHER],  # type: ignore[list-item]
            max_tokens=5,
            extra_body={"ignore_eos": True},  # the model goes on for all five tokens
        )

    second = answer("sunny, 21 C")
    # Five tokens cannot hold a <tool_call> block: the model writes text, up to the limit.
    assert second.choices[0].finish_reason == "length" and not second.choices[0].message.tool_calls
    assert second.usage and second.usage.completion_tokens == 5
    assert second.usage.prompt_tokens > (first.usage.prompt_tokens if first.usage else 0)
    # The tool result is in the prompt: a longer one (one token a byte here) makes it that much longer.
    longer = answer("sunny, 21 C, light wind")
    assert longer.usage and longer.usage.prompt_tokens - second.usage.prompt_tokens == len(", light wind")


# ---------------------------------------------------------------------------------------------- LangChain


@pytest.fixture
def chat_openai(loopback_only: list[Any]) -> Any:
    return pytest.importorskip("langchain_openai").ChatOpenAI


def test_langchain_bind_tools_agent_loop_with_a_tool_result(server: RunningServer, chat_openai: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    llm = chat_openai(base_url=server.v1, api_key="unused", model="hermes", temperature=0, max_tokens=160)
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    request = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    reply = request.invoke(messages)
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"]
    messages.append(reply)
    for call in reply.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather]).bind(max_tokens=6).invoke(messages)
    assert isinstance(final.content, str) and not final.tool_calls
    assert (
        final.usage_metadata and final.usage_metadata["input_tokens"] > reply.usage_metadata["input_tokens"]
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server: RunningServer, chat_openai: Any, method: str) -> None:
    llm = chat_openai(
        base_url=server.v1, api_key="unused", model="hermes+lora", temperature=0, max_tokens=160
    )
    result = llm.with_structured_output(Report, method=method).invoke("Report on Paris.")
    assert isinstance(result, Report)


def test_streamed_content_keeps_its_logprobs_while_tools_are_offered(server: RunningServer) -> None:
    body = {
        "model": "hermes",
        "messages": ASK,
        "tools": [WEATHER],
        "max_tokens": 12,
        "logprobs": True,
        "temperature": 0,
    }
    whole = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60).json()["choices"][0]
    raw = httpx.post(f"{server.v1}/chat/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    streamed = [
        entry["token"]
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for entry in c["choices"][0]["logprobs"]["content"]
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # Twelve tokens (one a byte) cannot hold a whole <tool_call> block: the answer is text, every token
    # of it content with its logprobs, streamed as in the whole answer.
    assert whole["message"].get("tool_calls") is None and whole["finish_reason"] in {"stop", "length"}
    assert whole["message"]["content"] and text == whole["message"]["content"]
    assert streamed and streamed == [entry["token"] for entry in whole["logprobs"]["content"]]
