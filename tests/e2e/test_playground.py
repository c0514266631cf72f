"""The chat playground at ``/``: its headers over plain HTTP, and the page itself in headless Chromium.

The browser tests drive Debian's ``/usr/bin/chromium`` through ``/usr/bin/chromedriver`` with selenium
(both installed by ``.ci/install-browser``; selenium comes with the ``test`` extra). The driver and browser
paths are given explicitly, so Selenium Manager never runs and nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import tiny_settings

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
KEY = "sk-playground"
WAIT_S = 60


@pytest.fixture(scope="module")
def locked_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    settings = tiny_settings(tiny_models)
    server_settings = settings.server.model_copy(update={"api_keys": [KEY]})
    server: RunningServer = start_server(settings.model_copy(update={"server": server_settings}))
    return server


# --- plain HTTP ------------------------------------------------------------------------------------


def test_root_serves_html_with_strict_csp(tiny_server: RunningServer) -> None:
    response = httpx.get(f"{tiny_server.url}/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text.lstrip().lower().startswith("<!doctype html>")
    csp = {
        part.split()[0]: part.split()[1:]
        for part in response.headers["content-security-policy"].split(";")
        if part.strip()
    }
    assert csp["default-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    for directive in ("script-src", "style-src"):  # the inline blocks by hash, nothing else
        assert csp[directive] and all(source.startswith("'sha256-") for source in csp[directive])
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    # Self-contained: no external script, style, font or image reference.
    for marker in ("http://", "https://", "//cdn", "src=", "@import"):
        assert marker not in response.text


def test_root_is_public_when_api_keys_are_set(locked_server: RunningServer) -> None:
    assert httpx.get(f"{locked_server.url}/", timeout=10).status_code == 200
    assert httpx.get(f"{locked_server.v1}/models", timeout=10).status_code == 401


def test_root_answers_only_get(tiny_server: RunningServer) -> None:
    assert httpx.post(f"{tiny_server.url}/", timeout=10).status_code == 405


# --- headless Chromium -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent; run .ci/install-browser to install Debian's chromium")
    assert CHROMEDRIVER.exists(), f"{CHROMEDRIVER} is absent; run .ci/install-browser (chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="playground-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: Any, condition: Any, message: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message)


def _state(driver: Any) -> str:
    return str(driver.execute_script("return document.body.dataset.state"))


def _model_ids(driver: Any) -> list[str]:
    return list(
        driver.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
    )


def _set_value(driver: Any, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def _assistant_messages(driver: Any) -> list[dict[str, str]]:
    return list(
        driver.execute_script(
            """return [...document.querySelectorAll('.msg.assistant')].map(m => ({
                   state: m.dataset.state || '', finish: m.dataset.finishReason || '',
                   text: m.querySelector('.text').textContent, error: m.querySelector('.error').textContent,
                   meta: m.querySelector('.meta').textContent}))"""
        )
    )


def _send(driver: Any, text: str) -> dict[str, str]:
    """Type ``text``, press Send, wait for the reply to finish; the last assistant message."""
    before = len(_assistant_messages(driver))
    _set_value(driver, "prompt", text)
    driver.find_element("id", "send").click()
    _wait(
        driver,
        lambda d: (
            len(_assistant_messages(d)) > before
            and _assistant_messages(d)[-1]["state"] in {"done", "error"}
            and _state(d) == "ready"
        ),
        "the reply did not finish",
    )
    return _assistant_messages(driver)[-1]


def _console_problems(driver: Any) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
    ]


def _greedy_reply(server: RunningServer, messages: list[dict[str, str]], max_tokens: int) -> str:
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": "tiny", "messages": messages, "max_completion_tokens": max_tokens, "temperature": 0},
        timeout=WAIT_S,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def test_playground_streams_a_conversation(browser: Any, tiny_server: RunningServer) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get_log("browser")  # drop what earlier tests left
    browser.get(f"{tiny_server.url}/")
    _wait(browser, lambda d: _state(d) == "ready" and "tiny" in _model_ids(d), "the model list did not load")
    assert {"tiny", "tiny+tiny-lora"} <= set(_model_ids(browser))
    Select(browser.find_element("id", "model")).select_by_value("tiny")
    _set_value(browser, "temperature", "0")
    _set_value(browser, "max-tokens", "12")

    first_question = "Hello, who are you?"
    first = _send(browser, first_question)
    assert first["state"] == "done", first
    assert first["error"] == ""
    assert first["finish"] in {"stop", "length"}
    assert first["text"], "the assistant message is empty"
    assert "tokens" in first["meta"]  # usage from stream_options.include_usage
    # What streamed into the page is exactly what the API answers for the same greedy request.
    expected = _greedy_reply(tiny_server, [{"role": "user", "content": first_question}], 12)
    assert first["text"] == expected

    # The conversation is kept: the second request carries the first exchange.
    second_question = "Tell me more."
    second = _send(browser, second_question)
    assert second["state"] == "done", second
    history = [
        {"role": "user", "content": first_question},
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": second_question},
    ]
    assert second["text"] == _greedy_reply(tiny_server, history, 12)

    assert _console_problems(browser) == []  # e.g. a CSP violation would show up here

    # An HTTP error is shown readably, with the server's message, and leaves the conversation usable.
    _set_value(browser, "max-tokens", "100000000")
    failed = _send(browser, "This asks for too many tokens.")
    assert failed["state"] == "error"
    assert failed["error"].startswith("HTTP 400: ") and "max_completion_tokens" in failed["error"], failed
    # The failed question is handed back for editing instead of being lost.
    assert browser.find_element("id", "prompt").get_attribute("value") == "This asks for too many tokens."

    browser.find_element("id", "reset").click()
    assert _assistant_messages(browser) == []


def test_playground_with_api_key(browser: Any, locked_server: RunningServer) -> None:
    browser.get_log("browser")  # drop what earlier tests left
    browser.get(f"{locked_server.url}/")
    _wait(browser, lambda d: _state(d) == "error", "the page did not report the missing key")
    assert "401" in browser.find_element("id", "status").text
    _set_value(browser, "api-key", KEY)
    browser.find_element("id", "max-tokens").click()  # leaving the field commits it ("change")
    _wait(
        browser,
        lambda d: _state(d) == "ready" and "tiny" in _model_ids(d),
        "models did not load with the key",
    )
    assert browser.execute_script("return localStorage.getItem('peft-gateway.api-key')") == KEY

    _set_value(browser, "max-tokens", "16")
    reply = _send(browser, "Hi")
    assert reply["state"] == "done" and reply["text"], reply

    browser.refresh()  # the key is remembered by this browser
    _wait(browser, lambda d: _state(d) == "ready" and "tiny" in _model_ids(d), "the key was not remembered")
    browser.execute_script("localStorage.clear()")
    problems = [p for p in _console_problems(browser) if "401" not in p]  # the first, keyless load
    assert problems == []
