"""The CLI through a real running gateway, as subprocesses, the way people use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, TinyModels, free_port
from tests.e2e.conftest import ADMIN_KEY, tiny_settings

pytestmark = pytest.mark.e2e


def cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PEFT_GATEWAY_ADMIN_KEY": ADMIN_KEY, **(env or {})},
    )


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    result: RunningServer = start_server(tiny_settings(tiny_models))
    return result


def test_every_verb_has_help() -> None:
    for verb in ("serve", "models", "pull", "launch", "unload", "chat"):
        result = cli(verb, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


def test_models_prints_a_table(server: RunningServer) -> None:
    result = cli("models", "--url", server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["ID", "PARENT", "LOADED"]
    assert "tiny+tiny-lora" in result.stdout


def test_launch_with_peft_model_id_preloads_and_prints_the_id(server: RunningServer) -> None:
    result = cli("launch", "tiny", "--peft-model-id", "tiny-lora", "--url", server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tiny+tiny-lora"
    listed = {m["id"]: m for m in httpx.get(f"{server.v1}/models", timeout=10).json()["data"]}
    assert listed["tiny+tiny-lora"]["loaded"] is True


def test_unload_frees_a_loaded_variant(server: RunningServer) -> None:
    assert cli("launch", "tiny+tiny-lora", "--url", server.url).returncode == 0
    result = cli("unload", "tiny+tiny-lora", "--url", server.url)
    assert result.returncode == 0, result.stderr
    listed = {m["id"]: m for m in httpx.get(f"{server.v1}/models", timeout=10).json()["data"]}
    assert listed["tiny+tiny-lora"]["loaded"] is False


def test_unload_of_a_base_its_variants_hold_names_them(server: RunningServer) -> None:
    assert cli("launch", "tiny+tiny-lora", "--url", server.url).returncode == 0
    refused = cli("unload", "tiny", "--url", server.url)
    assert refused.returncode == 1
    assert "tiny+tiny-lora" in refused.stderr and "Traceback" not in refused.stderr
    assert cli("unload", "tiny+tiny-lora", "--url", server.url).returncode == 0


def test_pull_demo_without_demo_flag_says_to_pass_it(tmp_path: Path) -> None:
    result = cli("pull", "demo", env={"PEFT_GATEWAY_CONFIG": "", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "--demo" in result.stderr and "Traceback" not in result.stderr


def test_pull_of_a_hub_model_no_config_names_fails_before_downloading(tmp_path: Path) -> None:
    # No Hub is reachable here: a download attempt would fail differently (exit 1, a network error).
    result = cli("pull", "some-org/some-model", env={"PEFT_GATEWAY_CONFIG": "", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "add it to your config" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "hub").exists()


def test_chat_reads_piped_lines_and_keeps_history(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engines.engine import Engine

    sent: list[list[tuple[str, str | None]]] = []  # the messages of each chat request the server got
    real_chat_request = Engine.chat_request

    def recording(self: Engine, lease: Any, messages: list[Any], **kwargs: Any) -> Any:
        sent.append([(m.role, m.content) for m in messages])
        return real_chat_request(self, lease, messages, **kwargs)

    monkeypatch.setattr(Engine, "chat_request", recording)  # the server runs in this process
    result = cli(
        "chat",
        "tiny",
        "--url",
        server.url,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        stdin="hello\nagain\n/reset\nsecond message\n/exit\nnever sent\n",
    )
    assert result.returncode == 0, result.stderr
    assert "history cleared" in result.stderr
    assert len(sent) == 3 and len(result.stdout.splitlines()) == 3  # one per message before /exit
    first_reply = sent[1][1][1]
    assert sent == [
        [("user", "hello")],
        [("user", "hello"), ("assistant", first_reply), ("user", "again")],  # the reply is kept
        [("user", "second message")],  # /reset cleared the history
    ]
    assert result.stdout.startswith(f"{first_reply}\n")  # the reply kept is the one printed


def test_errors_are_one_line_with_meaningful_exit_codes(server: RunningServer) -> None:
    refused = cli("launch", "nope", "--url", server.url)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "404" in refused.stderr and "Traceback" not in refused.stderr
    unreachable = cli("models", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
    usage = cli("launch", "tiny+a", "--peft-model-id", "b", "--url", server.url)
    assert usage.returncode == 2


def test_api_key_from_environment(start_server: Any, tiny_models: TinyModels) -> None:
    settings = tiny_settings(tiny_models)
    locked = start_server(
        settings.model_copy(update={"server": settings.server.model_copy(update={"api_keys": ["k1"]})})
    )
    assert cli("models", "--url", locked.url).returncode == 1
    assert cli("models", env={"PEFT_GATEWAY_URL": locked.url, "PEFT_GATEWAY_API_KEY": "k1"}).returncode == 0


def test_serve_starts_from_a_config_file_and_bad_config_fails_fast(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    result = cli("serve", "--config", str(bad))
    assert result.returncode == 2 and "server.prot" in result.stderr and str(bad) in result.stderr
    config = tmp_path / "good.toml"
    config.write_text(f'[models.tiny]\nsource = "{tiny_models.base}"\ndtype = "float32"\n')
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("serve did not come up")
        ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]]
        assert ids == ["tiny"]
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert (
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat, timeout=60).status_code
            == 200
        )
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=30)
    access = [line for line in err.splitlines() if '"path": "/v1/models"' in line]
    assert access and '"request_id"' in access[0] and '"status": 200' in access[0]
    chat_line = json.loads(
        next(line for line in err.splitlines() if '"path": "/v1/chat/completions"' in line)
    )
    assert (
        chat_line["model"] == "tiny"
        and chat_line["prompt_tokens"] > 0
        and 0 < chat_line["completion_tokens"] <= 3
    )
    assert chat_line["latency_ms"] > 0 and chat_line["method"] == "POST"


def test_pull_downloads_an_adapter_into_the_hf_cache(tmp_path: Path, tiny_models: TinyModels) -> None:
    from tests.hub_server import HubServer

    config = tmp_path / "pull.toml"
    config.write_text(f'[models.tiny]\nsource = "{tiny_models.base}"\naliases = ["test-org/tiny-base"]\n')
    hf_home = tmp_path / "hf"
    env = {"HF_ENDPOINT": "", "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with HubServer() as hub:
        hub.add_repo("test-org/tiny-lora", tiny_models.adapter)
        env["HF_ENDPOINT"] = hub.url
        result = cli(
            "pull", "tiny", "--peft-model-id", "test-org/tiny-lora", "--config", str(config), env=env
        )
        assert result.returncode == 0, result.stderr
        assert list(
            (hf_home / "hub").glob("models--test-org--tiny-lora/snapshots/*/adapter_model.safetensors")
        )
        missing = cli("pull", "tiny+test-org/nope", "--config", str(config), "--adapter-only", env=env)
        assert (
            missing.returncode == 1
            and "does not exist" in missing.stderr
            and "Traceback" not in missing.stderr
        )


def test_launch_sends_the_admin_key_and_says_why_without_one(server: RunningServer) -> None:
    without = cli("launch", "tiny", "--url", server.url, env={"PEFT_GATEWAY_ADMIN_KEY": ""})
    assert without.returncode == 1 and "401" in without.stderr and "admin key" in without.stderr
    flag = cli(
        "launch", "tiny", "--url", server.url, "--admin-key", ADMIN_KEY, env={"PEFT_GATEWAY_ADMIN_KEY": ""}
    )
    assert flag.returncode == 0, flag.stderr
    assert cli("unload", "tiny", "--url", server.url, "--admin-key", "wrong").returncode == 1
