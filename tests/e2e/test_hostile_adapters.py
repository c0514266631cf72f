"""Hostile adapters and a misbehaving Hub through the real HTTP API and the openai SDK.

Malformed configs are 400s naming the field, never 500s; one bad folder in the HF cache does not break
``/v1/models``; clients never see server paths; a Hub that sends wrong bytes or cannot be reached gets
a 502 the SDK does not retry; invented model names neither become metric series nor reach the Hub twice.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from gateway.settings import HubSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, tiny_settings
from tests.hub_server import HubServer, use_hub_server

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]
REPO = "test-org/tiny-lora"


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Path:
    """An adapter root of our own: the tiny adapter, and copies of it with one config field broken."""
    root = tmp_path_factory.mktemp("hostile-adapters")
    shutil.copytree(tiny_models.adapter, root / "good")
    config = json.loads((tiny_models.adapter / "adapter_config.json").read_text())
    broken: dict[str, Any] = {
        "int-targets": {"target_modules": 5},
        "bad-regex": {"target_modules": "(unclosed"},
        "list-rank-pattern": {"rank_pattern": ["q_proj", 8]},
        "string-alpha": {"lora_alpha": "16"},
        "string-rslora": {"use_rslora": "yes"},
        "pattern-alpha": {"alpha_pattern": {"q_proj": "x"}},
        "layers": {"layers_to_transform": "0"},
    }
    for name, change in broken.items():
        folder = root / name
        shutil.copytree(tiny_models.adapter, folder)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    nested = root / "nested"
    shutil.copytree(tiny_models.adapter, nested)
    (nested / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    return root


@pytest.fixture(scope="module")
def hub(tiny_models: TinyModels) -> Iterator[HubServer]:
    server = HubServer().start()
    server.add_repo(REPO, tiny_models.adapter)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(start_server: Any, tiny_models: TinyModels, roots: Path) -> RunningServer:
    settings = tiny_settings(tiny_models, hub=HubSettings(fetch_timeout=30, negative_cache_seconds=60))
    settings.adapter_dirs.append(roots)
    server: RunningServer = start_server(settings)
    return server


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, hub: HubServer, tmp_path: Path) -> Path:
    hub.heal()
    return use_hub_server(monkeypatch, hub, tmp_path / "hf")


def unload(gateway: RunningServer, model: str) -> None:
    """Unload ``model`` through the admin route, which must say it did."""
    response = httpx.post(f"{gateway.v1}/unload_model", json={"model": model}, headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": model, "unloaded": True, "freed": True}


def chat(gateway: RunningServer, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": model, "messages": HELLO, "max_tokens": 2},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("int-targets", "target_modules"),
        ("bad-regex", "target_modules"),
        ("list-rank-pattern", "rank_pattern"),
        ("string-alpha", "lora_alpha"),
        ("string-rslora", "use_rslora"),
        ("pattern-alpha", "alpha_pattern"),
        ("layers", "layers_to_transform"),
        ("nested", "nested"),
    ],
)
def test_malformed_config_is_a_400_naming_the_field_and_no_path(
    gateway: RunningServer, roots: Path, name: str, field: str
) -> None:
    refused = chat(gateway, f"tiny+{name}")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert field in error["message"] and f"'{name}'" in error["message"]
    assert error["code"] == "invalid_adapter" and error["param"] == "model"
    assert str(roots) not in refused.text and "/tmp" not in refused.text


def test_a_hostile_config_in_the_hf_cache_does_not_break_model_listing(
    gateway: RunningServer, online: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engines.engine

    assert chat(gateway, f"tiny+{REPO}").status_code == 200  # one good adapter in the cache
    unload(gateway, f"tiny+{REPO}")  # listed from here on only because the cache holds it
    for name, text in {
        "nested": '{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "typed": json.dumps({"peft_type": "LORA", "r": 4, "target_modules": 5}),
    }.items():
        folder = online / f"models--test-org--{name}" / "snapshots" / ("a" * 40)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(text)
    monkeypatch.setattr(engines.engine, "CACHE_SCAN_SECONDS", 0.0)
    listed = httpx.get(f"{gateway.v1}/models", timeout=10)
    assert listed.status_code == 200, listed.text
    rows = {m["id"]: m for m in listed.json()["data"]}
    assert not {"tiny+test-org/nested", "tiny+test-org/typed"} & set(rows)
    assert rows[f"tiny+{REPO}"]["loaded"] is False and rows[f"tiny+{REPO}"]["cached"] is True


def test_models_list_and_errors_show_names_not_server_paths(
    gateway: RunningServer, roots: Path, tiny_models: TinyModels
) -> None:
    assert chat(gateway, "tiny+good").status_code == 200
    assert chat(gateway, "tiny+tiny-lora").status_code == 200
    listed = httpx.get(f"{gateway.v1}/models", timeout=10).json()["data"]
    roots_by_id = {m["id"]: m["root"] for m in listed}
    assert roots_by_id["tiny"] == "tiny"
    assert roots_by_id["tiny+tiny-lora"] == "tiny-lora"
    assert roots_by_id["tiny+good"] == "good"
    text = json.dumps(listed)
    assert str(tiny_models.base) not in text and str(roots) not in text and "/tmp" not in text
    mismatched = chat(gateway, "tiny+other-base-lora")
    assert mismatched.status_code == 400 and "other-org/other-model" in mismatched.text
    assert str(tiny_models.base) not in mismatched.text and "/tmp" not in mismatched.text
    for model in ("tiny+./missing/folder", "tiny+/etc/passwd", "tiny+~/x"):
        refused = chat(gateway, model)
        assert refused.status_code in (400, 404), refused.text
        assert str(roots) not in refused.text and str(tiny_models.adapter_dirs) not in refused.text
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert str(roots) not in metrics and str(tiny_models.adapter) not in metrics


def test_wrong_bytes_from_the_hub_are_a_502_and_nothing_is_cached(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    hub.fail(REPO, "corrupt", files=["adapter_model.safetensors"])
    refused = chat(gateway, f"tiny+{REPO}@main")
    assert refused.status_code == 502, refused.text
    assert refused.json()["error"]["code"] == "upstream_integrity_error"
    assert refused.headers.get("x-should-retry") == "false" and "retry-after" not in refused.headers
    assert not list(online.glob("models--test-org--tiny-lora/snapshots/*/adapter_model.safetensors"))
    hub.heal()
    assert chat(gateway, f"tiny+{REPO}@main").status_code == 200
    unload(gateway, f"tiny+{REPO}@main")


def test_an_unreachable_hub_is_a_502_the_sdk_does_not_retry(
    gateway: RunningServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gone = HubServer().start()
    gone.stop()  # nothing listens on its port any more: connection refused
    use_hub_server(monkeypatch, gone, tmp_path / "hf")
    refused = chat(gateway, "tiny+test-org/unreachable-1")
    assert refused.status_code == 502, refused.text
    error = refused.json()["error"]
    assert error["code"] == "upstream_unreachable" and "connection refused" in error["message"]
    assert refused.headers.get("x-should-retry") == "false" and "retry-after" not in refused.headers

    sent: list[httpx2.Request] = []
    http_client = httpx2.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=gateway.v1, api_key="none", http_client=http_client, max_retries=2)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="tiny+test-org/unreachable-2", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert len(sent) == 1


def test_a_transient_hub_failure_keeps_retry_after(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    hub.fail(REPO, "error", on="api", status=503)
    refused = chat(gateway, f"tiny+{REPO}@transient")
    assert refused.status_code == 503 and refused.headers.get("retry-after")
    assert "x-should-retry" not in refused.headers


def test_invented_names_make_no_series_and_are_asked_of_the_hub_once(
    gateway: RunningServer, hub: HubServer, online: Path
) -> None:
    hub.clear_requests()
    for index in range(20):
        assert chat(gateway, f"tiny+test-org/nonexistent-{index}").status_code == 404
    for _ in range(5):
        assert chat(gateway, "tiny+test-org/nonexistent-0").status_code == 404
    asked = {r.repo_id for r in hub.requests}
    assert len([r for r in hub.requests if r.repo_id == "test-org/nonexistent-0"]) == 1
    assert len(asked) == 20
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert "nonexistent" not in metrics
    assert 'peft_gateway_cache_misses_total{model="other"}' in metrics


def test_cancel_fetches_frees_a_request_waiting_on_a_stalled_hub(
    start_server: Any, tiny_models: TinyModels, hub: HubServer, online: Path
) -> None:
    import threading
    import time

    from engines.engine import Engine

    own: RunningServer = start_server(tiny_settings(tiny_models, hub=HubSettings(fetch_timeout=120)))
    assert chat(own, "tiny").status_code == 200  # base loaded: only the fetch is left to wait on
    hub.fail(REPO, "stall", stall_s=None)  # held until healed: only the cancel can end the wait
    engine: Engine = own.app.state.engine  # type: ignore[attr-defined]
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(chat(own, f"tiny+{REPO}@stalled")))
    waiting.start()
    try:
        deadline = time.monotonic() + 60
        while not hub.stalled(REPO):  # the fetch is at the Hub, waiting for an answer
            assert waiting.is_alive() and time.monotonic() < deadline, answers
            time.sleep(0.01)
        cancelled = time.monotonic()
        engine.cancel_fetches()
        waiting.join(timeout=30)
        assert answers, "cancel_fetches did not free the waiting request"
        assert time.monotonic() - cancelled < 3
        assert hub.stalled(REPO) == 1  # answered while the Hub still held the fetch
    finally:
        hub.heal()
        waiting.join(timeout=30)
    refused = answers[0]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "fetch_cancelled"
    assert "was cancelled" in refused.json()["error"]["message"]  # cut short, not refused up front


class NotATensor:
    """A global that torch's weights-only unpickler refuses to rebuild."""


@pytest.fixture(scope="module")
def refusing_root(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Path:
    """An adapter root whose every folder is refused, each at a different check (some one level down)."""
    import torch
    from safetensors.torch import load_file, save_file

    from engines.testing.tiny import TinyShape, save_tiny_adapter, save_tiny_base

    root = tmp_path_factory.mktemp("refused-adapters")
    tensors = load_file(str(tiny_models.adapter / "adapter_model.safetensors"))

    def copy(name: str, source: Path = tiny_models.adapter) -> Path:
        shutil.copytree(source, root / name)
        return root / name

    def pickled(name: str, state: Any) -> None:
        folder = copy(name)
        (folder / "adapter_model.safetensors").unlink()
        torch.save(state, folder / "adapter_model.bin")

    pickled("pickled", {**tensors, "extra": NotATensor()})
    pickled("team/not-tensors", {**tensors, "note": [1, 2, 3]})
    damaged = copy("damaged-pickle")
    (damaged / "adapter_model.safetensors").unlink()
    (damaged / "adapter_model.bin").write_bytes(b"this is not a pickle")
    corrupt = copy("team/corrupt-weights")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    bigger = {
        k: torch.zeros(64, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 64)
        for k, v in tensors.items()
    }
    save_file(bigger, str(copy("rank-mismatch") / "adapter_model.safetensors"))
    save_file({}, str(copy("no-matrices") / "adapter_model.safetensors"))
    halves = {k: v for k, v in tensors.items() if "lora_A" in k}
    save_file(halves, str(copy("half-pairs") / "adapter_model.safetensors"))
    partial = {k: v for k, v in tensors.items() if ".layers.0." in k}
    save_file(partial, str(copy("partial") / "adapter_model.safetensors"))
    config = json.loads((tiny_models.adapter / "adapter_config.json").read_text())
    (copy("bad-config") / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "16"}))
    copy("other-base", tiny_models.mismatched_adapter)
    wide = save_tiny_base(tmp_path_factory.mktemp("wide") / "base", TinyShape(hidden_size=128))
    save_tiny_adapter(wide, root / "team" / "wide", base_model_name_or_path="test-org/tiny-base")
    return root


@pytest.fixture(scope="module")
def refusing_gateway(start_server: Any, tiny_models: TinyModels, refusing_root: Path) -> RunningServer:
    """The refusing root on a base that merges adapters and one that serves them unmerged."""
    from gateway.settings import ModelSettings, Settings

    settings = Settings(
        models={
            "tiny": ModelSettings(source=str(tiny_models.base), dtype="float32"),
            "tiny-multi": ModelSettings(source=str(tiny_models.base), dtype="float32", adapter_mode="multi"),
        },
        adapter_dirs=[refusing_root],
    )
    server: RunningServer = start_server(settings)
    return server


REFUSED = [
    "pickled",
    "team/not-tensors",
    "damaged-pickle",
    "team/corrupt-weights",
    "rank-mismatch",
    "no-matrices",
    "half-pairs",
    "bad-config",
    "other-base",
    "team/wide",
]


@pytest.mark.parametrize(
    ("base", "name"),
    [("tiny", name) for name in [*REFUSED, "partial"]] + [("tiny-multi", name) for name in REFUSED],
)
def test_every_refusal_of_a_local_adapter_names_it_as_the_client_did_and_not_its_folder(
    refusing_gateway: RunningServer, refusing_root: Path, base: str, name: str
) -> None:
    refused = chat(refusing_gateway, f"{base}+{name}")
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert f"Adapter '{name}'" in message, message
    assert str(refusing_root) not in refused.text and str(refusing_root.resolve()) not in refused.text
    assert "/tmp" not in refused.text, message
