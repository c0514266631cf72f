"""``engines.hub.HubFetcher``: hashes, cancellation, deadline, negative cache, leftovers, unreachable Hub.

Each test gets its own fake Hub (``tests/hub_server.py``) and HF cache; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.adapters.files import cached_adapters
from engines.errors import (
    FetchCancelled,
    ModelNotFound,
    UpstreamIntegrityError,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from engines.hub import ADAPTER_FILES, HubFetcher
from tests.hub_server import HubServer, use_hub_server

REPO = "test-org/tiny-lora"
WEIGHTS = b"\x00\x01weights of a LoRA adapter" * 200
CONFIG = {
    "peft_type": "LORA",
    "base_model_name_or_path": "test-org/tiny-base",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
}
FILES = {"adapter_config.json": json.dumps(CONFIG).encode(), "adapter_model.safetensors": WEIGHTS}


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, FILES)
        yield server


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: HubServer) -> Path:
    return use_hub_server(monkeypatch, hub, tmp_path / "hf-home")


def fetch(fetcher: HubFetcher, repo: str = REPO) -> Path:
    return fetcher.snapshot(repo, revision=None, allow_patterns=ADAPTER_FILES)


def repo_folder(cache: Path) -> Path:
    return cache / "models--test-org--tiny-lora"


# ------------------------------------------------------------------------------------------ sha256


def test_fake_hub_lists_lfs_sha256_like_the_hub(cache: Path, hub: HubServer) -> None:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub.url).model_info(REPO, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    lfs = siblings["adapter_model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert siblings["adapter_config.json"].lfs is None


def test_wrong_bytes_of_the_right_size_are_refused_and_not_cached(cache: Path, hub: HubServer) -> None:
    hub.fail(REPO, "corrupt", files=["adapter_model.safetensors"])
    with pytest.raises(UpstreamIntegrityError) as refused:
        fetch(HubFetcher(timeout=30))
    assert REPO in refused.value.message and "adapter_model.safetensors" in refused.value.message
    assert not refused.value.retryable
    # Neither the blob nor the snapshot link is left, so nothing serves the bad bytes later.
    blobs = repo_folder(cache) / "blobs"
    assert hashlib.sha256(WEIGHTS).hexdigest() not in {p.name for p in blobs.iterdir()}
    assert not list(repo_folder(cache).glob("snapshots/*/adapter_model.safetensors"))
    hub.heal()
    folder = fetch(HubFetcher(timeout=30))
    assert (folder / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_a_blob_corrupted_in_the_cache_is_caught_on_the_next_fetch(cache: Path, hub: HubServer) -> None:
    folder = fetch(HubFetcher(timeout=30))
    blob = (folder / "adapter_model.safetensors").resolve()
    blob.write_bytes(bytes(255 - b for b in WEIGHTS))
    with pytest.raises(UpstreamIntegrityError):
        fetch(HubFetcher(timeout=30))
    assert not blob.exists()
    assert (fetch(HubFetcher(timeout=30)) / "adapter_model.safetensors").read_bytes() == WEIGHTS


# ------------------------------------------------------------------------------ deadline and cancel


def test_cancel_ends_a_fetch_waiting_on_a_stalled_hub_at_once(cache: Path, hub: HubServer) -> None:
    hub.fail(REPO, "stall", stall_s=5)
    fetcher = HubFetcher(timeout=60)
    threading.Timer(0.3, fetcher.cancel).start()
    started = time.monotonic()
    with pytest.raises(FetchCancelled):
        fetch(fetcher)
    assert time.monotonic() - started < 2
    with pytest.raises(FetchCancelled):  # and later ones do not even start
        fetch(fetcher)


def test_the_fetch_deadline_is_the_configured_one(cache: Path, hub: HubServer) -> None:
    hub.fail(REPO, "stall", stall_s=5)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="fetch_timeout") as refused:
        fetch(HubFetcher(timeout=0.5))
    assert time.monotonic() - started < 2 and refused.value.retryable


# ---------------------------------------------------------------------------------- negative cache


def test_a_missing_repo_is_remembered_for_the_negative_ttl(cache: Path, hub: HubServer) -> None:
    now = [1000.0]
    fetcher = HubFetcher(timeout=30, negative_ttl=60, clock=lambda: now[0])
    for _ in range(5):
        with pytest.raises(ModelNotFound):
            fetch(fetcher, "test-org/nonexistent")
    asked = [r for r in hub.requests if r.repo_id == "test-org/nonexistent"]
    assert len(asked) == 1
    hub.add_repo("test-org/nonexistent", FILES)  # published meanwhile: seen once the entry expires
    now[0] += 61
    assert (fetch(fetcher, "test-org/nonexistent") / "adapter_config.json").is_file()


def test_transient_failures_are_not_remembered(cache: Path, hub: HubServer) -> None:
    fetcher = HubFetcher(timeout=30, negative_ttl=60)
    hub.fail(REPO, "error", on="api", times=1)
    with pytest.raises(UpstreamUnavailable):
        fetch(fetcher)
    assert (fetch(fetcher) / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------- unreachable Hub


def test_a_refused_connection_is_unreachable_not_retryable(cache: Path, hub: HubServer) -> None:
    hub.stop()
    with pytest.raises(UpstreamUnreachable, match="connection refused") as refused:
        fetch(HubFetcher(timeout=30))
    assert not refused.value.retryable and "try again later" not in refused.value.message


def test_a_hub_5xx_stays_a_retryable_503(cache: Path, hub: HubServer) -> None:
    hub.fail(REPO, "error", on="api", status=503)
    with pytest.raises(UpstreamUnavailable) as refused:
        fetch(HubFetcher(timeout=30))
    assert type(refused.value) is UpstreamUnavailable and refused.value.retryable
    assert "503" in refused.value.message


# ---------------------------------------------------------------------------- partial downloads


def test_leftovers_of_a_killed_download_are_removed(cache: Path, hub: HubServer) -> None:
    blobs = repo_folder(cache) / "blobs"
    blobs.mkdir(parents=True)
    stale = blobs / f"{'a' * 64}.0badc0de.incomplete"
    stale.write_bytes(b"half a file")
    fetch(HubFetcher(timeout=30))
    assert not stale.exists()


def test_a_partial_file_another_process_is_writing_is_kept(cache: Path, hub: HubServer) -> None:
    from filelock import FileLock

    blobs = repo_folder(cache) / "blobs"
    blobs.mkdir(parents=True)
    etag = "b" * 64
    busy = blobs / f"{etag}.12345678.incomplete"
    busy.write_bytes(b"being written")
    lock_file = cache / ".locks" / repo_folder(cache).name / f"{etag}.lock"
    lock_file.parent.mkdir(parents=True)
    held = threading.Event()
    release = threading.Event()

    def other_process() -> None:  # flock is per open file: another holder looks like another process
        with FileLock(str(lock_file)):
            held.set()
            release.wait(10)

    worker = threading.Thread(target=other_process)
    worker.start()
    try:
        assert held.wait(5)
        fetch(HubFetcher(timeout=30))
        assert busy.exists()
    finally:
        release.set()
        worker.join()


# ---------------------------------------------------------------------------------- cache listing


def test_cache_listing_skips_hostile_and_broken_folders(cache: Path, hub: HubServer) -> None:
    fetch(HubFetcher(timeout=30))
    nested = cache / "models--test-org--nested" / "snapshots" / ("c" * 40)
    nested.mkdir(parents=True)
    (nested / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "x": ' + "[" * 50_000 + "]" * 50_000 + "}"
    )
    typed = cache / "models--test-org--typed" / "snapshots" / ("d" * 40)
    typed.mkdir(parents=True)
    (typed / "adapter_config.json").write_text(json.dumps({**CONFIG, "target_modules": 5}))
    dangling = cache / "models--test-org--dangling" / "snapshots" / ("e" * 40)
    dangling.mkdir(parents=True)
    os.symlink(cache / "no-such-blob", dangling / "adapter_config.json")

    assert [a.repo_id for a in cached_adapters(cache)] == [REPO]


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("[Errno -2] Name or service not known", "DNS lookup failed"),
        ("[Errno -3] Temporary failure in name resolution", "DNS lookup failed"),
        ("[Errno 101] Network is unreachable", "network unreachable"),
        ("[Errno 111] Connection refused", "connection refused"),
    ],
)
def test_no_route_to_the_hub_names_its_cause(cache: Path, text: str, cause: str) -> None:
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    from engines.hub import translate_error

    try:
        try:
            raise httpx2.ConnectError(text)
        except httpx2.ConnectError as connect:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files") from connect
    except LocalEntryNotFoundError as exc:
        error = translate_error(exc, what="adapter", label="org/x", endpoint="https://huggingface.co")
    assert isinstance(error, UpstreamUnreachable), error
    assert cause in error.message and not error.retryable


def test_a_hub_timeout_is_transient_not_unreachable(cache: Path) -> None:
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    from engines.hub import translate_error

    try:
        try:
            raise httpx2.ReadTimeout("timed out")
        except httpx2.ReadTimeout as timeout:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files") from timeout
    except LocalEntryNotFoundError as exc:
        error = translate_error(exc, what="adapter", label="org/x", endpoint="https://huggingface.co")
    assert type(error) is UpstreamUnavailable and error.retryable and "ReadTimeout" in error.message
