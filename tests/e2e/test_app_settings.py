"""Settings reach the engine and the middleware: servers started from a TOML config through
``load_settings``, observed over HTTP and on ``app.state.engine``; and ``/ready`` failing its checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import load_settings
from tests.conftest import RunningServer, TinyModels
from tests.e2e.conftest import ADMIN, ADMIN_KEY

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hi"}]
ALLOWED = "http://allowed.test"


def models_toml(tiny_models: TinyModels) -> str:
    return (
        f'[models.tiny]\nsource = "{tiny_models.base}"\ndtype = "float32"\naliases = ["test-org/tiny-base"]\n'
        f'[models.tiny-two]\nsource = "{tiny_models.base}"\ndtype = "float32"\n'
    )


def start_from_toml(start_server: Any, tmp_path: Path, body: str) -> RunningServer:
    path = tmp_path / "config.toml"
    path.write_text(body)
    server: RunningServer = start_server(load_settings(path))
    return server


@pytest.fixture(scope="module")
def policy_adapters(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter folder root: a pickle-only adapter (rank 4), a rank-8 and a rank-4 safetensors one."""
    import torch
    from safetensors.torch import load_file

    from engines.testing.tiny import save_tiny_adapter

    root = tmp_path_factory.mktemp("policy-adapters")
    pickle = root / "pickle-lora"
    pickle.mkdir()
    (pickle / "adapter_config.json").write_bytes((tiny_models.adapter / "adapter_config.json").read_bytes())
    torch.save(
        load_file(str(tiny_models.adapter / "adapter_model.safetensors")), pickle / "adapter_model.bin"
    )
    save_tiny_adapter(
        tiny_models.base, root / "wide-lora", rank=8, base_model_name_or_path="test-org/tiny-base"
    )
    save_tiny_adapter(
        tiny_models.base, root / "narrow-lora", rank=4, base_model_name_or_path="test-org/tiny-base"
    )
    return root


@pytest.fixture(scope="module")
def policy_server(
    start_server: Any,
    tiny_models: TinyModels,
    policy_adapters: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningServer:
    body = (
        f'adapter_dirs = ["{policy_adapters}"]\nallow_pickle = false\nmax_rank = 4\n'
        f'[server]\ncors_origins = ["{ALLOWED}"]\nadmin_keys = ["{ADMIN_KEY}"]\n' + models_toml(tiny_models)
    )
    return start_from_toml(start_server, tmp_path_factory.mktemp("policy"), body)


@pytest.fixture(scope="module")
def engine_server(
    start_server: Any, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    body = (
        f'[server]\nadmin_keys = ["{ADMIN_KEY}"]\n'
        '[cache]\nmax_models = 1\n[engine]\nprefill_chunk = 32\nprefix_cache = "1MiB"\nlean_decode = false\n'
        + models_toml(tiny_models)
    )
    return start_from_toml(start_server, tmp_path_factory.mktemp("engine"), body)


def chat(server: RunningServer, model: str) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2}, timeout=60
    )


def complete(server: RunningServer, model: str, prompt: list[int]) -> httpx.Response:
    response = httpx.post(
        f"{server.v1}/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response


def loaded(server: RunningServer) -> dict[str, bool]:
    cards = httpx.get(f"{server.v1}/models", timeout=10).json()["data"]
    return {card["id"]: card["loaded"] for card in cards}


def loaded_model(server: RunningServer, key: str) -> Any:
    engine: Any = server.app.state.engine  # type: ignore[attr-defined]
    return next(entry.loaded for entry in engine.pool.entries() if entry.key == key)


# ----------------------------------------------------------------------------- adapter policy


def test_allow_pickle_false_refuses_a_pickle_only_adapter(policy_server: RunningServer) -> None:
    assert policy_server.app.state.engine.catalog.policy.allow_pickle is False  # type: ignore[attr-defined]
    refused = chat(policy_server, "tiny+pickle-lora")
    assert refused.status_code == 400, refused.text
    assert "allow_pickle = false" in refused.json()["error"]["message"]


def test_max_rank_refuses_an_adapter_above_it_and_serves_one_at_it(policy_server: RunningServer) -> None:
    assert policy_server.app.state.engine.catalog.policy.max_rank == 4  # type: ignore[attr-defined]
    refused = chat(policy_server, "tiny+wide-lora")
    assert refused.status_code == 400, refused.text
    assert "max_rank" in refused.json()["error"]["message"] and "8" in refused.json()["error"]["message"]
    served = chat(policy_server, "tiny+narrow-lora")
    assert served.status_code == 200, served.text


# ----------------------------------------------------------------------------- CORS


def test_an_origin_on_the_cors_list_is_allowed(policy_server: RunningServer) -> None:
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST"}
    answer = httpx.options(f"{policy_server.v1}/chat/completions", headers=preflight, timeout=10)
    assert answer.status_code == 200
    assert answer.headers.get("access-control-allow-origin") == ALLOWED
    simple = httpx.get(f"{policy_server.v1}/models", headers={"Origin": ALLOWED}, timeout=10)
    assert simple.headers.get("access-control-allow-origin") == ALLOWED


def test_an_origin_off_the_cors_list_is_refused(policy_server: RunningServer) -> None:
    preflight = {"Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"}
    answer = httpx.options(f"{policy_server.v1}/chat/completions", headers=preflight, timeout=10)
    assert answer.status_code == 400
    assert "access-control-allow-origin" not in answer.headers
    simple = httpx.get(f"{policy_server.v1}/models", headers={"Origin": "http://elsewhere.test"}, timeout=10)
    assert "access-control-allow-origin" not in simple.headers


# ----------------------------------------------------------------------------- [cache] and [engine]


def test_max_models_evicts_the_idle_model_for_the_next_one(engine_server: RunningServer) -> None:
    assert engine_server.app.state.engine.pool.max_models == 1  # type: ignore[attr-defined]
    assert chat(engine_server, "tiny").status_code == 200
    assert chat(engine_server, "tiny-two").status_code == 200
    state = loaded(engine_server)
    assert state["tiny-two"] is True and state["tiny"] is False


def test_prefill_chunk_sets_where_a_shared_prefix_is_cut(engine_server: RunningServer) -> None:
    """With 32-token chunks, a prompt sharing 40 tokens with a cached one reuses exactly 32 of them."""
    assert engine_server.app.state.engine.scheduler.prefill_chunk == 32  # type: ignore[attr-defined]
    first = list(range(10, 90))
    complete(engine_server, "tiny", first)
    cache = loaded_model(engine_server, "tiny").prefix_cache
    before = cache.reused_tokens
    complete(engine_server, "tiny", first[:40] + list(range(100, 140)))
    assert cache.reused_tokens - before == 32


def test_prefix_cache_size_is_the_configured_one_and_a_repeated_prompt_hits_it(
    engine_server: RunningServer,
) -> None:
    prompt = list(range(20, 70))
    complete(engine_server, "tiny", prompt)
    cache = loaded_model(engine_server, "tiny").prefix_cache
    assert cache.max_bytes == 2**20
    hits = cache.hits
    complete(engine_server, "tiny", prompt)
    assert cache.hits == hits + 1


def test_lean_decode_false_keeps_the_engine_off_its_own_decode_step(
    engine_server: RunningServer, tiny_server: RunningServer
) -> None:
    for server in (engine_server, tiny_server):
        assert chat(server, "tiny").status_code == 200
    off: Any = engine_server.app.state.engine.scheduler  # type: ignore[attr-defined]
    on: Any = tiny_server.app.state.engine.scheduler  # type: ignore[attr-defined]
    assert off.lean_decode is False and len(off._decoders) == 0
    assert on.lean_decode is True and any(decoder is not None for decoder in on._decoders.values())


# ----------------------------------------------------------------------------- /ready


def test_ready_is_503_when_the_hf_cache_is_not_writable(
    tiny_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(blocker / "hub"))
    response = httpx.get(f"{tiny_server.url}/ready", timeout=10)
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready",
        "checks": {"config": True, "engine": True, "cache_writable": False},
    }
    monkeypatch.undo()
    assert httpx.get(f"{tiny_server.url}/ready", timeout=10).status_code == 200


def test_ready_is_503_when_the_engine_thread_is_not_alive(
    start_server: Any, tiny_models: TinyModels, tmp_path: Path
) -> None:
    server = start_from_toml(start_server, tmp_path, models_toml(tiny_models))
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
    server.app.state.engine.scheduler.close()  # type: ignore[attr-defined]
    response = httpx.get(f"{server.url}/ready", timeout=10)
    assert response.status_code == 503
    assert response.json()["checks"]["engine"] is False
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # alive, not ready


def test_admin_key_from_the_config_file_works(engine_server: RunningServer) -> None:
    assert chat(engine_server, "tiny-two").status_code == 200
    unloaded = httpx.post(
        f"{engine_server.v1}/unload_model", json={"model": "tiny-two"}, headers=ADMIN, timeout=10
    )
    assert unloaded.status_code == 200, unloaded.text
