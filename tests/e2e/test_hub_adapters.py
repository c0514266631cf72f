"""Hub adapters through the real HTTP API: each refusal is a clear 4xx/503, and the same request then works.

The gateway runs in this process, so ``use_hub_server`` can point its real ``huggingface_hub`` client at a
local server speaking the Hub's file protocol.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import HubSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, tiny_settings
from tests.hub_server import HubServer, use_hub_server

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]
REPO = "test-org/tiny-lora"


@pytest.fixture(scope="module")
def hub(tiny_models: TinyModels) -> Iterator[HubServer]:
    server = HubServer().start()
    server.add_repo(REPO, tiny_models.adapter, extra_files={"pytorch_model.bin": b"decoy base weights"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    # No negative cache: these tests heal the Hub and ask again at once (tests/e2e/test_hostile_adapters.py
    # checks the cache itself).
    server: RunningServer = start_server(
        tiny_settings(tiny_models, hub=HubSettings(negative_cache_seconds=0))
    )
    return server


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, hub: HubServer, tmp_path: Path) -> Path:
    hub.heal()
    return use_hub_server(monkeypatch, hub, tmp_path / "hf")


def chat(gateway: RunningServer, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": model, "messages": HELLO, "max_tokens": 2},
        timeout=60,
    )


def unload(gateway: RunningServer, model: str) -> None:
    httpx.post(f"{gateway.v1}/unload_model", json={"model": model}, timeout=10, headers=ADMIN)


def test_hub_adapter_downloads_only_adapter_files_into_the_hf_cache(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    hub.clear_requests()
    response = chat(gateway, f"tiny+{REPO}")
    assert response.status_code == 200, response.text
    assert hub.requested_files(REPO) <= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    snapshots = list((online / "models--test-org--tiny-lora" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "adapter_config.json").is_file()
    assert not (snapshots[0] / "pytorch_model.bin").exists()
    models = {m["id"]: m for m in httpx.get(f"{gateway.v1}/models", timeout=10).json()["data"]}
    assert models[f"tiny+{REPO}"]["parent"] == "tiny" and models[f"tiny+{REPO}"]["root"] == REPO
    unload(gateway, f"tiny+{REPO}")


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("not_found", 404, "model_not_found"),
        ("gated", 400, "adapter_access_denied"),
        ("unauthorized", 400, "adapter_access_denied"),
        ("error", 503, "upstream_unavailable"),
    ],
)
def test_hub_failures_are_clear_and_then_the_same_request_succeeds(
    gateway: RunningServer, hub: HubServer, online: Path, mode: str, status: int, code: str
) -> None:
    hub.fail(REPO, mode, on="api")
    refused = chat(gateway, f"tiny+{REPO}")
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["code"] == code and error["param"] == "model" and REPO in error["message"]
    assert not list(online.glob("models--test-org--tiny-lora/snapshots/*/adapter_model.safetensors"))
    assert chat(gateway, "tiny").status_code == 200  # still serving
    hub.heal()
    assert chat(gateway, f"tiny+{REPO}").status_code == 200
    unload(gateway, f"tiny+{REPO}")


def test_cut_download_leaves_nothing_partial_and_retry_works(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    hub.fail(REPO, "truncate", files=["adapter_model.safetensors"])
    refused = chat(gateway, f"tiny+{REPO}")
    assert refused.status_code == 503, refused.text
    assert not list(online.rglob("*.incomplete"))
    assert not list(online.glob("models--test-org--tiny-lora/snapshots/*/adapter_model.safetensors"))
    hub.heal()
    assert chat(gateway, f"tiny+{REPO}").status_code == 200
    unload(gateway, f"tiny+{REPO}")


def test_offline_serves_from_cache_and_says_when_it_cannot(
    gateway: RunningServer, hub: HubServer, online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    import engines.engine

    assert chat(gateway, f"tiny+{REPO}").status_code == 200  # populates the cache
    unload(gateway, f"tiny+{REPO}")
    monkeypatch.setattr(engines.engine, "CACHE_SCAN_SECONDS", 0.0)
    listed = {m["id"]: m for m in httpx.get(f"{gateway.v1}/models", timeout=10).json()["data"]}
    assert listed[f"tiny+{REPO}"]["cached"] is True and listed[f"tiny+{REPO}"]["loaded"] is False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.fail(REPO, "error")  # the Hub would fail; offline mode never asks it
    assert chat(gateway, f"tiny+{REPO}").status_code == 200
    missing = chat(gateway, "tiny+test-org/never-downloaded")
    assert missing.status_code == 404 and "HF_HUB_OFFLINE" in missing.json()["error"]["message"]


def test_not_a_lora_adapter_is_refused_before_any_weight_is_read(
    gateway: RunningServer, hub: HubServer, online: Path, tiny_models: TinyModels
) -> None:
    config = json.loads((tiny_models.adapter / "adapter_config.json").read_text())
    hub.add_repo(
        "test-org/prefix-tuning",
        {"adapter_config.json": json.dumps({**config, "peft_type": "PREFIX_TUNING"}).encode()},
    )
    refused = chat(gateway, "tiny+test-org/prefix-tuning")
    assert refused.status_code == 400 and "PREFIX_TUNING" in refused.json()["error"]["message"]
    hub.add_repo("test-org/prefix-tuning", tiny_models.adapter)  # fixed upstream
    assert chat(gateway, "tiny+test-org/prefix-tuning").status_code == 200
