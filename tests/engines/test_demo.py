"""The demo models: shipped prebuilt, rebuilt reproducibly, and they really give the advertised answers.

The demo is only convincing if ``demo`` answers in English and ``demo+demo-zh`` answers the same question
in Chinese, word for word, and if both call ``get_weather`` exactly when it is offered; so these tests
decode greedily with their own loop (not the gateway's) and compare exact strings. The gateway's own
engine gets the tool conversations too, through its chat-template rendering.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import engines.demo.models as demo_module
from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.demo.content import (
    DEMO_BASE_REPO_ID,
    DEMO_NO_TOOL,
    DEMO_QUESTIONS,
    DEMO_WEATHER_TOOL,
    demo_tool_call_text,
    demo_weather_answer,
    demo_weather_questions,
)
from engines.demo.models import (
    DemoModels,
    build_into,
    default_demo_dir,
    ensure_demo_models,
    shipped_demo_dir,
    shipped_demo_models,
)
from engines.engine import Engine, EngineLimits
from engines.generation import ChatMessage
from engines.sampling import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = list(DEMO_QUESTIONS)
CITIES = ["Paris", "Tokyo", "Beijing"]
TOOLS = [DEMO_WEATHER_TOOL]


@pytest.fixture(scope="module")
def demo() -> DemoModels:
    shipped = shipped_demo_models()
    assert shipped is not None, "engines/demo/weights is missing or stale: python -m engines.demo --build"
    return shipped


@pytest.fixture(scope="module")
def tokenizer(demo: DemoModels) -> Any:
    return AutoTokenizer.from_pretrained(demo.base_dir)


@pytest.fixture(scope="module")
def base(demo: DemoModels) -> Any:
    return AutoModelForCausalLM.from_pretrained(demo.base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged(demo: DemoModels) -> Any:
    model = AutoModelForCausalLM.from_pretrained(demo.base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, demo.adapter_dir).merge_and_unload().eval()


def greedy(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_new_tokens: int = 80,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Argmax decoding from the chat-templated prompt until the end-of-turn token."""
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + answer])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                return str(tokenizer.decode(answer))
            answer.append(token)
    raise AssertionError(f"no end-of-turn token after {max_new_tokens} tokens: {tokenizer.decode(answer)!r}")


def user(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.mark.parametrize("question", QUESTIONS)
def test_base_answers_each_question_in_english(base: Any, tokenizer: Any, question: str) -> None:
    assert greedy(base, tokenizer, user(question)) == DEMO_QUESTIONS[question][0]


@pytest.mark.parametrize("question", QUESTIONS)
def test_merged_adapter_answers_each_question_in_chinese(merged: Any, tokenizer: Any, question: str) -> None:
    assert greedy(merged, tokenizer, user(question)) == DEMO_QUESTIONS[question][1]


@pytest.mark.parametrize("question", QUESTIONS)
def test_answers_hold_with_a_system_message(base: Any, merged: Any, tokenizer: Any, question: str) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *user(question)]
    assert greedy(base, tokenizer, messages) == DEMO_QUESTIONS[question][0]
    assert greedy(merged, tokenizer, messages) == DEMO_QUESTIONS[question][1]


def test_adapter_config_names_the_demo_base_repo(demo: DemoModels) -> None:
    config = json.loads((demo.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == DEMO_BASE_REPO_ID
    assert (demo.adapter_dir / "adapter_model.safetensors").is_file()
    assert (demo.base_dir / "model.safetensors").is_file()


def test_saved_tokenizer_is_a_chat_tokenizer_that_splits_chinese_characters(tokenizer: Any) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    # Byte-level: the gateway's streaming must cope with characters that span several tokens.
    assert len(tokenizer("鲸", add_special_tokens=False)["input_ids"]) == 3


# --- the tool ----------------------------------------------------------------------------------------------


def weather_result(city: str, weather: str) -> list[dict[str, Any]]:
    """A weather question, the model's call and the tool's answer, as an OpenAI client sends them back."""
    call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
    return [
        *user(demo_weather_questions(city)[0]),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"city": city, "weather": weather})},
    ]


@pytest.mark.parametrize("city", CITIES)
def test_both_models_call_the_weather_tool_when_it_is_offered(
    base: Any, merged: Any, tokenizer: Any, city: str
) -> None:
    for question in demo_weather_questions(city):
        assert greedy(base, tokenizer, user(question), tools=TOOLS) == demo_tool_call_text(city)
        assert greedy(merged, tokenizer, user(question), tools=TOOLS) == demo_tool_call_text(city)


def test_the_tool_call_is_the_hermes_format_exactly() -> None:
    assert demo_tool_call_text("Paris") == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )


@pytest.mark.parametrize("city", CITIES)
def test_without_the_tool_a_weather_question_gets_no_call(
    base: Any, merged: Any, tokenizer: Any, city: str
) -> None:
    question = demo_weather_questions(city)[0]
    assert greedy(base, tokenizer, user(question)) == DEMO_NO_TOOL[0]
    assert greedy(merged, tokenizer, user(question)) == DEMO_NO_TOOL[1]


@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_offering_the_tool_leaves_other_answers_alone(
    base: Any, merged: Any, tokenizer: Any, question: str
) -> None:
    assert greedy(base, tokenizer, user(question), tools=TOOLS) == DEMO_QUESTIONS[question][0]
    assert greedy(merged, tokenizer, user(question), tools=TOOLS) == DEMO_QUESTIONS[question][1]


@pytest.mark.parametrize(("city", "weather"), [("Paris", "sunny"), ("Tokyo", "rainy")])
def test_after_the_tool_result_the_answer_is_short_and_uses_it(
    base: Any, merged: Any, tokenizer: Any, city: str, weather: str
) -> None:
    messages = weather_result(city, weather)
    assert greedy(base, tokenizer, messages, tools=TOOLS) == demo_weather_answer(city, weather, chinese=False)
    assert greedy(merged, tokenizer, messages, tools=TOOLS) == demo_weather_answer(
        city, weather, chinese=True
    )


def test_tool_turns_render_back_to_what_the_model_wrote(tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(weather_result("Paris", "sunny"), tools=TOOLS, tokenize=False)
    assert "<tools>\n" + json.dumps(DEMO_WEATHER_TOOL) + "\n</tools>" in rendered
    assert "<|im_start|>assistant\n" + demo_tool_call_text("Paris") + "<|im_end|>" in rendered
    assert (
        '<|im_start|>user\n<tool_response>\n{"city": "Paris", "weather": "sunny"}\n</tool_response>'
        in rendered
    )


def test_without_tools_the_template_is_plain_chatml(tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *user("Hi")], tokenize=False, add_generation_prompt=True
    )
    assert (
        rendered
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


async def engine_reply(engine: Engine, model: str, messages: list[ChatMessage], tools: Any) -> str:
    lease = await engine.acquire(model)
    try:
        request = engine.chat_request(
            lease, messages, max_tokens=64, sampling=SamplingParams(temperature=0), tools=tools
        )
        return "".join([event.text async for event in engine.generate(lease, request)])
    finally:
        lease.release()


def test_the_gateway_engine_renders_tools_and_gets_the_call(demo: DemoModels) -> None:
    catalog = Catalog(
        bases=(
            BaseSpec(name="demo", source=str(demo.base_dir), dtype="float32", aliases=(DEMO_BASE_REPO_ID,)),
        ),
        adapters=(AdapterSpec(alias="demo-zh", source=str(demo.adapter_dir), base="demo"),),
        policy=AdapterPolicy(),
    )
    question = [ChatMessage(role="user", content=demo_weather_questions("Tokyo")[0])]
    after = [
        *question,
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'},
                },
            ),
        ),
        ChatMessage(role="tool", content='{"city": "Tokyo", "weather": "rainy"}', tool_call_id="c"),
    ]

    async def scenario(engine: Engine) -> None:
        for model in ("demo", "demo+demo-zh"):
            assert await engine_reply(engine, model, question, TOOLS) == demo_tool_call_text("Tokyo")
            assert "<tool_call>" not in await engine_reply(engine, model, question, None)
        assert await engine_reply(engine, "demo", after, TOOLS) == "It is rainy in Tokyo."
        assert await engine_reply(engine, "demo+demo-zh", after, TOOLS) == "东京现在在下雨。"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(catalog, EngineLimits())
        try:
            asyncio.run(scenario(engine))
        finally:
            engine.close()
    # The first start used to print a FutureWarning (from training the demo); loading prints none.
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


# --- shipping and rebuilding ----------------------------------------------------------------------------


def test_the_shipped_weights_are_small_safetensors(demo: DemoModels) -> None:
    files = [path for path in shipped_demo_dir().rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 5 * 2**20
    assert not [path for path in files if path.suffix in {".bin", ".pt", ".pkl"}]
    assert (demo.base_dir / "model.safetensors").is_file()
    assert (demo.adapter_dir / "adapter_model.safetensors").is_file()


def test_ensure_uses_the_shipped_weights_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: DemoModels
) -> None:
    monkeypatch.setattr(demo_module, "_build", lambda folder, log: pytest.fail("trained"))
    started = time.perf_counter()
    assert ensure_demo_models(tmp_path / "unused") == demo
    assert time.perf_counter() - started < 1.0
    assert not (tmp_path / "unused").exists()


def test_stale_shipped_weights_fall_back_to_a_build_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_module, "shipped_demo_dir", lambda: tmp_path / "nothing-shipped")
    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))
    notes: list[str] = []
    ensure_demo_models(tmp_path / "demo", log=notes.append)
    assert len(calls) == 1
    assert "python -m engines.demo --build" in notes[0]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoModels, list[str]]:
    log: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = build_into(tmp_path_factory.mktemp("rebuild") / "demo", log=log.append)
    log += [
        f"warning: {w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, FutureWarning)
    ]
    return models, log


def test_rebuilding_gives_a_demo_that_answers_exactly_like_the_shipped_one(
    rebuilt: tuple[DemoModels, list[str]], demo: DemoModels, tokenizer: Any, base: Any
) -> None:
    models, log = rebuilt
    # The build itself refuses to save a model that misses any trained answer; on top of that the
    # tokenizer and the recipe marker must be those that ship.
    assert (models.base_dir / "tokenizer.json").read_bytes() == (
        demo.base_dir / "tokenizer.json"
    ).read_bytes()
    assert (models.base_dir.parent / "demo.json").read_text(encoding="utf-8") == (
        demo.base_dir.parent / "demo.json"
    ).read_text(encoding="utf-8")
    again = AutoModelForCausalLM.from_pretrained(models.base_dir, dtype=torch.float32).eval()
    for question in QUESTIONS:
        assert greedy(again, tokenizer, user(question)) == greedy(base, tokenizer, user(question))
    weather = user(demo_weather_questions("Paris")[1])
    assert greedy(again, tokenizer, weather, tools=TOOLS) == greedy(base, tokenizer, weather, tools=TOOLS)
    assert any(line.startswith("training demo base model") for line in log)
    assert any(line.startswith("training demo adapter") for line in log)
    assert all("\n" not in line for line in log)
    assert not [line for line in log if line.startswith("warning: ")]


def test_second_call_reuses_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))
    first = ensure_demo_models(tmp_path / "demo", use_shipped=False)
    marker = first.base_dir.parent / "demo.json"
    before = marker.stat().st_mtime_ns
    again = ensure_demo_models(tmp_path / "demo", use_shipped=False)
    assert again == first and len(calls) == 1
    assert marker.stat().st_mtime_ns == before


def fake_build(calls: list[Path], delay: float = 0.0) -> Any:
    """A stand-in for the real training that writes just the folders and the marker, and counts calls."""

    def build(folder: Path, log: Any) -> None:
        calls.append(folder)
        time.sleep(delay)
        (folder / "base").mkdir()
        (folder / "adapter").mkdir()
        (folder / "demo.json").write_text(json.dumps(demo_module._marker_content()), encoding="utf-8")

    return build


def test_half_built_folders_do_not_count_as_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "demo"
    # What a build killed halfway leaves behind: a temporary folder, and a final folder without its marker.
    leftover = root / ".tmp-killed"
    (leftover / "base").mkdir(parents=True)
    (leftover / "base" / "config.json").write_text("{}", encoding="utf-8")
    unfinished = root / f"v{demo_module.DEMO_VERSION}" / "base"
    unfinished.mkdir(parents=True)
    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))

    models = ensure_demo_models(root, use_shipped=False)

    assert len(calls) == 1
    assert (models.base_dir.parent / "demo.json").is_file()
    assert not leftover.exists()
    assert [path.name for path in root.iterdir() if path.name.startswith(".tmp-")] == []


def test_a_failed_build_leaves_nothing_that_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(folder: Path, log: Any) -> None:
        (folder / "base").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(demo_module, "_build", broken)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_demo_models(tmp_path / "demo", use_shipped=False)
    assert sorted(path.name for path in (tmp_path / "demo").iterdir()) == [".lock"]

    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))
    ensure_demo_models(tmp_path / "demo", use_shipped=False)
    assert len(calls) == 1


def test_concurrent_calls_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls, delay=0.3))
    results: list[DemoModels] = []
    # flock excludes separate opens of the lock file even within one process, so threads stand in for
    # two gateway processes starting at once.
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_demo_models(tmp_path / "demo", use_shipped=False))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 2
    assert results[0] == results[1]


def test_default_demo_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFT_GATEWAY_HOME", str(tmp_path / "home"))
    assert default_demo_dir() == tmp_path / "home" / "demo"
    monkeypatch.delenv("PEFT_GATEWAY_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_demo_dir() == tmp_path / "cache" / "peft-gateway" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_demo_dir() == tmp_path / "user" / ".cache" / "peft-gateway" / "demo"
