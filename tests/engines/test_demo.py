"""The demo models: built once, atomically, and they really give the advertised answers.

The demo is only convincing if ``demo`` answers in English and ``demo+demo-zh`` answers the same question
in Chinese, word for word, so these tests decode greedily with their own loop (not the gateway's) and
compare exact strings.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import engines.demo as demo_module
from engines.demo import (
    DEMO_BASE_REPO_ID,
    DEMO_QUESTIONS,
    DemoModels,
    default_demo_dir,
    ensure_demo_models,
)

pytestmark = pytest.mark.slow

QUESTIONS = list(DEMO_QUESTIONS)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-home") / "demo"


@pytest.fixture(scope="module")
def build_log() -> list[str]:
    return []


@pytest.fixture(scope="module")
def demo(demo_root: Path, build_log: list[str]) -> DemoModels:
    return ensure_demo_models(demo_root, log=build_log.append)


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


def greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 80) -> str:
    """Argmax decoding from the chat-templated prompt until the end-of-turn token."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def test_build_logs_progress(demo: DemoModels, build_log: list[str]) -> None:
    assert any(line.startswith("training demo base model") for line in build_log)
    assert any(line.startswith("training demo adapter") for line in build_log)
    assert all("\n" not in line for line in build_log)


def test_second_call_reuses_the_build(demo: DemoModels, demo_root: Path) -> None:
    weights = demo.base_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_demo_models(demo_root, log=lambda line: pytest.fail(f"rebuilt: {line}"))
    assert time.perf_counter() - started < 1.0
    assert again == demo
    assert weights.stat().st_mtime_ns == before


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

    models = ensure_demo_models(root)

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
        ensure_demo_models(tmp_path / "demo")
    assert sorted(path.name for path in (tmp_path / "demo").iterdir()) == [".lock"]

    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls))
    ensure_demo_models(tmp_path / "demo")
    assert len(calls) == 1


def test_concurrent_calls_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo_module, "_build", fake_build(calls, delay=0.3))
    results: list[DemoModels] = []
    # flock excludes separate opens of the lock file even within one process, so threads stand in for
    # two gateway processes starting at once.
    threads = [
        threading.Thread(target=lambda: results.append(ensure_demo_models(tmp_path / "demo")))
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
