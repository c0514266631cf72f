"""``engines.hub`` against a local Hub stand-in driven by the real ``huggingface_hub`` client.

Every test gets its own server (``tests/hub_server.py``) and its own HF cache; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines import hub as hub_module
from engines.adapters.files import AdapterRef, fetch_adapter, read_adapter_files
from engines.catalog import AdapterPolicy
from engines.errors import AdapterAccessDenied, EngineError, ModelNotFound, UpstreamUnavailable
from tests.hub_server import HubServer, use_hub_server

REPO = "test-org/tiny-lora"
ADAPTER_NAMES = {"adapter_config.json", "adapter_model.safetensors"}
#: What a careless download would fetch as well: a base model's weights and config, a model card.
DECOYS = {
    "pytorch_model.bin": b"\x80\x02pickle weights of a base model" * 64,
    "model.safetensors": b"base model weights" * 64,
    "config.json": b'{"model_type": "llama"}',
    "original/consolidated.00.pth": b"more base weights" * 64,
}


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: HubServer) -> Path:
    return use_hub_server(monkeypatch, hub, tmp_path / "hf-home")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter folder as ``save_pretrained`` writes it (made with numpy, so without loading torch)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("adapter")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "test-org/tiny-base",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(0)
    tensors = {
        f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight": rng.standard_normal(
            (4, 64) if part == "A" else (64, 4)
        ).astype(np.float32)
        for layer in range(2)
        for module in ("q_proj", "v_proj")
        for part in ("A", "B")
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    return folder


@pytest.fixture
def adapter_sha(hub: HubServer, adapter: Path) -> str:
    return hub.add_repo(REPO, adapter, extra_files=DECOYS)


def fetch(revision: str | None = None, **kwargs: Any) -> Path:
    return hub_module.snapshot(REPO, revision=revision, allow_patterns=hub_module.ADAPTER_FILES, **kwargs)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def repo_folder(cache: Path) -> Path:
    return cache / "models--test-org--tiny-lora"


def assert_complete(folder: Path, source: Path) -> None:
    """``folder`` holds exactly the adapter files, each identical to the source."""
    assert {p.name for p in folder.iterdir()} == ADAPTER_NAMES
    for name in ADAPTER_NAMES:
        assert (folder / name).read_bytes() == (source / name).read_bytes()


def assert_nothing_partial(cache: Path, source: Path) -> None:
    """No temporary download left behind, and every file the snapshot shows is complete."""
    storage = repo_folder(cache)
    assert not [p for p in storage.rglob("*") if p.name.endswith(".incomplete")]
    for snapshot in (storage / "snapshots").glob("*"):
        for path in snapshot.iterdir():
            assert path.read_bytes() == (source / path.name).read_bytes(), f"{path.name} is truncated"


# --------------------------------------------------------------------------------------------- success


def test_downloads_only_adapter_files_into_the_standard_cache_layout(
    cache: Path, hub: HubServer, adapter_sha: str, adapter: Path
) -> None:
    folder = fetch()

    assert folder == repo_folder(cache) / "snapshots" / adapter_sha
    assert_complete(folder, adapter)
    assert (repo_folder(cache) / "refs" / "main").read_text() == adapter_sha
    assert all(p.is_file() for p in (repo_folder(cache) / "blobs").iterdir())
    # Neither the decoys nor the model card were asked for, not even with a HEAD.
    assert hub.requested_files(REPO) == ADAPTER_NAMES
    assert sorted(hub.downloads(REPO)) == sorted(ADAPTER_NAMES)
    assert all(r.repo_id == REPO for r in hub.requests)


def test_fetch_adapter_with_a_hub_ref(cache: Path, hub: HubServer, adapter_sha: str) -> None:
    ref = AdapterRef(kind="hub", source=REPO)
    folder = fetch_adapter(ref)

    assert folder == repo_folder(cache) / "snapshots" / adapter_sha
    files = read_adapter_files(ref, folder, AdapterPolicy())
    assert files.weights_file.name == "adapter_model.safetensors"
    assert not set(hub.requested_files(REPO)) & set(DECOYS)


def test_a_second_fetch_downloads_nothing_again(cache: Path, hub: HubServer, adapter_sha: str) -> None:
    first = fetch()
    hub.clear_requests()
    assert fetch() == first
    assert hub.downloads(REPO) == []


def test_explicit_endpoint_and_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: HubServer, adapter_sha: str, cache: Path
) -> None:
    from huggingface_hub import constants

    # The defaults now lead nowhere: only the keywords can make this work.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    explicit = tmp_path / "explicit-cache"

    folder = fetch(endpoint=hub.url, cache_dir=explicit)

    assert folder == explicit / "models--test-org--tiny-lora" / "snapshots" / adapter_sha
    assert not repo_folder(cache).exists()


def test_revision_pins_branch_tag_and_commit(
    monkeypatch: pytest.MonkeyPatch, cache: Path, hub: HubServer, adapter_sha: str, adapter: Path
) -> None:
    v1_config = b'{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}'
    v1_sha = hub.add_repo(
        REPO, {"adapter_config.json": v1_config, "adapter_model.safetensors": b"v1"}, revision="v1"
    )
    assert v1_sha != adapter_sha

    v1 = fetch("v1")
    assert v1 == repo_folder(cache) / "snapshots" / v1_sha
    assert (v1 / "adapter_config.json").read_bytes() == v1_config
    assert (repo_folder(cache) / "refs" / "v1").read_text() == v1_sha

    hub.clear_requests()
    pinned = fetch(adapter_sha)
    assert pinned == repo_folder(cache) / "snapshots" / adapter_sha
    assert_complete(pinned, adapter)
    # A commit sha needs no resolving: the revision-info call is skipped.
    assert not [r for r in hub.requests if r.kind == "info"]

    ref = AdapterRef(kind="hub", source=REPO, revision="v1")
    assert fetch_adapter(ref) == v1

    # Offline, branch names still resolve through refs/ in the cache.
    go_offline(monkeypatch)
    hub.clear_requests()
    assert fetch("v1") == v1
    assert fetch(adapter_sha) == pinned
    assert hub.requests == []


def test_unknown_revision_is_model_not_found(cache: Path, hub: HubServer, adapter_sha: str) -> None:
    with pytest.raises(ModelNotFound, match="no revision 'nope'"):
        fetch("nope")


# --------------------------------------------------------------------------------------------- offline


def test_offline_is_served_from_the_cache_without_a_request(
    monkeypatch: pytest.MonkeyPatch, cache: Path, hub: HubServer, adapter_sha: str
) -> None:
    online = fetch()
    hub.fail(REPO, "error")  # would answer 500 to anything
    hub.clear_requests()
    go_offline(monkeypatch)

    assert fetch() == online
    assert fetch_adapter(AdapterRef(kind="hub", source=REPO)) == online
    assert hub.requests == []

    hub.stop()
    assert fetch() == online


def test_server_gone_falls_back_to_the_cache(cache: Path, hub: HubServer, adapter_sha: str) -> None:
    online = fetch()
    hub.stop()  # connection refused: huggingface_hub treats it as "no network" and uses the cache
    assert fetch() == online


def test_offline_with_nothing_cached_is_model_not_found(
    monkeypatch: pytest.MonkeyPatch, cache: Path, hub: HubServer, adapter_sha: str
) -> None:
    go_offline(monkeypatch)
    with pytest.raises(ModelNotFound) as info:
        fetch()
    assert "local Hugging Face cache" in info.value.message
    assert "HF_HUB_OFFLINE" in info.value.message
    assert hub.requests == []


def test_server_gone_with_nothing_cached_is_upstream_unavailable(
    cache: Path, hub: HubServer, adapter_sha: str
) -> None:
    hub.stop()
    with pytest.raises(UpstreamUnavailable):
        fetch()


# --------------------------------------------------------------------------------------------- failures

FAILURES = [
    pytest.param("not_found", {}, ModelNotFound, "does not exist", id="404"),
    pytest.param("not_found", {"on": "resolve"}, ModelNotFound, "does not exist", id="404-on-file"),
    pytest.param("unauthorized", {}, AdapterAccessDenied, "HF_TOKEN", id="401-private"),
    pytest.param("gated", {"status": 401, "on": "resolve"}, AdapterAccessDenied, "HF_TOKEN", id="401-gated"),
    pytest.param("gated", {"status": 403}, AdapterAccessDenied, "HF_TOKEN", id="403-gated"),
    pytest.param("forbidden", {}, AdapterAccessDenied, "HF_TOKEN", id="403-plain"),
    pytest.param("forbidden", {"on": "resolve"}, AdapterAccessDenied, "HF_TOKEN", id="403-plain-on-file"),
    pytest.param("error", {"status": 500}, UpstreamUnavailable, "HTTP 500", id="500"),
    pytest.param("error", {"status": 503, "on": "info"}, UpstreamUnavailable, "HTTP 503", id="503"),
    pytest.param("short", {}, UpstreamUnavailable, "Consistency check failed", id="short-body"),
]


@pytest.mark.parametrize(("mode", "options", "error", "message"), FAILURES)
def test_failure_is_typed_and_a_retry_after_the_fix_succeeds(
    cache: Path,
    hub: HubServer,
    adapter_sha: str,
    adapter: Path,
    mode: str,
    options: dict[str, Any],
    error: type[EngineError],
    message: str,
) -> None:
    hub.fail(REPO, mode, **options)
    started = time.monotonic()
    with pytest.raises(error, match=message) as info:
        fetch()
    assert time.monotonic() - started < 5
    assert type(info.value) is error
    assert info.value.param == "model"
    assert_nothing_partial(cache, adapter)

    hub.heal(REPO)
    folder = fetch()
    assert folder == repo_folder(cache) / "snapshots" / adapter_sha
    assert_complete(folder, adapter)


def test_a_cut_download_leaves_nothing_partial(
    monkeypatch: pytest.MonkeyPatch, cache: Path, hub: HubServer, adapter_sha: str, adapter: Path
) -> None:
    # The connection drops after half the weights, and every resume attempt gets nothing: huggingface_hub
    # retries 5 times (1 s apart), then lets httpx2.RemoteProtocolError through.
    hub.fail(REPO, "truncate", files=["adapter_model.safetensors"])
    with pytest.raises(UpstreamUnavailable, match="connection to the Hub failed"):
        fetch()
    assert_nothing_partial(cache, adapter)
    weights = repo_folder(cache) / "snapshots" / adapter_sha / "adapter_model.safetensors"
    assert not weights.exists()

    # The config did arrive, but an incomplete snapshot does not count as cached.
    with monkeypatch.context() as offline:
        go_offline(offline)
        with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
            fetch()

    hub.heal(REPO)
    assert_complete(fetch(), adapter)


def test_a_download_cut_once_is_retried(cache: Path, hub: HubServer, adapter_sha: str, adapter: Path) -> None:
    hub.fail(REPO, "truncate", files=["adapter_model.safetensors"], times=1)
    folder = fetch()
    assert_complete(folder, adapter)
    weights = [r for r in hub.requests if r.method == "GET" and r.filename == "adapter_model.safetensors"]
    # Bytes of a cut chunk are not kept, so the retry asks for the whole file again (a resume with
    # Range would get a 206 from this server).
    assert [r.fault for r in weights] == ["truncate", None]


def test_a_stalled_hub_is_upstream_unavailable_within_the_timeout(
    cache: Path, hub: HubServer, adapter_sha: str, adapter: Path
) -> None:
    # huggingface_hub sends the revision-info call without a timeout; the deadline bounds the wait.
    hub.fail(REPO, "stall", on="info", stall_s=5, times=1)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"within 0\.5s"):
        fetch(timeout=0.5)
    assert time.monotonic() - started < 2

    hub.heal(REPO)
    assert_complete(fetch(timeout=10), adapter)


def test_a_stall_that_ends_in_a_dropped_connection_is_upstream_unavailable(
    cache: Path, hub: HubServer, adapter_sha: str
) -> None:
    # Without a deadline the library waits until the server gives up, then lets the raw
    # httpx2.RemoteProtocolError through.
    hub.fail(REPO, "stall", on="info", stall_s=0.5)
    with pytest.raises(UpstreamUnavailable, match="RemoteProtocolError"):
        fetch()


def test_a_stalled_file_download_times_out(
    cache: Path, hub: HubServer, adapter_sha: str, adapter: Path
) -> None:
    # The GET stalls for longer than HF_HUB_DOWNLOAD_TIMEOUT (1 s here) once; huggingface_hub gives up on
    # it after 1 s, waits 1 s and asks again. (The stalled request is logged when the stall ends, at 1.5 s.)
    hub.fail(REPO, "stall", on="get", files=["adapter_model.safetensors"], stall_s=1.5, times=1)
    assert_complete(fetch(), adapter)
    gets = [r for r in hub.requests if r.filename == "adapter_model.safetensors" and r.method == "GET"]
    assert sorted(r.status for r in gets) == [0, 200]


# --------------------------------------------------------------------------------------------- sharing


def test_concurrent_fetches_download_each_file_once(
    cache: Path, hub: HubServer, adapter_sha: str, adapter: Path
) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(fetch())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors
    assert len(set(results)) == 1
    assert_complete(results[0], adapter)
    assert sorted(hub.downloads(REPO)) == sorted(ADAPTER_NAMES)
