"""Base models from the Hub (the README's main case) through the real HTTP API and a local fake Hub.

A ``[models.x] source = "org/base"`` is fetched with the real ``huggingface_hub`` client, pointed at
``tests/hub_server.py`` by ``use_hub_server``; the fake Hub records every request it answers, so the
revision asked for, the token sent and the files fetched can be checked from its side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import HubSettings, ModelSettings, ServerSettings, Settings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, ADMIN_KEY
from tests.hub_server import HubServer, use_hub_server

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]

BASE = "test-org/tiny-base"
PRIVATE = "test-org/private-base"
PICKLE_ONLY = "test-org/pickle-base"
CUSTOM = "test-org/custom-code-base"

#: The context a ``v2`` revision declares (``main`` has the tiny shape's 512): visible in ``/v1/models``.
V2_CONTEXT = 320


@dataclass(frozen=True)
class Repos:
    v2_sha: str
    main_sha: str
    marker: Path


def custom_code_files(base: Path, marker: Path) -> dict[str, bytes]:
    """The tiny base as a repo with its own code: an unknown ``model_type`` whose classes the repo ships.

    Its config and model classes write ``marker`` when they are made, so a test can tell whether the repo's
    code ran.
    """
    config = json.loads((base / "config.json").read_text())
    config.update(
        model_type="tiny-custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
    )
    # Written on every use (not only at import: Python imports a module once per process).
    touch = f"        pathlib.Path({str(marker)!r}).write_text('ran')\n"
    configuration = (
        "import pathlib\n\nfrom transformers import LlamaConfig\n\n\n"
        "class TinyCustomConfig(LlamaConfig):\n"
        '    model_type = "tiny-custom"\n\n'
        "    def __init__(self, **kwargs):\n"
        "        super().__init__(**kwargs)\n" + touch
    )
    modeling = (
        "import pathlib\n\nfrom transformers import LlamaForCausalLM\n\n"
        "from .configuration_tiny_custom import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n"
        "    config_class = TinyCustomConfig\n\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n" + touch
    )
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    files["config.json"] = json.dumps(config, indent=2).encode()
    files["configuration_tiny_custom.py"] = configuration.encode()
    files["modeling_tiny_custom.py"] = modeling.encode()
    return files


def pickle_only_folder(base: Path, folder: Path) -> Path:
    """The tiny base with its weights as ``pytorch_model.bin`` only (transformers 5 writes safetensors)."""
    import torch
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    torch.save(load_file(str(base / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def repos(hub: HubServer, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Repos:
    from engines.testing.tiny import TinyShape, save_tiny_base

    root = tmp_path_factory.mktemp("hub-bases")
    # A Llama-2 repo ships its weights twice: safetensors and the older pickle format.
    decoy = {"pytorch_model.bin": b"\x80\x02pickle copy of the same weights" * 64}
    main_sha = hub.add_repo(BASE, tiny_models.base, extra_files=decoy)
    v2 = save_tiny_base(root / "v2", TinyShape(max_position_embeddings=V2_CONTEXT), seed=3)
    v2_sha = hub.add_repo(BASE, v2, revision="v2", extra_files=decoy)
    hub.add_repo(PRIVATE, tiny_models.base)
    hub.add_repo(PICKLE_ONLY, pickle_only_folder(tiny_models.base, root / "pickle"))
    marker = root / "custom-code-ran"
    hub.add_repo(CUSTOM, custom_code_files(tiny_models.base, marker))
    return Repos(v2_sha=v2_sha, main_sha=main_sha, marker=marker)


def hub_model(source: str, **fields: Any) -> ModelSettings:
    return ModelSettings(source=source, dtype="float32", **fields)


@pytest.fixture(scope="module")
def gateway(start_server: Any, repos: Repos) -> RunningServer:
    settings = Settings(
        models={
            "hub-base": hub_model(BASE),
            "hub-v2": hub_model(BASE, revision="v2"),
            "hub-sha": hub_model(BASE, revision=repos.v2_sha),
            "hub-main": hub_model(BASE),
            "hub-private": hub_model(PRIVATE, token="hf_model_token"),
            "hub-envtoken": hub_model(PRIVATE),
            "hub-pickle": hub_model(PICKLE_ONLY),
            "custom-off": hub_model(CUSTOM),
            "custom-on": hub_model(CUSTOM, trust_remote_code=True),
        },
        server=ServerSettings(admin_keys=[ADMIN_KEY]),
        hub=HubSettings(negative_cache_seconds=0),
    )
    server: RunningServer = start_server(settings)
    return server


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, hub: HubServer, tmp_path: Path) -> Path:
    hub.heal()
    hub.clear_requests()
    return use_hub_server(monkeypatch, hub, tmp_path / "hf", timeout_s=10)


def chat(gateway: RunningServer, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": model, "messages": HELLO, "max_tokens": 2},
        timeout=120,
    )


def card(gateway: RunningServer, model: str) -> dict[str, Any]:
    cards = {m["id"]: m for m in httpx.get(f"{gateway.v1}/models", timeout=10).json()["data"]}
    return cards[model]


def unload(gateway: RunningServer, model: str) -> None:
    httpx.post(f"{gateway.v1}/unload_model", json={"model": model}, timeout=10, headers=ADMIN)


def authorizations(hub: HubServer, repo_id: str) -> list[str | None]:
    """The ``Authorization`` header of every request for ``repo_id`` (httpx sends it in lower case)."""
    return [
        next((value for name, value in r.headers.items() if name.lower() == "authorization"), None)
        for r in hub.requests
        if r.repo_id == repo_id
    ]


def snapshots(cache: Path, repo_id: str) -> list[Path]:
    folder = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_hub_base_is_fetched_into_the_hf_cache_and_served(
    gateway: RunningServer, hub: HubServer, repos: Repos, online: Path
) -> None:
    response = chat(gateway, "hub-base")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None
    assert [s.name for s in snapshots(online, BASE)] == [repos.main_sha]
    assert (snapshots(online, BASE)[0] / "model.safetensors").is_file()
    listed = card(gateway, "hub-base")
    assert listed["loaded"] is True and listed["root"] == BASE and listed["max_model_len"] == 512
    unload(gateway, "hub-base")


def test_a_base_shipping_safetensors_and_bin_downloads_only_the_safetensors(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    response = chat(gateway, "hub-main")
    assert response.status_code == 200, response.text
    fetched = hub.requested_files(BASE)
    assert "model.safetensors" in fetched
    assert not [name for name in fetched if name.endswith(".bin")], fetched
    assert not list(online.rglob("pytorch_model.bin"))
    unload(gateway, "hub-main")


def test_a_base_shipping_only_bin_weights_still_downloads_and_loads_them(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    response = chat(gateway, "hub-pickle")
    assert response.status_code == 200, response.text
    assert "pytorch_model.bin" in hub.downloads(PICKLE_ONLY)
    unload(gateway, "hub-pickle")


@pytest.mark.parametrize("model", ["hub-v2", "hub-sha"])
def test_a_pinned_revision_is_the_one_fetched_and_served(
    gateway: RunningServer, hub: HubServer, repos: Repos, online: Path, model: str
) -> None:
    response = chat(gateway, model)
    assert response.status_code == 200, response.text
    assert card(gateway, model)["max_model_len"] == V2_CONTEXT  # v2's config, not main's
    assert [s.name for s in snapshots(online, BASE)] == [repos.v2_sha]
    asked = {r.revision for r in hub.requests if r.repo_id == BASE}
    assert asked and asked <= {"v2", repos.v2_sha}, asked
    unload(gateway, model)


def test_a_model_token_is_sent_to_the_hub_on_every_request(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    response = chat(gateway, "hub-private")
    assert response.status_code == 200, response.text
    sent = authorizations(hub, PRIVATE)
    assert sent and set(sent) == {"Bearer hf_model_token"}, sent
    unload(gateway, "hub-private")


def test_hf_token_is_sent_when_the_model_has_no_token(
    gateway: RunningServer, hub: HubServer, online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_environment_token")
    response = chat(gateway, "hub-envtoken")
    assert response.status_code == 200, response.text
    sent = authorizations(hub, PRIVATE)
    assert sent and set(sent) == {"Bearer hf_environment_token"}, sent
    unload(gateway, "hub-envtoken")


def test_repo_code_is_refused_and_not_run_without_trust_remote_code(
    gateway: RunningServer, repos: Repos, online: Path
) -> None:
    repos.marker.unlink(missing_ok=True)
    refused = chat(gateway, "custom-off")
    assert refused.status_code >= 400, refused.text
    assert "trust_remote_code" in refused.json()["error"]["message"]
    assert not repos.marker.exists(), "the repo's code ran although trust_remote_code is off"
    assert card(gateway, "custom-off")["loaded"] is False


def test_repo_code_runs_with_trust_remote_code(gateway: RunningServer, repos: Repos, online: Path) -> None:
    repos.marker.unlink(missing_ok=True)
    response = chat(gateway, "custom-on")
    assert response.status_code == 200, response.text
    assert repos.marker.read_text() == "ran"
    unload(gateway, "custom-on")


def test_pull_downloads_a_configured_hub_base_without_its_bin_copy(
    hub: HubServer, repos: Repos, tmp_path: Path
) -> None:
    config = tmp_path / "pull.toml"
    config.write_text(f'[models.hub-base]\nsource = "{BASE}"\nrevision = "v2"\n')
    hf_home = tmp_path / "hf"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_TOKEN", None)
    hub.clear_requests()
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "pull", "hub-base", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    folder = hf_home / "hub" / "models--test-org--tiny-base" / "snapshots" / repos.v2_sha
    assert result.stdout.strip() == f"base hub-base: {folder}"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not (folder / "pytorch_model.bin").exists()
    assert not [name for name in hub.requested_files(BASE) if name.endswith(".bin")]
