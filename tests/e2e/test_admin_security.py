"""Admin routes cannot be used to take over other clients' model names, nor reached without an admin key."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from engines.errors import AdapterRejected
from gateway.settings import AdapterSettings, ServerSettings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, ADMIN_KEY, tiny_settings

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    settings = tiny_settings(tiny_models)
    models = {
        "tiny": settings.models["tiny"].model_copy(update={"aliases": ["test-org/tiny-base", "tiny-alias"]})
    }
    adapters = {
        "tiny-lora": settings.adapters["tiny-lora"],
        # A configured adapter alias with the name of a base alias: the base must still win.
        "tiny-alias": AdapterSettings(source=str(tiny_models.adapter), base="tiny"),
    }
    server_settings = ServerSettings(api_keys=["sk-user"], admin_keys=[ADMIN_KEY])
    result: RunningServer = start_server(
        settings.model_copy(update={"models": models, "adapters": adapters, "server": server_settings})
    )
    return result


USER = {"Authorization": "Bearer sk-user"}


def load(server: RunningServer, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.v1}/load_lora_adapter", json=body, headers=headers or ADMIN, timeout=60)


def greedy(server: RunningServer, model: str) -> str:
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": model, "messages": HELLO, "max_tokens": 6, "temperature": 0},
        headers=USER,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_admin_routes_are_off_without_admin_keys(start_server: Any, tiny_models: TinyModels) -> None:
    open_server: RunningServer = start_server(
        tiny_settings(tiny_models).model_copy(update={"server": ServerSettings()})
    )
    for path, body in [
        ("load_lora_adapter", {"lora_name": "x", "lora_path": "tiny-lora"}),
        ("unload_lora_adapter", {"lora_name": "tiny-lora"}),
        ("load_model", {"model": "tiny"}),
        ("unload_model", {"model": "tiny"}),
    ]:
        response = httpx.post(f"{open_server.v1}/{path}", json=body, timeout=10)
        assert response.status_code == 403, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "admin_disabled" and "admin_keys" in error["message"]


def test_admin_routes_need_an_admin_key_not_an_api_key(server: RunningServer) -> None:
    body = {"model": "tiny"}
    assert httpx.post(f"{server.v1}/load_model", json=body, timeout=10).status_code == 401
    by_user = httpx.post(f"{server.v1}/load_model", json=body, headers=USER, timeout=10)
    assert by_user.status_code == 403 and by_user.json()["error"]["code"] == "admin_key_required"
    assert httpx.post(f"{server.v1}/load_model", json=body, headers=ADMIN, timeout=60).status_code == 200
    # The admin key also passes where an API key is needed.
    assert httpx.get(f"{server.v1}/models", headers=ADMIN, timeout=10).status_code == 200


def test_json_routes_refuse_other_content_types(server: RunningServer) -> None:
    """A cross-site form or text/plain POST (no CORS preflight) must not act."""
    for path in ("load_lora_adapter", "chat/completions", "completions"):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {**ADMIN, **({"content-type": content_type} if content_type else {})}
            response = httpx.post(
                f"{server.v1}/{path}",
                content=b'{"lora_name": "csrf", "lora_path": "tiny-lora", "model": "tiny", "prompt": "x"}',
                headers=headers,
                timeout=10,
            )
            assert response.status_code == 415, (path, content_type, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
    ids = {m["id"] for m in httpx.get(f"{server.v1}/models", headers=USER, timeout=10).json()["data"]}
    assert "tiny+csrf" not in ids
    charset = httpx.post(
        f"{server.v1}/load_model",
        content=b'{"model": "tiny"}',
        headers={**ADMIN, "content-type": "application/json; charset=utf-8"},
        timeout=60,
    )
    assert charset.status_code == 200, charset.text


def test_an_adapter_cannot_take_a_base_name_or_alias(server: RunningServer) -> None:
    before = greedy(server, "tiny")
    for name in ("tiny", "tiny-alias"):
        for inplace in (False, True):
            response = load(server, lora_name=name, lora_path="tiny-lora", load_inplace=inplace)
            assert response.status_code in (400, 403), response.text
            assert response.json()["error"]["param"] == "lora_name"
    assert greedy(server, "tiny") == before


def test_a_base_alias_wins_over_an_adapter_alias_of_the_same_name(server: RunningServer) -> None:
    assert greedy(server, "tiny-alias") == greedy(server, "tiny")
    assert greedy(server, "tiny+tiny-alias") != greedy(server, "tiny")


def test_configured_aliases_cannot_be_replaced_or_removed(
    server: RunningServer, tiny_models: TinyModels
) -> None:
    before = greedy(server, "tiny+tiny-lora")
    replaced = load(server, lora_name="tiny-lora", lora_path="other-base-lora", load_inplace=True)
    assert replaced.status_code == 403 and replaced.json()["error"]["code"] == "alias_configured"
    removed = httpx.post(
        f"{server.v1}/unload_lora_adapter", json={"lora_name": "tiny-lora"}, headers=ADMIN, timeout=10
    )
    assert removed.status_code == 403 and removed.json()["error"]["code"] == "alias_configured"
    assert greedy(server, "tiny+tiny-lora") == before


def test_an_alias_cannot_hide_a_folder_under_the_adapter_roots(server: RunningServer) -> None:
    response = load(server, lora_name="other-base-lora", lora_path="tiny-lora")
    assert response.status_code == 400 and response.json()["error"]["code"] == "name_taken"


def test_a_runtime_alias_can_be_replaced_in_place_by_an_admin(server: RunningServer) -> None:
    assert load(server, lora_name="mine", lora_path="tiny-lora").status_code == 200
    clash = load(
        server, lora_name="mine", lora_path=str(server.app.state.settings.adapter_dirs[0] / "other-base-lora")
    )  # type: ignore[attr-defined]
    assert clash.status_code == 400 and clash.json()["error"]["code"] == "adapter_exists"


def test_a_failed_registration_undoes_only_its_own_alias(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow load that fails must not restore a catalog from before other registrations."""
    engine = server.app.state.engine  # type: ignore[attr-defined]
    real_acquire = engine.acquire
    started = threading.Event()

    async def slow_then_fail(model: str) -> Any:
        if model.endswith("+doomed"):
            started.set()
            await asyncio.sleep(1.5)
            raise AdapterRejected("refused after a while")
        return await real_acquire(model)

    monkeypatch.setattr(engine, "acquire", slow_then_fail)
    result: dict[str, httpx.Response] = {}
    doomed = threading.Thread(
        target=lambda: result.update(doomed=load(server, lora_name="doomed", lora_path="tiny-lora"))
    )
    doomed.start()
    assert started.wait(30)
    kept = load(server, lora_name="keeper", lora_path="tiny-lora")
    assert kept.status_code == 200, kept.text
    doomed.join(30)
    assert result["doomed"].status_code == 400
    assert engine.catalog.adapter_alias("keeper") is not None
    assert engine.catalog.adapter_alias("doomed") is None
    assert greedy(server, "keeper") == greedy(server, "tiny+keeper")
